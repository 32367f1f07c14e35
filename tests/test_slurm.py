"""--executor slurm on a real single-node Slurm (slurmctld + slurmd, started by the tests),
through jobd's HTTP API: success, failure, cancel, time-outs, delete, restart re-attach,
50 jobs at once, and jobs that Slurm forgot while jobd was down.

Skipped unless root with Slurm installed (ci/slurm-steps.sh); the configuration checks at
the end run everywhere. Slurm's own time limit (TIMEOUT) takes 60-90 s: that job is
submitted when the module starts and checked by its last test, so the wait overlaps the
others. Deselect it with -k 'not slurm_time_limit' for a ~40 s run.
"""

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import ROOT, Jobd, jobd_command, make_zip, unzip
from helpers import alive, status, wait_status, wait_until
from slurm_cluster import SlurmCluster, skip_reason
from slurm_fixtures import make_slurm_cluster, slurm_cluster, slurm_session_cluster  # noqa: F401

POLL = "0.2"  # jobd's --slurm-poll in these tests


def slurm_jobd(make_jobd, cluster, *args, env=None):
    """A jobd that runs its jobs through `cluster`. Slurm ids up to now belong to earlier
    tests (the session's cluster also serves this test run against the other
    implementation, with the same job ids): slurm_ids_named() ignores them."""
    cluster.mark_ids()
    return make_jobd(args=["--executor", "slurm", "--slurm-poll", POLL, *args],
                     env={**cluster.env, **(env or {})})


def upload(jobd, job_id, script, **extra):
    resp = jobd.upload(job_id, {"run.sh": script}, **extra)
    assert resp.status == 201, resp
    return resp.json()


def output_files(jobd, job_id):
    resp = jobd.request("GET", f"/api/jobs/{job_id}/output")
    assert resp.status == 200, resp
    return unzip(resp.body)


def slurm_ids_named(cluster, job_id):
    """Slurm ids of every submission of a jobd job (its Slurm name is jobd-<id>-<tag>)."""
    out = cluster.run("squeue", "-h", "-t", "all", "-O", "JobID:|,Name:").stdout
    return sorted(int(number) for number, name in (line.split("|", 1) for line in out.splitlines())
                  if name.strip().rsplit("-", 1)[0] == f"jobd-{job_id}"
                  and int(number) > cluster.baseline)


def job_processes(cluster, jobd):
    """Processes of the cluster's jobs: every one with its SLURM_CONF but its daemons and
    jobd (whose environment has it too; the frozen jobd is three processes, all in the
    session the test started it in)."""
    left = []
    for pid in set(cluster.leftover_pids()) - {jobd.proc.pid}:
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/stat") as f:
                session = int(f.read().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError):
            continue
        if name not in ("slurmctld", "slurmd", "slurmscriptd") and session != jobd.proc.pid:
            left.append((pid, name))
    return left


# ---- Slurm's own time limit, started first (see the module docstring) ----------------

SLURM_TIME_LIMIT_TEST = "test_slurm_time_limit_is_failed_with_timeout_in_the_message"


@pytest.fixture(scope="module", autouse=True)
def early_slurm_timeout(request):
    """A private cluster and jobd with one job that Slurm kills at its 1-minute limit."""
    if not any(item.name == SLURM_TIME_LIMIT_TEST for item in request.session.items) \
            or skip_reason():
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="jobd-slurm-timeout-") as workdir, \
            SlurmCluster() as cluster:
        jobd = Jobd(jobd_command("source"), workdir,
                    ["--executor", "slurm", "--slurm-poll", POLL, "--slurm-job-options", "time"],
                    cluster.env).start()
        try:
            upload(jobd, "limited", "echo started\nexec sleep 600\n", slurm={"time": 1})
            yield jobd, cluster, time.monotonic()
        finally:
            jobd.kill()


# ---- tests --------------------------------------------------------------------------

def test_a_job_runs_in_slurm_like_a_local_job(slurm_cluster, make_jobd):
    jobd = slurm_jobd(make_jobd, slurm_cluster,
                      env={"SLURML_API_TOKEN": "do-not-leak", "MY_SETTING": "kept"})
    script = ('echo "hello from $SLURM_JOB_ID"\necho "bash=$BASH_VERSION"\n'
              "env > env.txt\npwd > where.txt\necho to-stderr >&2\n")  # no #!: sh runs it
    assert upload(jobd, "hello", script)["Status"] == "QUEUED"
    job = wait_status(jobd, "hello", "SUCCESS")
    assert (job["ExitCode"], job["Message"]) == (0, "job finished successfully")
    slurm_id = job["SlurmID"]
    assert slurm_id > 0 and slurm_ids_named(slurm_cluster, "hello") == [slurm_id]
    info = slurm_cluster.job_info(slurm_id)
    job_dir = str(jobd.data / "hello")
    assert (info["JobState"], info["WorkDir"]) == ("COMPLETED", job_dir)
    assert info["StdOut"] == job_dir + "/jobd.stdout"

    files = output_files(jobd, "hello")  # the same zip as a local job's: no file of jobd's
    assert set(files) == {"run.sh", "jobd.stdout", "jobd.stderr", "env.txt", "where.txt"}
    stdout = files["jobd.stdout"].decode().splitlines()
    assert stdout[0] == f"hello from {slurm_id}" and stdout[1] == "bash="  # /bin/sh, as here
    assert files["jobd.stderr"] == b"to-stderr\n"
    assert files["where.txt"].decode().strip() == job_dir
    env = dict(line.split("=", 1) for line in files["env.txt"].decode().splitlines() if "=" in line)
    assert env["MY_SETTING"] == "kept" and env["SLURM_JOB_ID"] == str(slurm_id)
    assert "SLURML_API_TOKEN" not in env
    assert not os.path.exists(job_dir)  # removed once zipped, as for a local job

    go = jobd.get("hello").json()  # the Go object shows the Slurm id
    assert (go["Status"], go["SlurmID"]) == ("SUCCESS", slurm_id)


def test_failures_keep_their_exit_code_and_say_what_slurm_said(slurm_cluster, make_jobd):
    jobd = slurm_jobd(make_jobd, slurm_cluster)
    upload(jobd, "exit3", "echo oops >&2\nexit 3\n")
    upload(jobd, "killed", "#!/bin/sh\nkill -9 $$\n")
    job = wait_status(jobd, "exit3", "FAILED")
    assert job["ExitCode"] == 3
    assert job["Message"].startswith("could not finish the job, error: exit status 3")
    assert f"Slurm job {job['SlurmID']} FAILED" in job["Message"] and job["Message"].endswith("oops")
    job = wait_status(jobd, "killed", "FAILED")
    assert job["ExitCode"] == 128 + 9  # as for a local job killed by SIGKILL
    assert output_files(jobd, "exit3")["jobd.stderr"] == b"oops\n"


CHILDREN = """#!/bin/bash
sleep 301 & echo $! > bg.pid
nohup sleep 302 >/dev/null 2>&1 & echo $! > nohup.pid
(sleep 303; true) & echo $! > subshell.pid
trap '' TERM            # ignoring SIGTERM must not save it
echo $$ > main.pid
wait
"""
PIDS = ("main", "bg", "nohup", "subshell")


def wait_for_pids(jobd, job_id):
    job_dir = jobd.data / job_id
    wait_until(lambda: all((job_dir / f"{n}.pid").exists() for n in PIDS), 20, interval=0.1,
               what=f"the job's processes to write their pids; jobd's log:\n{jobd.log_text()}")
    time.sleep(0.1)  # the last echo may still be writing
    return [int((job_dir / f"{n}.pid").read_text()) for n in PIDS]


def test_cancel_scancels_and_no_process_survives(slurm_cluster, make_jobd):
    jobd = slurm_jobd(make_jobd, slurm_cluster)
    upload(jobd, "busy", CHILDREN)
    pids = wait_for_pids(jobd, "busy")
    assert wait_status(jobd, "busy", "RUNNING", also=lambda job: job["SlurmID"] > 0)
    # running in Slurm, not on a worker of jobd's: it counts as running all the same
    assert jobd.request("GET", "/healthz").json()["running"] == 1
    resp = jobd.request("POST", "/api/jobs/busy/cancel")
    assert resp.status == 200 and resp.json()["Status"] == "CANCELLED", resp
    assert resp.json()["Message"] == "job cancelled" and resp.json()["ExitCode"] is None
    assert [pid for pid in pids if alive(pid)] == []
    assert slurm_cluster.job_info(resp.json()["SlurmID"])["JobState"] == "CANCELLED"
    wait_until(lambda: job_processes(slurm_cluster, jobd) == [], 10, interval=0.1,
               what="the job's processes to end")
    assert set(output_files(jobd, "busy")) >= {f"{n}.pid" for n in PIDS}


def test_jobd_time_limit_scancels_the_job(slurm_cluster, make_jobd):
    jobd = slurm_jobd(make_jobd, slurm_cluster)
    started = time.monotonic()
    resp = jobd.request("PUT", "/api/jobs/slow", make_zip({"run.sh": CHILDREN}),
                        {"X-Jobd-Timeout": "2"})
    assert resp.status == 201, resp
    pids = wait_for_pids(jobd, "slow")
    job = wait_status(jobd, "slow", "FAILED", timeout=30)
    assert job["Message"] == "job timed out after 2 s and was killed"
    assert time.monotonic() - started < 20
    assert [pid for pid in pids if alive(pid)] == []
    assert slurm_cluster.job_info(job["SlurmID"])["JobState"] == "CANCELLED"


def test_delete_scancels_then_removes(slurm_cluster, make_jobd):
    jobd = slurm_jobd(make_jobd, slurm_cluster)
    upload(jobd, "doomed", CHILDREN)
    pids = wait_for_pids(jobd, "doomed")
    slurm_id = wait_status(jobd, "doomed", "RUNNING", also=lambda job: job["SlurmID"] > 0)["SlurmID"]
    assert jobd.request("DELETE", "/api/jobs/doomed").status == 204
    assert jobd.request("GET", "/api/jobs/doomed").status == 404
    assert slurm_cluster.job_info(slurm_id)["JobState"] == "CANCELLED"
    assert [pid for pid in pids if alive(pid)] == []
    assert not (jobd.data / "doomed").exists()


def test_restart_reattaches_and_never_submits_twice(slurm_cluster, make_jobd):
    jobd = slurm_jobd(make_jobd, slurm_cluster, "--slurm-job-options", "hold")
    upload(jobd, "long", "sleep 3\necho done\n")
    upload(jobd, "held", "echo released\n", slurm={"hold": True})  # pending in Slurm
    running = wait_status(jobd, "long", "RUNNING", also=lambda job: job["SlurmID"] > 0)
    held = wait_status(jobd, "held", "QUEUED", also=lambda job: job["SlurmID"] > 0)
    assert "JobHeldUser" in held["Message"]
    jobd.kill()  # kill -9: Slurm's jobs are not jobd's children and go on

    jobd.start()
    slurm_cluster.run("scontrol", "release", held["SlurmID"])
    long_job = wait_status(jobd, "long", "SUCCESS", timeout=30)
    held_job = wait_status(jobd, "held", "SUCCESS", timeout=30)
    assert (long_job["SlurmID"], held_job["SlurmID"]) == (running["SlurmID"], held["SlurmID"])
    assert output_files(jobd, "long")["jobd.stdout"] == b"done\n"
    assert output_files(jobd, "held")["jobd.stdout"] == b"released\n"
    assert slurm_ids_named(slurm_cluster, "long") == [running["SlurmID"]]
    assert slurm_ids_named(slurm_cluster, "held") == [held["SlurmID"]]


def test_fifty_jobs_at_once_each_run_exactly_once(slurm_cluster, make_jobd, tmp_path):
    jobd = slurm_jobd(make_jobd, slurm_cluster)
    ran = tmp_path / "ran.log"
    errors = []

    def client(numbers):
        for i in numbers:
            resp = jobd.upload(f"n{i}", {"run.sh": f"echo {i} >> {ran}\necho {i}\n"})
            if resp.status != 201:
                errors.append(resp)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(range(k, 50, 10),)) for k in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    for i in range(50):
        job = wait_status(jobd, f"n{i}", ("SUCCESS", "FAILED"), timeout=90)
        assert job["Status"] == "SUCCESS", job
    elapsed = time.monotonic() - started
    assert sorted(int(line) for line in ran.read_text().split()) == list(range(50))
    ids = [slurm_ids_named(slurm_cluster, f"n{i}") for i in range(50)]
    assert all(len(found) == 1 for found in ids), ids
    assert len({found[0] for found in ids}) == 50
    assert output_files(jobd, "n7")["jobd.stdout"] == b"7\n"
    print(f"50 jobs through Slurm: {elapsed:.1f} s")


def test_per_job_options_only_those_the_server_allows(slurm_cluster, make_jobd):
    jobd = slurm_jobd(make_jobd, slurm_cluster, "--slurm-option=--nice=5",
                      "--slurm-job-options", "time,comment")
    resp = jobd.upload("refused", {"run.sh": "true\n"}, slurm={"partition": "debug"})
    assert resp.status == 400 and "allowed: time, comment" in resp.json()["message"]
    resp = jobd.upload("bad", {"run.sh": "true\n"}, slurm="time=5")
    assert resp.status == 400
    assert jobd.request("GET", "/api/jobs/refused").status == 404  # nothing was stored
    resp = jobd.request("PUT", "/api/jobs/raw", make_zip({"run.sh": "true\n"}),
                        {"X-Jobd-Slurm": "time=7; comment=set by the job"})
    assert resp.status == 201, resp
    upload(jobd, "json", "true\n", slurm={"--time": 3})
    for job_id, limit in (("raw", "00:07:00"), ("json", "00:03:00")):
        info = slurm_cluster.job_info(wait_status(jobd, job_id, "SUCCESS")["SlurmID"])
        assert (info["TimeLimit"], info["Nice"]) == (limit, "5")
    assert slurm_cluster.job_info(status(jobd, "raw")["SlurmID"])["Comment"].strip() == "set by the job"


FLAKY_SBATCH = """#!/bin/bash
# sbatch that answers an error the first time for two jobs: for "lied" after really
# submitting it (as a time-out can), for "lost" without (as a refused connection does)
for arg in "$@"; do case $arg in --job-name=*) name=${{arg#--job-name=}};; esac; done
case $name in
jobd-lied-*) if mkdir {state}/lied 2>/dev/null; then {real} "$@" >/dev/null
    echo "sbatch: error: Batch job submission failed: Socket timed out on send/recv" >&2
    exit 1; fi;;
jobd-lost-*) if mkdir {state}/lost 2>/dev/null; then cat >/dev/null
    echo "sbatch: error: Unable to contact slurm controller (connect failure)" >&2
    exit 1; fi;;
esac
exec {real} "$@"
"""


def test_unsure_submissions_are_looked_up_before_any_second_sbatch(slurm_cluster, make_jobd,
                                                                   tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(FLAKY_SBATCH.format(state=tmp_path, real="/usr/bin/sbatch"))
    (fake / "sbatch").chmod(0o755)
    jobd = slurm_jobd(make_jobd, slurm_cluster,
                      env={"PATH": f"{fake}:{slurm_cluster.env['PATH']}"})
    upload(jobd, "lied", "echo once >> ../../lied.log\n")
    upload(jobd, "lost", "echo once >> ../../lost.log\n")
    for job_id in ("lied", "lost"):
        job = wait_status(jobd, job_id, "SUCCESS")
        assert slurm_ids_named(slurm_cluster, job_id) == [job["SlurmID"]]
        assert (tmp_path / f"{job_id}.log").read_text() == "once\n"
    assert (tmp_path / "lied").is_dir() and (tmp_path / "lost").is_dir()
    log = jobd.log_text()
    assert "found in Slurm by its name" in log and "Slurm never got it" in log


def test_a_job_slurm_refuses_fails_with_sbatchs_reason(slurm_cluster, make_jobd):
    jobd = slurm_jobd(make_jobd, slurm_cluster, "--slurm-job-options", "partition")
    upload(jobd, "nowhere", "true\n", slurm={"partition": "no-such-partition"})
    job = wait_status(jobd, "nowhere", "FAILED")
    assert job["Message"].startswith("Slurm refused the job: ")
    assert "partition" in job["Message"].lower() and job["SlurmID"] == 0


def test_jobs_slurm_forgot_while_jobd_was_down(make_slurm_cluster, make_jobd):
    """MinJobAge=2: a job that ends while jobd is stopped is purged from slurmctld within
    seconds. jobd resolves it from the exit status file, else from the jobcomp record."""
    cluster = make_slurm_cluster(min_job_age=2)
    jobd = slurm_jobd(make_jobd, cluster)
    scripts = {"fine": "sleep 2\necho fine\n", "bad": "sleep 2\nexit 5\n",
               "nofile": "sleep 2\necho lost >&2\nexit 4\n", "killed": "exec sleep 300\n"}
    for job_id, script in scripts.items():
        upload(jobd, job_id, script)
    in_slurm = lambda job: job["SlurmID"] > 0  # noqa: E731 (RUNNING, 0: being submitted)
    slurm = {job_id: wait_status(jobd, job_id, "RUNNING", also=in_slurm)["SlurmID"]
             for job_id in scripts}
    assert jobd.stop() == 0  # a graceful stop leaves the jobs in Slurm

    cluster.run("scancel", slurm["killed"])
    wait_until(lambda: all(cluster.job_info(n) is None for n in slurm.values()), 40,
               interval=0.5, what="Slurm to purge the jobs")
    exit_file = jobd.data / "nofile" / ".jobd-exit-status"
    assert exit_file.read_text().split() == ["4", str(slurm["nofile"])]
    exit_file.unlink()  # as if the compute node's file never reached jobd: jobcomp remains
    assert set(cluster.jobcomp_records()) >= set(slurm.values())

    jobd.start()
    fine = wait_status(jobd, "fine", "SUCCESS")
    assert fine["ExitCode"] == 0 and output_files(jobd, "fine")["jobd.stdout"] == b"fine\n"
    bad = wait_status(jobd, "bad", "FAILED")
    assert bad["ExitCode"] == 5 and "exit status 5" in bad["Message"]
    # the exit status file is jobd's own: not in the result
    assert set(output_files(jobd, "bad")) == {"run.sh", "jobd.stdout", "jobd.stderr"}
    nofile = wait_status(jobd, "nofile", "FAILED")
    assert nofile["ExitCode"] == 4 and "jobcomp record" in nofile["Message"]
    assert nofile["Message"].endswith(": lost")
    killed = wait_status(jobd, "killed", "CANCELLED")
    assert killed["Message"].startswith("job cancelled in Slurm")
    for job_id, slurm_id in slurm.items():
        assert status(jobd, job_id)["SlurmID"] == slurm_id


def test_slurm_time_limit_is_failed_with_timeout_in_the_message(early_slurm_timeout):
    if early_slurm_timeout is None:
        pytest.skip(skip_reason() or "run with the whole module")
    jobd, cluster, submitted = early_slurm_timeout
    job = wait_status(jobd, "limited", ("FAILED", "SUCCESS", "CANCELLED"),
                      timeout=max(1, submitted + 150 - time.monotonic()))
    assert job["Status"] == "FAILED" and job["ExitCode"] == 128 + signal.SIGTERM
    assert f"Slurm job {job['SlurmID']} TIMEOUT, TimeLimit" in job["Message"]
    assert output_files(jobd, "limited")["jobd.stdout"] == b"started\n"
    print(f"Slurm TIMEOUT recorded {time.monotonic() - submitted:.0f} s after submission")


# ---- configuration (no cluster needed) ---------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--executor", "slurm", "--slurm-job-options", "time,chdir"], "jobs may not set --chdir"),
    (["--executor", "slurm", "--slurm-option=--output=x"], "jobd sets or forbids --output"),
    (["--executor", "slurm", "--slurm-option=-Jx"], "jobd sets or forbids --job-name"),
    (["--executor", "slurm", "--slurm-option=partition=x"], "is not an sbatch option"),
    (["--slurm-option=--partition=x"], "need --executor slurm"),
    (["--executor", "pbs"], "must be local or slurm"),
])
def test_bad_slurm_settings_are_refused_at_start(args, message, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "jobd.py"), "--port", "0", "--db",
                        str(tmp_path / "db"), "--data", str(tmp_path / "data"), *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_executor_slurm_needs_sbatch_on_path(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "jobd.py"), "--executor", "slurm"],
                       capture_output=True, text=True, timeout=30, cwd=tmp_path,
                       env={**os.environ, "PATH": str(tmp_path)})
    assert r.returncode != 0 and "sbatch" in r.stderr and "not on PATH" in r.stderr


def test_local_jobd_refuses_sbatch_options(make_jobd):
    jobd = make_jobd()
    resp = jobd.upload("x", {"run.sh": "true\n"}, slurm={"time": "5"})
    assert resp.status == 400 and "--executor slurm" in resp.json()["message"]
    resp = jobd.request("PUT", "/api/jobs/y", make_zip({"run.sh": "true\n"}),
                        {"X-Jobd-Slurm": "time=5"})
    assert resp.status == 400
    assert jobd.upload("z", {"run.sh": "true\n"}, slurm={}).status == 201  # nothing asked

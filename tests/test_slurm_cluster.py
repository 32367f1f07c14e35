"""Tests of the real-Slurm test harness, with plain sbatch/squeue/scancel (no jobd).

They also pin down the Slurm behaviour the executor is built on (Debian 12, Slurm 22.05):
the batched squeue poll, ExitCode=N:S, what unknown ids do, the jobcomp record.
Skipped unless root with the Slurm packages installed (ci/slurm-steps.sh).
The time-limit test needs ~90 s of wall time (overlapped with the others); deselect it with
`-k 'not time_limit'` for a ~30 s run.
"""

import os
import stat
import time

import pytest

from slurm_cluster import SlurmCluster, parse_keyvals, skip_reason
from slurm_fixtures import make_slurm_cluster, slurm_cluster, slurm_session_cluster  # noqa: F401

# The executor's poll: one call for every job in flight. `-t all` is needed, or finished
# jobs are not listed; exit_code is the raw wait status (3 -> 768, SIGKILL -> 9).
POLL = ("squeue", "-h", "-t", "all", "-O", "JobID:|,State:|,exit_code:|,Reason:")


def poll(cluster, job_ids):
    """{job_id: (state, wait status, reason)} for the ids Slurm still knows (one call)."""
    r = cluster.run(*POLL, "-j", ",".join(str(j) for j in job_ids), check=False)
    if r.returncode != 0:
        # A single unknown id answers exit 1 "Invalid job id specified"; several: exit 0.
        assert "Invalid job id specified" in r.stderr, r.stderr
        return {}
    out = {}
    for line in r.stdout.splitlines():
        job_id, state, status, reason = line.split("|")
        out[int(job_id)] = (state, int(status), reason)
    return out


def write_script(path, text, executable=True):
    with open(path, "w") as f:
        f.write(text)
    if executable:
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return str(path)


def wait_until(predicate, timeout, interval=0.1):
    """Poll `predicate` until true or `timeout` s; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- time limit
# Slurm checks time limits every 30 s and its granularity is one minute, so the fastest
# TIMEOUT is --time=1 and arrives 60-90 s after the start. The job is submitted to a private
# cluster as soon as this module starts, and checked by the last test, so the wait overlaps
# the other tests.

TIME_LIMIT_TEST = "test_time_limit_ends_job_as_timeout"


@pytest.fixture(scope="module", autouse=True)
def early_timeout_job(request, tmp_path_factory):
    if not any(item.name == TIME_LIMIT_TEST for item in request.session.items):
        yield None
        return
    if skip_reason():
        yield skip_reason()
        return
    job_dir = tmp_path_factory.mktemp("timeout")
    with SlurmCluster() as cluster:
        job_id = cluster.sbatch("--chdir", job_dir, "--time=1", "--output", "out.txt",
                                "--wrap", "echo started; exec sleep 600")
        yield cluster, job_id, time.monotonic()


# --------------------------------------------------------------------------- tests

def test_job_runs_in_its_dir_with_chosen_output_files(slurm_cluster, tmp_path):
    run_sh = write_script(tmp_path / "run.sh",
                          "#!/bin/sh\necho to-stdout\necho to-stderr >&2\n"
                          "pwd > where.txt\necho \"$JOBD_MARK\" > env.txt\n")
    env = dict(slurm_cluster.env, JOBD_MARK="from-submitter")
    job_id = slurm_cluster.sbatch("--chdir", tmp_path, "--output", tmp_path / "stdout.txt",
                                  "--error", tmp_path / "stderr.txt", run_sh, env=env,
                                  cwd="/")
    info = slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED"}, timeout=30)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
    assert (tmp_path / "stdout.txt").read_text() == "to-stdout\n"
    assert (tmp_path / "stderr.txt").read_text() == "to-stderr\n"
    assert (tmp_path / "where.txt").read_text().strip() == str(tmp_path)
    # --export=ALL is the default: the job sees the submitter's environment.
    assert (tmp_path / "env.txt").read_text() == "from-submitter\n"
    assert poll(slurm_cluster, [job_id]) == {job_id: ("COMPLETED", 0, "None")}


def test_relative_output_paths_are_relative_to_chdir(slurm_cluster, tmp_path):
    job_id = slurm_cluster.sbatch("--chdir", tmp_path, "-o", "o.txt", "-e", "e.txt",
                                  "--wrap", "echo out; echo err >&2", cwd="/")
    slurm_cluster.wait_state(job_id, "COMPLETED")
    assert (tmp_path / "o.txt").read_text() == "out\n"
    assert (tmp_path / "e.txt").read_text() == "err\n"


def test_exit_codes(slurm_cluster, tmp_path):
    cases = {
        "exit 3": ("FAILED", "3:0", 3 << 8),
        "kill -9 $$": ("FAILED", "0:9", 9),                # killed by a signal
        "sh -c 'kill -SEGV $$'": ("FAILED", "139:0", 139 << 8),  # a child's signal: 128+11
        "exit 0": ("COMPLETED", "0:0", 0),
    }
    ids = {slurm_cluster.sbatch("--chdir", tmp_path, "-o", "/dev/null", "--wrap", cmd): cmd
           for cmd in cases}
    for job_id, cmd in ids.items():
        info = slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED"}, timeout=30)
        state, exit_code, _ = cases[cmd]
        assert (info["JobState"], info["ExitCode"]) == (state, exit_code), cmd
    polled = poll(slurm_cluster, ids)
    for job_id, cmd in ids.items():
        state, _, status = cases[cmd]
        assert polled[job_id][:2] == (state, status), cmd


def test_script_without_shebang_is_refused_but_runs_through_wrap(slurm_cluster, tmp_path):
    run_sh = write_script(tmp_path / "run.sh", "echo no-shebang\nexit 4\n")
    r = slurm_cluster.run("sbatch", "--parsable", "--chdir", tmp_path, run_sh, check=False)
    assert r.returncode == 1 and "first" in r.stderr and "#!" in r.stderr
    # --wrap makes "#!/bin/sh" + the command; sh runs a shebang-less file itself.
    job_id = slurm_cluster.sbatch("--chdir", tmp_path, "-o", "stdout.txt", "-e", "stderr.txt",
                                  "--wrap", "exec ./run.sh")
    info = slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED"})
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "4:0")
    assert (tmp_path / "stdout.txt").read_text() == "no-shebang\n"


def test_scancel_kills_the_whole_job(slurm_cluster, tmp_path):
    run_sh = write_script(tmp_path / "run.sh", """#!/bin/bash
sleep 301 & echo $! > bg.pid
nohup sleep 302 >/dev/null 2>&1 & echo $! > nohup.pid
(sleep 303; true) & echo $! > subshell.pid
trap '' TERM            # ignoring SIGTERM must not save it: SIGKILL follows
echo $$ > main.pid
wait
""")
    job_id = slurm_cluster.sbatch("--chdir", tmp_path, "-o", "out.txt", run_sh)
    slurm_cluster.wait_state(job_id, "RUNNING")
    names = ("main", "bg", "nohup", "subshell")
    assert wait_until(lambda: all((tmp_path / (n + ".pid")).exists() for n in names), 10)
    pids = [int((tmp_path / (n + ".pid")).read_text()) for n in names]
    assert all(pid_alive(p) for p in pids)

    started = time.monotonic()
    slurm_cluster.run("scancel", job_id)
    info = slurm_cluster.wait_state(job_id, "CANCELLED", timeout=15)
    assert wait_until(lambda: not [p for p in pids if pid_alive(p)], 15)
    assert time.monotonic() - started < 15
    assert info["ExitCode"] in ("0:9", "0:15", "0:0")  # a cancel's exit code means nothing

    # Nothing of the job is left: only the daemons carry the cluster's SLURM_CONF.
    def job_processes():
        left = []
        for pid in slurm_cluster.leftover_pids():
            try:
                with open("/proc/%d/comm" % pid) as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name not in ("slurmctld", "slurmd", "slurmscriptd"):
                left.append((pid, name))
        return left
    assert wait_until(lambda: job_processes() == [], 10), job_processes()

    # Cancelling a finished (or unknown) job is a silent no-op: exit 0, no output.
    r = slurm_cluster.run("scancel", job_id, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert slurm_cluster.job_info(job_id)["JobState"] == "CANCELLED"


def test_job_is_found_again_by_its_id_alone(slurm_cluster, tmp_path):
    # "Re-attach" after a daemon restart: a fresh client process needs only the id.
    r = slurm_cluster.run("sbatch", "--parsable", "--chdir", tmp_path, "-o", "/dev/null",
                          "--wrap", "sleep 30")
    job_id = int(r.stdout.strip())
    slurm_cluster.wait_state(job_id, "RUNNING")
    assert poll(slurm_cluster, [job_id])[job_id][0] == "RUNNING"
    slurm_cluster.run("scancel", job_id)
    slurm_cluster.wait_state(job_id, "CANCELLED", timeout=15)


def test_fifty_jobs_at_once(slurm_cluster, tmp_path):
    started = time.monotonic()
    ids = [slurm_cluster.sbatch("--chdir", tmp_path, "-o", "out-%d.txt" % i, "--wrap",
                                "echo %d" % i) for i in range(50)]
    assert len(set(ids)) == 50
    seen = set()

    def all_done():
        states = poll(slurm_cluster, ids)
        seen.update(s for s, _, _ in states.values())
        return len(states) == 50 and all(s == "COMPLETED" for s, _, _ in states.values())
    assert wait_until(all_done, 60, interval=0.2), poll(slurm_cluster, ids)
    elapsed = time.monotonic() - started
    for i in range(50):
        assert (tmp_path / ("out-%d.txt" % i)).read_text() == "%d\n" % i
    assert seen <= {"PENDING", "RUNNING", "COMPLETING", "COMPLETED"}
    print("50 jobs: %.1f s, states seen %s" % (elapsed, sorted(seen)))


def test_batched_poll_with_unknown_ids(slurm_cluster, tmp_path):
    job_id = slurm_cluster.sbatch("--chdir", tmp_path, "-o", "/dev/null", "--wrap", "true")
    slurm_cluster.wait_state(job_id, "COMPLETED")
    unknown = job_id + 100000
    # Known and unknown ids together: the unknown ones are simply missing, exit 0.
    r = slurm_cluster.run(*POLL, "-j", "%d,%d" % (job_id, unknown), check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "%d|COMPLETED|0|None\n" % job_id, "")
    # Only unknown ids: one -> exit 1 with a message; several -> exit 0 and no output.
    r = slurm_cluster.run(*POLL, "-j", str(unknown), check=False)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.strip() == "slurm_load_jobs error: Invalid job id specified"
    r = slurm_cluster.run(*POLL, "-j", "%d,%d" % (unknown, unknown + 1), check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    # Without -t all a finished job is not listed at all.
    r = slurm_cluster.run("squeue", "-h", "-j", str(job_id), "-o", "%T", check=False)
    assert (r.returncode, r.stdout) == (0, "")


def test_purged_job_is_found_in_jobcomp(make_slurm_cluster, tmp_path):
    cluster = make_slurm_cluster(min_job_age=2)
    job_id = cluster.sbatch("--chdir", tmp_path, "-o", "/dev/null", "--wrap", "exit 3")
    cluster.wait_state(job_id, "FAILED")
    ended = time.monotonic()
    # Purged MinJobAge..MinJobAge+10 s after the end (the purge runs every 10 s here).
    assert wait_until(lambda: cluster.job_info(job_id) is None, 30, interval=0.2)
    gone_after = time.monotonic() - ended
    assert poll(cluster, [job_id]) == {}
    record = cluster.jobcomp_records()[job_id]
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", "3:0")
    assert record["WorkDir"] == str(tmp_path)
    print("job left slurmctld's memory %.1f s after it ended" % gone_after)


def test_stop_leaves_no_process_behind(make_slurm_cluster, tmp_path):
    cluster = make_slurm_cluster()
    run_sh = write_script(tmp_path / "run.sh",
                          "#!/bin/sh\nsleep 300 & echo $! > bg.pid\necho $$ > main.pid\nwait\n")
    job_id = cluster.sbatch("--chdir", tmp_path, "-o", "/dev/null", run_sh)
    cluster.wait_state(job_id, "RUNNING")
    assert wait_until(lambda: (tmp_path / "bg.pid").exists() and (tmp_path / "main.pid").exists(), 10)
    pids = cluster.leftover_pids()
    assert len(pids) >= 5  # slurmctld, slurmscriptd, slurmd, slurmstepd, the job's shell, sleep
    started = time.monotonic()
    cluster.stop()
    assert time.monotonic() - started < 20
    assert [p for p in pids if pid_alive(p)] == []
    assert cluster.leftover_pids() == []
    assert not os.path.exists(cluster.base)
    cluster.stop()  # a second stop is harmless


def test_parse_keyvals_keeps_values_with_spaces():
    line = "JobId=7 Name=a b WorkDir=/x y/z ReservationName= ExitCode=3:0 \n"
    assert parse_keyvals(line) == {"JobId": "7", "Name": "a b", "WorkDir": "/x y/z",
                                   "ReservationName": "", "ExitCode": "3:0"}


def test_time_limit_ends_job_as_timeout(early_timeout_job):
    if isinstance(early_timeout_job, str):
        pytest.skip(early_timeout_job)
    cluster, job_id, submitted = early_timeout_job
    info = cluster.wait_state(job_id, "TIMEOUT", timeout=max(1, submitted + 150 - time.monotonic()),
                              interval=0.5)
    assert info["ExitCode"] == "0:15"  # SIGTERM at the limit (KillWait=2 s before SIGKILL)
    assert info["Reason"] == "TimeLimit"
    assert poll(cluster, [job_id])[job_id] == ("TIMEOUT", 15, "TimeLimit")
    print("TIMEOUT %.0f s after submission" % (time.monotonic() - submitted))

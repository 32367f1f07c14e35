"""Crashes, restarts, graceful shutdown and the retention sweep.

`kill()` is SIGKILL to jobd's process group: a crash. Jobs live in their own sessions,
so they outlive it, as they would in production. Jobs tell the tests what happened by
appending to a shared file (JOBD_TEST_SHARED, from jobd's environment).
"""

import base64
import json
import os
import signal
import socket
import sqlite3
import threading
import time

import pytest

from conftest import make_zip, unzip
from helpers import gate_script, job_dirs, job_rows, upload_body, wait_until


def shared_jobd(make_jobd, tmp_path, args=(), env=None):
    shared = tmp_path / "shared.log"
    shared.touch()
    server = make_jobd(args=list(args),
                       env={**os.environ, "JOBD_TEST_SHARED": str(shared), **(env or {})})
    return server, shared


def lines(path, word=None):
    text = path.read_text() if path.exists() else ""
    return [line for line in text.splitlines() if word is None or line.split()[0] == word]


def wait_lines(path, word, count, timeout=10):
    return wait_until(lambda: len(lines(path, word)) >= count and lines(path, word), timeout,
                      what=f"{count} {word!r} lines in {path.name}")


def job_pgid(db_file, job_id):
    """The process group jobd recorded for a running job (read-only look at its store)."""
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT pgid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row and row[0]
    finally:
        db.close()


def gone(pid):
    """True when no process `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# The attempt number of a run, counted in the shared file: the first line of every run.sh.
ATTEMPT = ('echo "start $$ $(date +%s.%N)" >> "$JOBD_TEST_SHARED"\n'
           'attempt=$(grep -c "^start" "$JOBD_TEST_SHARED")\n'
           'here="$PWD"\n')


# ==================================================================================
# kill -9
# ==================================================================================

def test_kill_9_mid_job_then_restart_runs_it_again_to_success(make_jobd, tmp_path):
    server, shared = shared_jobd(make_jobd, tmp_path)
    stale_log = tmp_path / "stale.log"
    script = ATTEMPT + (
        'if [ "$attempt" -eq 1 ]; then\n'
        # an old helper that writes into "its" directory (by absolute path) after a delay
        f'  (sleep 1.2; echo stale > "$here/stale.txt"; echo stale >> "{stale_log}") &\n'
        "  sleep 30\n"
        "fi\n"
        "sleep 2\n"  # the fresh run outlasts the old helper's delay
        "echo done > marker.txt\n")
    assert server.upload("crash", {"run.sh": script, "input.txt": "in\n"}).status == 201
    first_pid = wait_lines(shared, "start", 1)[0].split()[1]
    server.kill()
    assert job_rows(server.db) == {"crash": "RUNNING"}  # it was running when jobd died
    server.start()
    job, files = server.output("crash", timeout=20)
    assert job["Status"] == "SUCCESS", job["Message"]
    assert files["marker.txt"] == b"done\n" and files["input.txt"] == b"in\n"
    assert "stale.txt" not in files
    starts = lines(shared, "start")
    assert len(starts) == 2, starts  # exactly once more
    assert gone(first_pid)
    time.sleep(0.3)
    assert not stale_log.exists(), "the first attempt's processes were still alive"


def test_kill_9_leftover_that_left_the_job_directory_is_stopped(make_jobd, tmp_path):
    # run.sh ends while jobd is down, leaving a helper that moved to another directory:
    # nothing of the old run may write into the fresh directory.
    server, shared = shared_jobd(make_jobd, tmp_path)
    stale_log = tmp_path / "stale.log"
    jobd_dead = tmp_path / "jobd-dead"
    script = ATTEMPT + (
        'if [ "$attempt" -eq 1 ]; then\n'
        f'  (cd /; sleep 4; echo stale > "$here/stale.txt"; echo stale >> "{stale_log}") &\n'
        + gate_script(jobd_dead, "  exit 0\n") +
        "fi\n"
        "sleep 2.5\n"
        "echo done > marker.txt\n")
    assert server.upload("detached", {"run.sh": script}).status == 201
    first_pid = wait_lines(shared, "start", 1)[0].split()[1]
    helper_writes_at = time.monotonic() + 4
    # jobd records the job's process group just after starting it; a crash before that
    # leaves it only the job directory to find leftovers by (a window of a millisecond
    # that this test, killing at once, would otherwise hit now and then)
    wait_until(lambda: job_pgid(server.db, "detached") == int(first_pid), 5,
               what="jobd to record the job's process group")
    server.kill()
    jobd_dead.touch()
    wait_until(lambda: gone(first_pid), 5, what="the first run.sh to end")
    server.start()
    job, files = server.output("detached", timeout=20)
    assert job["Status"] == "SUCCESS", job["Message"]
    assert "stale.txt" not in files
    assert len(lines(shared, "start")) == 2
    time.sleep(max(0.0, helper_writes_at + 0.5 - time.monotonic()))
    assert not stale_log.exists(), "the first attempt's helper was still alive"


def test_job_interrupted_twice_ends_failed(make_jobd, tmp_path):
    server, shared = shared_jobd(make_jobd, tmp_path)
    assert server.upload("twice", {"run.sh": ATTEMPT + "sleep 30\n"}).status == 201
    wait_lines(shared, "start", 1)
    server.kill()
    server.start()
    wait_lines(shared, "start", 2)
    server.kill()
    server.start()
    resp = server.wait("twice", timeout=15)
    assert resp.status == 200
    job = resp.json()
    assert job["Status"] == "FAILED"
    assert "interrupted" in job["Message"]
    unzip(base64.b64decode(job["Output"], validate=True))  # still a zip for the client
    time.sleep(0.3)
    assert len(lines(shared, "start")) == 2  # not tried a third time
    for pid in (line.split()[1] for line in lines(shared, "start")):
        assert gone(pid)


def test_queued_jobs_survive_kill_9(make_jobd, tmp_path):
    server, shared = shared_jobd(make_jobd, tmp_path, ["--workers", "1"])
    gate = tmp_path / "gate"
    assert server.upload("long", {"run.sh": ATTEMPT + gate_script(gate)}).status == 201
    wait_lines(shared, "start", 1)
    waiting = [f"q{n}" for n in range(3)]
    for job_id in waiting:
        script = f'echo "ran {job_id}" >> "$JOBD_TEST_SHARED"\n'
        assert server.upload(job_id, {"run.sh": script}).status == 201
    assert job_rows(server.db) == {"long": "RUNNING", "q0": "QUEUED", "q1": "QUEUED",
                                   "q2": "QUEUED"}
    server.kill()
    server.start()
    wait_lines(shared, "start", 2)  # the long job runs again first (it came first)
    gate.touch()
    for job_id in ["long"] + waiting:
        assert server.output(job_id, timeout=20)[0]["Status"] == "SUCCESS"
    assert sorted(lines(shared, "ran")) == [f"ran {job_id}" for job_id in waiting]


def test_every_accepted_upload_survives_kill_9_right_after_its_201(make_jobd, tmp_path):
    server, _ = shared_jobd(make_jobd, tmp_path, ["--workers", "1"])
    big = os.urandom(400 * 1024)  # above the inline limit: the input goes to a file
    bodies = {f"acc{n}": upload_body(f"acc{n}", make_zip(
        {"run.sh": "sleep 0.05\n", "blob": big if n % 4 == 0 else os.urandom(64)}))
        for n in range(16)}
    statuses = {}

    def send(job_id):
        statuses[job_id] = server.request("POST", "/api/upload", bodies[job_id]).status

    threads = [threading.Thread(target=send, args=(job_id,)) for job_id in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    server.kill()  # at once, with jobs queued and one running
    assert statuses == {job_id: 201 for job_id in bodies}
    server.start()
    for job_id in bodies:
        job, files = server.output(job_id, timeout=30)
        assert job["Status"] == "SUCCESS", (job_id, job["Message"])
        assert files["blob"] == unzip(base64.b64decode(json.loads(bodies[job_id])["input"]))["blob"]


@pytest.mark.parametrize("size", [10, 600 * 1024], ids=["inline", "file"])
def test_single_upload_survives_kill_9_right_after_the_201(make_jobd, size):
    server = make_jobd()
    blob = os.urandom(size)
    assert server.upload("one", {"run.sh": "true\n", "blob": blob}).status == 201
    server.kill()
    server.start()
    job, files = server.output("one", timeout=15)
    assert job["Status"] == "SUCCESS" and files["blob"] == blob


# ==================================================================================
# Graceful shutdown
# ==================================================================================

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_stop_terminates_the_job_and_queues_it_again(make_jobd, tmp_path, sig):
    grace = 5
    server, shared = shared_jobd(make_jobd, tmp_path, ["--grace", str(grace)])
    script = ATTEMPT + (
        'if [ "$attempt" -eq 1 ]; then\n'
        '  trap \'echo "TERM $$" >> "$JOBD_TEST_SHARED"; exit 143\' TERM\n'
        "  i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n"
        "  exit 0\n"
        "fi\n"
        "echo second > second.txt\n")
    assert server.upload("graceful", {"run.sh": script}).status == 201
    pid = wait_lines(shared, "start", 1)[0].split()[1]
    started = time.monotonic()
    assert server.stop(sig, timeout=grace + 10) == 0
    assert time.monotonic() - started < grace + 3
    assert lines(shared, "TERM") == [f"TERM {pid}"]  # the job was asked to stop
    assert gone(pid)
    assert job_rows(server.db) == {"graceful": "QUEUED"}
    assert job_dirs(server.data) == []
    server.start()
    job, files = server.output("graceful", timeout=15)
    assert job["Status"] == "SUCCESS", job["Message"]
    assert files["second.txt"] == b"second\n"
    assert len(lines(shared, "start")) == 2


def test_job_that_ignores_sigterm_is_killed_after_the_grace(make_jobd, tmp_path):
    server, shared = shared_jobd(make_jobd, tmp_path, ["--grace", "1"])
    script = ATTEMPT + (
        'if [ "$attempt" -eq 1 ]; then\n'
        "  trap '' TERM\n"
        "  i=0; while [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n"
        "fi\n"
        "echo second > second.txt\n")
    assert server.upload("stubborn", {"run.sh": script}).status == 201
    pid = wait_lines(shared, "start", 1)[0].split()[1]
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=15) == 0
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 4, elapsed  # it waited the grace, and not much more
    assert gone(pid)
    assert job_rows(server.db) == {"stubborn": "QUEUED"}
    server.start()
    job, files = server.output("stubborn", timeout=15)
    assert job["Status"] == "SUCCESS" and files["second.txt"] == b"second\n"


def test_idle_jobd_stops_at_once_with_exit_0(make_jobd):
    server = make_jobd(args=["--grace", "5"])
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < 2


# ==================================================================================
# Retention
# ==================================================================================

def test_retention_removes_finished_jobs_but_not_running_ones(make_jobd, tmp_path):
    server, shared = shared_jobd(make_jobd, tmp_path, ["--retention", "2s"], env={"DEBUG": "true"})
    gate = tmp_path / "gate"
    # large, incompressible input and output: both are files, not database rows
    blob = os.urandom(400 * 1024)
    assert server.upload("old", {"run.sh": "cp blob copy\n", "blob": blob}).status == 201
    assert server.upload("busy", {"run.sh": gate_script(gate, "echo ok\n")}).status == 201
    server.wait("old")
    finished = time.monotonic()
    state = server.data / ".jobd"
    assert (state / "input" / "old.zip").exists() and (state / "output" / "old.zip").exists()
    assert (server.data / "old" / "copy").exists()  # DEBUG keeps the job directory
    time.sleep(1)
    assert server.get("old").status == 200  # not before its time
    wait_until(lambda: server.get("old").status == 404, 5, what="the sweep")
    assert time.monotonic() - finished < 4.5
    wait_until(lambda: not (server.data / "old").exists(), 2, what="the job directory to go")
    assert not (state / "input" / "old.zip").exists()
    assert not (state / "output" / "old.zip").exists()
    # the running job, older than the retention period, is left alone
    assert server.get("busy").status == 202
    assert job_rows(server.db) == {"busy": "RUNNING"}
    assert (server.data / "busy").exists()
    gate.touch()
    assert server.output("busy")[0]["Status"] == "SUCCESS"
    wait_until(lambda: server.get("busy").status == 404, 5, what="the sweep of busy")
    assert job_rows(server.db) == {}
    wait_until(lambda: job_dirs(server.data) == [], 2, what="busy's directory to go")


def test_a_restart_does_not_reset_the_retention_clock(make_jobd, tmp_path):
    server, _ = shared_jobd(make_jobd, tmp_path, ["--retention", "3s"])
    assert server.upload("aged", {"run.sh": "true\n"}).status == 201
    server.wait("aged")
    finished = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    time.sleep(max(0.0, 3.3 - (time.monotonic() - finished)))
    server.start()
    assert server.get("aged").status == 404  # swept at start-up, not 3 s from now
    assert job_rows(server.db) == {}


def test_retention_keeps_jobs_across_a_restart_within_the_period(make_jobd, tmp_path):
    server, _ = shared_jobd(make_jobd, tmp_path, ["--retention", "1h"])
    assert server.upload("kept", {"run.sh": "echo kept\n"}).status == 201
    server.wait("kept")
    assert server.stop(signal.SIGTERM) == 0
    server.start()
    job, files = server.output("kept")
    assert job["Status"] == "SUCCESS" and files["jobd.stdout"] == b"kept\n"


def test_kill_9_during_an_upload_leaves_nothing_after_restart(make_jobd):
    server = make_jobd()
    body = upload_body("midway", make_zip({"run.sh": "true\n", "p": os.urandom(2 << 20)}))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /api/upload HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body[: len(body) // 2].encode())
    spill = server.data / ".jobd" / "tmp"
    wait_until(lambda: spill.is_dir() and os.listdir(spill), 10,
               what="the upload to spill to a file")
    server.kill()
    sock.close()
    server.start()
    assert server.get("midway").status == 404
    assert job_rows(server.db) == {}
    assert [p for p in (server.data / ".jobd").rglob("*") if p.is_file()] == []

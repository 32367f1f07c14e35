"""jobd as a job-orchestrator "client", driven the way the orchestrator's server mode does it.

tests/orchestrator_sim.py replays the server (reqwest-shaped multipart uploads, 500 ms polls of
/retrieve, a new connection per request, only `200 application/zip` counts as done, the JSON
status is copied otherwise, polling stops at any status it does not poll). Every wait is bounded.
"""

import http.client
import io
import json
import os
import shutil
import socket
import sqlite3
import sys
import threading
import time
import zipfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import orchestrator_sim as sim  # noqa: E402

ID_EPOCH = 1735689600  # 2025-01-01T00:00:00Z: ids are never ahead of the seconds since then
U32_MAX = 2 ** 32 - 1


# -- helpers ---------------------------------------------------------------------------------

def orchestrator(jobd, **kw):
    return sim.Orchestrator(f"http://127.0.0.1:{jobd.port}", request_timeout=30, **kw)


def submit(orch, files):
    """Upload {relative path: bytes} exactly as the orchestrator does; the Payload answered."""
    boundary = sim.new_boundary()
    length, chunks = sim.encode_form(files, boundary)
    resp = orch.request("POST", orch.upload_url, body=chunks, length=length,
                        headers=[("content-type", f"multipart/form-data; boundary={boundary}")])
    assert resp.status == 200, (resp.status, resp.body)
    payload = sim.parse_payload(resp.body)  # raises where the orchestrator's serde would fail
    assert 1 <= payload["id"] <= time.time() - ID_EPOCH, payload
    orch.status[payload["id"]] = "Submitted"  # what the orchestrator's sender records
    return payload


def unzip(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def wait_for(condition, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s")


def alive(pid):
    """Whether a process exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def job_count(jobd):
    with sqlite3.connect(f"file:{jobd.db}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM jobs").fetchone()[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_request(port, head, body=b"", shut_write=False):
    """Send bytes as they are; (status, headers, body, closed) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        data = resp.read()
        closed = resp.will_close
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, closed


# -- the happy path ------------------------------------------------------------------------

def test_submission_of_several_files_then_the_zip(jobd):
    orch = orchestrator(jobd)
    files = {
        "run.sh": b"cat a.txt b.txt > out.txt\nwc -c < big.bin\n",
        "inputs/a.txt": b"alpha\n",
        "deep/er/b.txt": b"beta\n",
        "big.bin": os.urandom(3 << 20),
        "with space/and%.txt": b"odd name\n",
    }
    payload = submit(orch, files)
    assert payload["status"] == "Prepared" and payload["input"] == {}
    assert payload["loc"].endswith(f"/{payload['id']}") and payload["killed"] is False
    job = payload["id"]

    status, result = orch.poll_until_final(job, timeout=30)
    assert status == "Completed", orch.history[job]
    assert {s for _, s in orch.history[job][:-1]} <= {"Running"}  # never Prepared or Queued
    out = unzip(result)
    assert set(out) == {"run.sh", "a.txt", "b.txt", "big.bin", "and%.txt", "out.txt",
                        "jobd.stdout", "jobd.stderr"}
    assert out["out.txt"] == b"alpha\nbeta\n"
    assert out["big.bin"] == files["big.bin"] and out["and%.txt"] == b"odd name\n"
    assert out["jobd.stdout"].strip() == str(3 << 20).encode()

    # The same job through jobd's own APIs, under the number in decimal.
    resp = jobd.get(str(job))
    assert resp.status == 200 and resp.json()["Status"] == "SUCCESS"
    assert jobd.request("GET", f"/api/jobs/{job}").json()["Status"] == "SUCCESS"
    head = jobd.request("HEAD", f"/retrieve/{job}")
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Type"] == "application/zip"
    assert int(head.headers["Content-Length"]) == len(result)


def test_a_script_written_for_the_orchestrators_client_runs_unchanged(jobd):
    # No #! line, bash features, the exit file its client needs: run with bash, as there.
    script = (b"trap 'echo $? > .orchestrator.exit' EXIT\n"
              b"words=(one two three)\n"
              b"[[ ${#words[@]} -eq 3 ]] && echo \"${words[1]}\" > out.txt\n")
    # An older server (src/services/server.rs before Prepared was polled) polls only these.
    orch = orchestrator(jobd, polled=("Submitted", "Running"))
    job = submit(orch, {"run.sh": script})["id"]
    status, result = orch.poll_until_final(job, timeout=30)
    assert status == "Completed", orch.history[job]
    out = unzip(result)
    assert out["out.txt"] == b"two\n" and out[".orchestrator.exit"] == b"0\n"


def test_duplicate_names_keep_the_last(jobd):
    orch = orchestrator(jobd, poll_interval=0.1)
    job = submit(orch, {"a/x.txt": b"first", "run.sh": b"cat x.txt\n", "b/x.txt": b"second"})["id"]
    status, result = orch.poll_until_final(job, timeout=30)
    assert status == "Completed"
    assert unzip(result)["jobd.stdout"] == b"second"
    assert any("submission duplicate file" in line and "x.txt" in line for line in jobd.lines)


def test_concurrent_submissions_get_distinct_ids(jobd):
    orch = orchestrator(jobd, poll_interval=0.1)
    payloads, errors = [], []

    def one(n):
        try:
            payloads.append(submit(orch, {"run.sh": f"echo {n}\n".encode()}))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and len(payloads) == 4
    assert len({p["id"] for p in payloads}) == 4
    for p in payloads:
        assert orch.poll_until_final(p["id"], timeout=30)[0] == "Completed"


# -- failure, kill, partial results ---------------------------------------------------------

def test_failed_job_is_failed_and_its_partial_zip_still_works(jobd):
    orch = orchestrator(jobd)
    job = submit(orch, {"run.sh": b"echo half > half.txt\necho oops >&2\nexit 3\n"})["id"]
    assert orch.poll_until_final(job, timeout=30) == ("Failed", None)
    out = unzip(orch.partial(job))
    assert out["half.txt"] == b"half\n" and out["jobd.stderr"] == b"oops\n"
    job_object = jobd.get(str(job)).json()
    assert job_object["Status"] == "FAILED" and job_object["ExitCode"] == 3


def test_a_job_past_the_servers_time_limit_is_failed(make_jobd):
    jobd = make_jobd(args=["--timeout", "1s", "--grace", "1s"])
    orch = orchestrator(jobd)
    job = submit(orch, {"run.sh": b"sleep 60\n"})["id"]
    assert orch.poll_until_final(job, timeout=15) == ("Failed", None)
    assert "timed out" in jobd.get(str(job)).json()["Message"]


def test_partial_retrieve_while_running(jobd):
    orch = orchestrator(jobd)
    script = (b"echo step1 > progress.txt\necho hello\n"
              b"for i in $(seq 400); do [ -e go ] && break; sleep 0.05; done\n"
              b"echo step2 >> progress.txt\n")
    job = submit(orch, {"run.sh": script})["id"]

    def progress():
        out = unzip(orch.partial(job))
        return out if out.get("progress.txt") == b"step1\n" else None

    out = wait_for(progress, 15, "progress.txt in the partial zip")
    assert out["run.sh"] == script
    assert orch.poll_once(job) == "Running"
    payload = sim.parse_payload(orch.request("GET", f"{orch.download_url}/{job}").body)
    assert alive(payload["pid"]) and payload["loc"] == str(jobd.data / str(job))
    (jobd.data / str(job) / "go").write_bytes(b"")
    status, result = orch.poll_until_final(job, timeout=30)
    assert status == "Completed"
    assert unzip(result)["progress.txt"] == b"step1\nstep2\n"


def test_kill_of_a_running_job_kills_all_its_processes(make_jobd):
    jobd = make_jobd(args=["--grace", "1s"])
    orch = orchestrator(jobd)
    script = (b"sleep 300 &\necho $! >> pids\n"
              b"(trap '' TERM; exec sleep 301) &\necho $! >> pids\n"  # needs the SIGKILL
              b"bash -c 'sleep 302 & echo $! >> pids; wait' &\necho $! >> pids\n"
              b"echo $$ >> pids\n"
              b"wait\n")
    job = submit(orch, {"run.sh": script})["id"]

    def started():
        lines = unzip(orch.partial(job)).get("pids", b"").split()
        return [int(pid) for pid in lines] if len(lines) == 5 else None

    pids = wait_for(started, 15, "the job's five processes")
    assert all(alive(pid) for pid in pids)

    began = time.monotonic()
    resp = orch.request("POST", f"{orch.terminate_url}/{job}")
    assert resp.status == 200 and resp.body == b""
    assert time.monotonic() - began < 1.0  # answered at once, not after the grace period
    orch.status[job] = "Killed"  # what the orchestrator records on a 2xx, and stops polling

    wait_for(lambda: not any(alive(pid) for pid in pids), 15, "every process of the job gone")
    assert orch.poll_until_final(job, timeout=5) == ("Killed", None)  # no longer polled
    assert wait_for(lambda: orch.poll_once(job) == "Killed", 15, "/retrieve says Killed")
    assert orch.kill(job)  # again: nothing to stop, still 200
    assert jobd.get(str(job)).json()["Status"] == "CANCELLED"


def test_kill_of_a_waiting_job_means_it_never_starts(make_jobd):
    jobd = make_jobd(args=["--workers", "1", "--grace", "1s"])
    orch = orchestrator(jobd)
    first = submit(orch, {"run.sh": b"sleep 60\n"})["id"]
    second = submit(orch, {"run.sh": b"touch ran\n"})["id"]
    wait_for(lambda: jobd.request("GET", f"/api/jobs/{first}").json()["Status"] == "RUNNING",
             15, "the first job running")
    assert orch.poll_once(second) == "Running"  # waiting jobs are Running to the orchestrator
    assert orch.kill(second)
    assert orch.poll_once(second) == "Killed"
    assert orch.kill(first)
    assert wait_for(lambda: orch.poll_once(first) == "Killed", 15, "the first job killed")
    time.sleep(0.3)  # the worker is free again: the cancelled job must still not start
    status = jobd.request("GET", f"/api/jobs/{second}").json()
    assert status["Status"] == "CANCELLED" and status["StartedAt"] is None
    assert "ran" not in unzip(orch.partial(second))


# -- restarts, wiped stores, retention --------------------------------------------------------

@pytest.mark.parametrize("how", ["stop", "crash"])
def test_restart_of_jobd_between_polls(make_jobd, how):
    jobd = make_jobd(args=["--port", str(free_port())])
    orch = orchestrator(jobd)
    job = submit(orch, {"run.sh": b"sleep 1.5\necho done > out.txt\n"})["id"]
    assert orch.poll_once(job) == "Running"
    jobd.stop() if how == "stop" else jobd.kill()
    assert orch.poll_once(job) == "Running"  # no answer: unchanged, polled again
    assert orch.history[job][-1] == (None, None)
    jobd.start()
    status, result = orch.poll_until_final(job, timeout=30)
    assert status == "Completed", orch.history[job]
    assert unzip(result)["out.txt"] == b"done\n"
    assert submit(orch, {"run.sh": b"true\n"})["id"] > job  # ids continue


def test_ids_are_never_reused_even_after_the_store_is_wiped(make_jobd):
    jobd = make_jobd(args=["--port", str(free_port())])
    orch = orchestrator(jobd)
    before = [submit(orch, {"run.sh": b"true\n"})["id"] for _ in range(2)]
    jobd.stop()
    shutil.rmtree(jobd.data)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{jobd.db}{suffix}"):
            os.remove(f"{jobd.db}{suffix}")
    jobd.start()  # at once: a new store within the same second must not reuse ids
    after = submit(orch, {"run.sh": b"true\n"})["id"]
    assert after > max(before)
    for old in before:  # issued, and no longer held: Cleaned, final for the orchestrator
        assert orch.poll_once(old) == "Cleaned"
        assert orch.kill(old)
    never = after + 1_000_000
    resp = orch.request("GET", f"{orch.download_url}/{never}")
    assert resp.status == 404 and sim.parse_payload(resp.body)["status"] == "Unknown"
    assert json.loads(resp.body)["id"] == 0
    assert orch.request("POST", f"{orch.terminate_url}/{never}").status == 404


def test_an_id_taken_through_another_api_is_skipped(jobd):
    orch = orchestrator(jobd, poll_interval=0.1)
    first = submit(orch, {"run.sh": b"true\n"})["id"]
    assert jobd.upload(str(first + 1), {"run.sh": "true\n"}).status == 201
    second = submit(orch, {"run.sh": b"echo mine\n"})["id"]
    assert second == first + 2
    assert unzip(orch.poll_until_final(second, timeout=30)[1])["jobd.stdout"] == b"mine\n"
    # The Go-API job is not the orchestrator's: its number answers as one jobd no longer holds.
    assert orch.poll_once(first + 1) == "Cleaned"


def test_jobs_removed_by_retention_are_cleaned(make_jobd):
    jobd = make_jobd(args=["--retention", "2s"])
    orch = orchestrator(jobd)
    job = submit(orch, {"run.sh": b"echo hi\n"})["id"]
    assert orch.poll_until_final(job, timeout=30)[0] == "Completed"
    assert wait_for(lambda: orch.poll_once(job) == "Cleaned", 15, "Cleaned after retention",
                    interval=0.5)
    assert orch.request("GET", f"http://127.0.0.1:{jobd.port}/retrieve_partial/{job}").status == 404
    assert orch.kill(job)
    assert jobd.get(str(job)).status == 404


# -- refused and malformed submissions ---------------------------------------------------------

def test_refused_content_is_invalid(jobd):
    orch = orchestrator(jobd, poll_interval=0.1)
    no_run_sh = submit(orch, {"input.txt": b"data"})
    empty = submit(orch, {})  # an empty job folder: an empty body, Content-Length 0
    assert no_run_sh["status"] == empty["status"] == "Invalid"
    for payload in (no_run_sh, empty):
        assert orch.poll_until_final(payload["id"], timeout=10) == ("Invalid", None)
        assert orch.poll_once(payload["id"]) == "Invalid"  # it stays Invalid
    job_object = jobd.get(str(no_run_sh["id"])).json()
    assert job_object["Status"] == "FAILED" and "no run.sh" in job_object["Message"]
    assert orch.kill(no_run_sh["id"])
    assert unzip(orch.partial(no_run_sh["id"])) == {}

    boundary = "b0undary"
    for filename in ("..", "dir/", "a\\\\."):  # the last is a\. once unquoted
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="x"; filename="{filename}"'
                f'\r\n\r\necho hi\r\n--{boundary}\r\nContent-Disposition: form-data; name="run.sh";'
                f' filename="run.sh"\r\n\r\necho hi\r\n--{boundary}--\r\n').encode()
        resp = jobd.request("POST", "/submit", body,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert resp.status == 200 and resp.json()["status"] == "Invalid", (filename, resp)
        assert "unsafe file name" in jobd.get(str(resp.json()["id"])).json()["Message"]


GOOD_BOUNDARY = "0123456789abcdef-0123456789abcdef-0123456789abcdef-0123456789abcdef"


def good_body():
    return b"".join(sim.encode_form({"run.sh": b"echo ok\n", "a/b.txt": b"b"}, GOOD_BOUNDARY)[1])


def head_for(length, content_type):
    lines = ["POST /submit HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {length}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_malformed_multipart_is_400_and_creates_no_job(jobd):
    body = good_body()
    huge_headers = (f"--{GOOD_BOUNDARY}\r\nContent-Disposition: form-data; name=\"a\"; "
                    f"filename=\"a\"\r\nX-Big: ").encode() + b"y" * 100_000
    multipart = f"multipart/form-data; boundary={GOOD_BOUNDARY}"
    cases = {  # name: (Content-Type, body, Content-Length if not the body's)
        "truncated": (multipart, body[:len(body) // 2], None),
        "ends before its Content-Length": (multipart, body[:-20], len(body)),
        "no boundary": ("multipart/form-data", body, None),
        "not multipart": ("application/json", body, None),
        "no Content-Type": (None, body, None),
        "wrong boundary": ("multipart/form-data; boundary=other", body, None),
        "huge part headers": (multipart, huge_headers, None),
        "LF line endings": (multipart, body.replace(b"\r\n", b"\n"), None),
        "garbage": (multipart, b"hello world", None),
    }
    for name, (content_type, data, length) in cases.items():
        head = head_for(len(data) if length is None else length, content_type)
        status, headers, answer, closed = raw_request(jobd.port, head, data,
                                                      shut_write=length is not None)
        assert status == 400, (name, answer)
        assert headers.get("connection") == "close" and closed, name
        assert json.loads(answer)["status"] == 400, name

    assert job_count(jobd) == 0
    assert os.listdir(jobd.data / ".jobd" / "tmp") == []  # no staging folder left behind
    assert jobd.request("GET", "/").json() == {"message": "pong"}
    orch = orchestrator(jobd, poll_interval=0.1)
    job = submit(orch, {"run.sh": b"echo fine\n"})["id"]
    assert unzip(orch.poll_until_final(job, timeout=30)[1])["jobd.stdout"] == b"fine\n"


# -- ids, status codes, the small routes ------------------------------------------------------

def test_bad_and_unknown_ids(jobd):
    for path in ("/retrieve/abc", "/retrieve/0", "/retrieve/-1", "/retrieve/1.5",
                 f"/retrieve/{U32_MAX + 1}", "/retrieve/%2B1", "/retrieve_partial/x"):
        assert jobd.request("GET", path).status == 400, path
    assert jobd.request("POST", "/kill/abc").status == 400
    for method, path in (("GET", f"/retrieve/{U32_MAX}"), ("GET", f"/retrieve_partial/{U32_MAX}"),
                         ("POST", f"/kill/{U32_MAX}")):
        resp = jobd.request(method, path)
        assert resp.status == 404, path
        assert resp.json() == {"id": 0, "input": {}, "status": "Unknown", "loc": "", "pid": 0,
                               "killed": False}
    # Numbers up to now may have been issued by a store that was wiped: Cleaned, not 404.
    assert jobd.request("GET", "/retrieve/1").json()["status"] == "Cleaned"
    assert jobd.request("GET", "/submit").status == 405


def test_ping_load_and_health(jobd):
    assert jobd.request("GET", "/").json() == {"message": "pong"}
    for _ in range(2):
        resp = jobd.request("GET", "/load")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
        load = json.loads(resp.body)
        assert isinstance(load, (int, float)) and 0 <= load <= 100
    resp = jobd.request("GET", "/health")
    assert resp.status == 200 and resp.json() == {"status": "ok", "database": "ok"}
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{jobd.db}{suffix}"):
            os.remove(f"{jobd.db}{suffix}")
    assert jobd.request("GET", "/health").status == 503
    assert jobd.request("GET", "/").json() == {"message": "pong"}  # still serving


def test_with_a_token_the_job_routes_need_it_in_the_urls(make_jobd):
    jobd = make_jobd(env={**os.environ, "JOBD_TOKEN": "s3cret"})
    bare = orchestrator(jobd)
    with pytest.raises(sim.UploadFailed, match="401"):
        bare.submit({"run.sh": b"true\n"})
    for method, path in (("GET", "/retrieve/1"), ("GET", "/retrieve_partial/1"),
                         ("POST", "/kill/1")):
        assert jobd.request(method, path).status == 401, path
    for path in ("/", "/load", "/health"):  # probes, like /healthz, need no token
        assert jobd.request("GET", path).status == 200, path
    assert jobd.request("GET", "/retrieve/1", headers={"Authorization": "Bearer s3cret"}
                        ).json()["status"] == "Cleaned"

    # The orchestrator carries it in its URLs: SERVICE_X_UPLOAD_URL=http://jobd:s3cret@host/submit
    orch = sim.Orchestrator(f"http://jobd:s3cret@127.0.0.1:{jobd.port}", request_timeout=30)
    job = submit(orch, {"run.sh": b"echo ok > out.txt\nsleep 0.5\n"})["id"]
    assert unzip(orch.partial(job)).get("run.sh") == b"echo ok > out.txt\nsleep 0.5\n"
    status, result = orch.poll_until_final(job, timeout=30)
    assert status == "Completed" and unzip(result)["out.txt"] == b"ok\n"
    assert orch.kill(job)
    token_as_user = sim.Orchestrator(f"http://s3cret@127.0.0.1:{jobd.port}", request_timeout=30)
    assert token_as_user.poll_once(job) == "Completed"
    wrong = sim.Orchestrator(f"http://jobd:guess@127.0.0.1:{jobd.port}", request_timeout=30)
    assert wrong.request("GET", f"{wrong.download_url}/{job}").status == 401
    assert not wrong.kill(job)

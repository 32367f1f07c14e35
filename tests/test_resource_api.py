"""The resource API beside the Go one: /api/jobs (raw zips, status, output, logs, cancel,
delete, list), through HTTP against a real jobd."""

import http.client
import json
import os
import socket
import threading
import time

import pytest
from conftest import make_zip, unzip
from helpers import alive, gate_script, status, wait_status, wait_until

STATUS_KEYS = ["LastUpdated", "ID", "Status", "Path", "Message", "SlurmID", "Slurml",
               "ExitCode", "CreatedAt", "StartedAt", "FinishedAt", "InputBytes", "OutputBytes"]


def put(jobd, job_id, files=None, zip_bytes=None, headers=None):
    body = zip_bytes if zip_bytes is not None else make_zip(files or {"run.sh": "true\n"})
    return jobd.request("PUT", f"/api/jobs/{job_id}", body,
                        {"Content-Type": "application/zip", **(headers or {})})


def wait_for_file(path, timeout=10):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def files_under(path):
    return sorted(os.path.relpath(os.path.join(root, name), path)
                  for root, _, names in os.walk(path) for name in names)


# ---- upload ----------------------------------------------------------------------------

def test_put_stores_and_runs_the_zip(jobd):
    resp = put(jobd, "raw1", {"run.sh": "echo raw > made.txt\n", "in/data.txt": "x"})
    assert resp.status == 201, resp
    assert resp.headers["Location"] == "/api/jobs/raw1"
    body = resp.json()
    assert list(body) == STATUS_KEYS
    assert body["ID"] == "raw1" and body["Status"] == "QUEUED" and body["InputBytes"] > 0
    done = wait_status(jobd, "raw1", {"SUCCESS"})
    assert done["ExitCode"] == 0 and done["OutputBytes"] > 0 and done["FinishedAt"]
    output = jobd.request("GET", "/api/jobs/raw1/output")
    assert output.status == 200 and output.headers["Content-Type"] == "application/zip"
    files = unzip(output.body)
    assert files["made.txt"] == b"raw\n" and files["in/data.txt"] == b"x"
    assert len(output.body) == done["OutputBytes"]


def test_post_picks_a_unique_id(jobd):
    ids = set()
    for _ in range(3):
        resp = jobd.request("POST", "/api/jobs", make_zip({"run.sh": "true\n"}))
        assert resp.status == 201, resp
        ids.add(resp.json()["ID"])
        assert resp.headers["Location"] == f"/api/jobs/{resp.json()['ID']}"
    assert len(ids) == 3


def test_put_of_an_existing_id_is_409_without_reading_the_body(jobd):
    assert put(jobd, "dup").status == 201
    sock = socket.create_connection(("127.0.0.1", jobd.port), timeout=10)
    # A huge announced body that is never sent: the answer must not wait for it.
    sock.sendall(b"PUT /api/jobs/dup HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n")
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 409"), answer
    assert b'"error":"conflict"' in answer


def test_put_above_the_upload_cap_is_413_without_reading_the_body(make_jobd):
    jobd = make_jobd(args=["--max-upload", "1M"])
    sock = socket.create_connection(("127.0.0.1", jobd.port), timeout=10)
    sock.sendall(b"PUT /api/jobs/big HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n")
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert jobd.request("GET", "/api/jobs/big").status == 404


def test_put_of_a_bad_zip_is_400_and_stores_nothing(jobd):
    for body in (b"not a zip", make_zip({"readme.txt": "no run.sh"}), b""):
        resp = put(jobd, "bad", zip_bytes=body)
        assert resp.status == 400, resp
        assert set(resp.json()) == {"error", "message", "status"}
    assert jobd.request("GET", "/api/jobs/bad").status == 404
    assert files_under(jobd.data / ".jobd") == []


def test_put_accepts_a_chunked_body(jobd):
    body = make_zip({"run.sh": "echo chunked\n"})
    conn = http.client.HTTPConnection("127.0.0.1", jobd.port, timeout=10)
    conn.putrequest("PUT", "/api/jobs/chunky")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for part in (body[:10], body[10:]):
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 201, resp.read()
    conn.close()
    assert wait_status(jobd, "chunky", {"SUCCESS"})


# ---- status and output -----------------------------------------------------------------

def test_status_is_small_and_404_for_unknown(jobd):
    assert put(jobd, "s1", {"run.sh": "head -c 100000 /dev/zero > zeros\n"}).status == 201
    done = wait_status(jobd, "s1", {"SUCCESS"})
    assert list(done) == STATUS_KEYS
    assert "Output" not in done and "Input" not in done
    missing = jobd.request("GET", "/api/jobs/nope")
    assert missing.status == 404 and missing.json() == {
        "error": "not_found", "message": "job not found", "status": 404}


def test_output_is_202_with_retry_after_until_finished(jobd):
    assert put(jobd, "slow", {"run.sh": "sleep 1\n"}).status == 201
    early = jobd.request("GET", "/api/jobs/slow/output")
    assert early.status == 202 and early.headers["Retry-After"] == "1"
    assert early.json()["Status"] in ("QUEUED", "RUNNING")
    wait_status(jobd, "slow", {"SUCCESS"})
    assert jobd.request("GET", "/api/jobs/slow/output").status == 200


def test_output_head_range_and_etag(jobd):
    script = "head -c 300000 /dev/urandom > random.bin\n"
    assert put(jobd, "r", {"run.sh": script}).status == 201
    wait_status(jobd, "r", {"SUCCESS"})
    full = jobd.request("GET", "/api/jobs/r/output")
    size, etag = len(full.body), full.headers["ETag"]
    head = jobd.request("HEAD", "/api/jobs/r/output")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["Content-Length"]) == size and head.headers["ETag"] == etag
    # An interrupted download resumes with Range and reassembles to the same bytes.
    first = jobd.request("GET", "/api/jobs/r/output", headers={"Range": "bytes=0-99999"})
    rest = jobd.request("GET", "/api/jobs/r/output",
                        headers={"Range": "bytes=100000-", "If-Range": etag})
    assert first.status == 206 and rest.status == 206
    assert first.headers["Content-Range"] == f"bytes 0-99999/{size}"
    assert rest.headers["Content-Range"] == f"bytes 100000-{size - 1}/{size}"
    assert first.body + rest.body == full.body
    tail = jobd.request("GET", "/api/jobs/r/output", headers={"Range": "bytes=-10"})
    assert tail.status == 206 and tail.body == full.body[-10:]
    beyond = jobd.request("GET", "/api/jobs/r/output", headers={"Range": f"bytes={size}-"})
    assert beyond.status == 416 and beyond.headers["Content-Range"] == f"bytes */{size}"
    stale = jobd.request("GET", "/api/jobs/r/output",
                         headers={"Range": "bytes=0-9", "If-Range": '"other"'})
    assert stale.status == 200 and stale.body == full.body
    cached = jobd.request("GET", "/api/jobs/r/output", headers={"If-None-Match": etag})
    assert cached.status == 304 and cached.body == b""


# ---- logs ------------------------------------------------------------------------------

def test_logs_so_far_and_after_the_end(jobd):
    script = "echo out1\necho err1 >&2\nsleep 2\necho out2\n"
    assert put(jobd, "logs", {"run.sh": script}).status == 201
    wait_status(jobd, "logs", {"RUNNING"})
    deadline = time.monotonic() + 5
    while jobd.request("GET", "/api/jobs/logs/logs/stdout").body != b"out1\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status(jobd, "logs")["Status"] == "RUNNING"
    assert jobd.request("GET", "/api/jobs/logs/logs/stderr").body == b"err1\n"
    wait_status(jobd, "logs", {"SUCCESS"})
    after = jobd.request("GET", "/api/jobs/logs/logs/stdout")
    assert after.status == 200 and after.body == b"out1\nout2\n"
    assert after.headers["Content-Type"].startswith("text/plain")


def test_follow_streams_lines_while_the_job_runs(jobd):
    script = "for i in 1 2 3; do echo line $i; sleep 0.7; done\n"
    assert put(jobd, "follow", {"run.sh": script}).status == 201
    conn = http.client.HTTPConnection("127.0.0.1", jobd.port, timeout=20)
    conn.request("GET", "/api/jobs/follow/logs/stdout?follow=1")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
    first = resp.readline()
    assert first == b"line 1\n"
    assert status(jobd, "follow")["Status"] == "RUNNING"  # it came while the job ran
    rest = resp.read()  # ends when the job ends
    assert rest == b"line 2\nline 3\n"
    assert status(jobd, "follow")["Status"] == "SUCCESS"
    conn.close()


def test_logs_from_an_offset(make_jobd):
    """?offset=N leaves out the first N bytes, with or without follow, queued, running or
    ended, and says so in Jobd-Log-Offset; anything but a number of bytes is a 400."""
    jobd = make_jobd(args=["--workers", "1"])
    assert put(jobd, "first", {"run.sh": "printf 'first\\n'; sleep 1; printf 'second\\n'\n"}).status == 201
    assert put(jobd, "queued", {"run.sh": "echo from queued\n"}).status == 201
    queued = {}
    reader = threading.Thread(target=lambda: queued.update(
        resp=jobd.request("GET", "/api/jobs/queued/logs/stdout?follow=1&offset=5")))
    reader.start()
    wait_status(jobd, "first", {"RUNNING"})
    deadline = time.monotonic() + 5
    while jobd.request("GET", "/api/jobs/first/logs/stdout").body != b"first\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    running = jobd.request("GET", "/api/jobs/first/logs/stdout?follow=1&offset=3")
    assert running.status == 200 and running.body == b"st\nsecond\n"
    assert running.headers["Jobd-Log-Offset"] == "3"
    ended = jobd.request("GET", "/api/jobs/first/logs/stdout?offset=6")
    assert ended.body == b"second\n" and ended.headers["Content-Length"] == "7"
    beyond = jobd.request("GET", "/api/jobs/first/logs/stdout?offset=100")
    assert beyond.status == 200 and beyond.body == b"" and beyond.headers["Jobd-Log-Offset"] == "100"
    assert jobd.request("GET", "/api/jobs/first/logs/stdout?offset=100&follow=1").body == b""
    huge = jobd.request("GET", "/api/jobs/first/logs/stdout?offset=999999999999999999&follow=1")
    assert huge.status == 200 and huge.body == b""
    reader.join(20)
    assert queued["resp"].status == 200 and queued["resp"].body == b"queued\n"
    for bad in ("-1", "abc", "1.5", "%D9%A3", "1" * 19, "9" * 5000):
        refused = jobd.request("GET", f"/api/jobs/first/logs/stdout?offset={bad}")
        assert refused.status == 400 and "offset" in refused.json()["message"], bad


def test_follow_of_a_queued_job_waits_for_it(make_jobd):
    jobd = make_jobd(args=["--workers", "1"])
    assert put(jobd, "first", {"run.sh": "sleep 1\n"}).status == 201
    assert put(jobd, "second", {"run.sh": "echo from second\n"}).status == 201
    assert status(jobd, "second")["Status"] == "QUEUED"
    resp = jobd.request("GET", "/api/jobs/second/logs/stdout?follow=1")
    assert resp.status == 200 and resp.body == b"from second\n"


# ---- cancel and delete -----------------------------------------------------------------

SPAWNER = """\
trap 'echo TERM >> signals' TERM
sleep 300 & echo $! >> pids
(sleep 300; echo late > late.txt) & echo $! >> pids
echo started > started
wait
"""


def test_cancel_of_a_running_job_kills_its_children(jobd, tmp_path):
    assert put(jobd, "c1", {"run.sh": SPAWNER}).status == 201
    job_dir = jobd.data / "c1"
    wait_for_file(job_dir / "started")
    pids = [int(line) for line in (job_dir / "pids").read_text().split()]
    assert all(alive(pid) for pid in pids)
    resp = jobd.request("POST", "/api/jobs/c1/cancel")
    assert resp.status == 200, resp
    assert resp.json()["Status"] == "CANCELLED"
    assert not any(alive(pid) for pid in pids)
    job, files = jobd.output("c1")  # the Go API reports it as finished
    assert job["Status"] == "CANCELLED"
    assert "run.sh" in files and "late.txt" not in files
    assert jobd.request("POST", "/api/jobs/c1/cancel").status == 200  # twice is fine


ESCAPER = "setsid sh -c 'echo $$ > \"$0\"; exec sleep 300' %s &\n"


def test_a_process_that_left_the_job_group_dies_with_the_job(jobd, tmp_path):
    """setsid takes a process out of the job's process group (and session); one still
    working in the job's directory is killed once the job has ended, as it is cancelled
    or as it finishes."""
    for job_id, end in (("esc-cancel", "echo started > started; sleep 300"), ("esc-end", "true")):
        pid_file = tmp_path / f"{job_id}.pid"
        script = ESCAPER % pid_file + gate_script(pid_file, end)
        assert put(jobd, job_id, {"run.sh": script}).status == 201
        if job_id == "esc-cancel":
            wait_for_file(jobd.data / job_id / "started")
            assert jobd.request("POST", f"/api/jobs/{job_id}/cancel").status == 200
        job = wait_status(jobd, job_id, {"SUCCESS", "CANCELLED"})
        assert job["Status"] == ("CANCELLED" if job_id == "esc-cancel" else "SUCCESS"), job
        escaped = int(pid_file.read_text())
        wait_until(lambda: not alive(escaped), 10,
                   what=f"{job_id}: the end of the escaped process {escaped}")


def test_cancel_of_a_queued_job_means_it_never_starts(make_jobd):
    jobd = make_jobd(args=["--workers", "1"])
    assert put(jobd, "busy", {"run.sh": "sleep 1\n"}).status == 201
    wait_status(jobd, "busy", {"RUNNING"})
    assert put(jobd, "waiting", {"run.sh": "echo ran > ran.txt\n"}).status == 201
    resp = jobd.request("POST", "/api/jobs/waiting/cancel")
    assert resp.status == 200 and resp.json()["Status"] == "CANCELLED"
    wait_status(jobd, "busy", {"SUCCESS"})
    time.sleep(0.3)
    final = status(jobd, "waiting")
    assert final["Status"] == "CANCELLED" and final["StartedAt"] is None
    out = jobd.request("GET", "/api/jobs/waiting/output")
    assert out.status == 200 and "ran.txt" not in unzip(out.body)


def test_cancel_of_a_finished_job_is_409_and_unknown_is_404(jobd):
    assert put(jobd, "fin").status == 201
    wait_status(jobd, "fin", {"SUCCESS"})
    resp = jobd.request("POST", "/api/jobs/fin/cancel")
    assert resp.status == 409 and resp.json()["error"] == "conflict"
    assert jobd.request("POST", "/api/jobs/nobody/cancel").status == 404


def test_delete_of_a_running_job_removes_everything(jobd):
    big_input = {"run.sh": SPAWNER, "data.bin": os.urandom(400_000)}  # a file-backed input
    assert put(jobd, "d1", big_input).status == 201
    job_dir = jobd.data / "d1"
    wait_for_file(job_dir / "started")
    pids = [int(line) for line in (job_dir / "pids").read_text().split()]
    resp = jobd.request("DELETE", "/api/jobs/d1")
    assert resp.status == 204 and resp.body == b""
    assert not any(alive(pid) for pid in pids)
    assert jobd.request("GET", "/api/jobs/d1").status == 404
    assert jobd.get("d1").status == 404
    deadline = time.monotonic() + 5
    while files_under(jobd.data) and time.monotonic() < deadline:
        time.sleep(0.05)  # the trash is emptied in the background
    assert files_under(jobd.data) == []
    assert jobd.request("DELETE", "/api/jobs/d1").status == 404


# ---- list ------------------------------------------------------------------------------

def test_list_newest_first_with_filter_and_paging(jobd):
    for i in range(7):
        assert put(jobd, f"l{i}").status == 201
    for i in range(7):
        wait_status(jobd, f"l{i}", {"SUCCESS"})
    assert put(jobd, "lfail", {"run.sh": "exit 2\n"}).status == 201
    wait_status(jobd, "lfail", {"FAILED"})
    first = jobd.request("GET", "/api/jobs?limit=3").json()
    assert [job["ID"] for job in first["Jobs"]] == ["lfail", "l6", "l5"]
    assert list(first["Jobs"][0]) == STATUS_KEYS
    seen = [job["ID"] for job in first["Jobs"]]
    cursor = first["Next"]
    while cursor:
        page = jobd.request("GET", f"/api/jobs?limit=3&cursor={cursor}").json()
        seen += [job["ID"] for job in page["Jobs"]]
        cursor = page["Next"]
    assert seen == ["lfail"] + [f"l{i}" for i in range(6, -1, -1)]
    failed = jobd.request("GET", "/api/jobs?status=FAILED").json()
    assert [job["ID"] for job in failed["Jobs"]] == ["lfail"] and failed["Next"] is None
    for bad in ("status=DONE", "limit=0", "limit=x", "cursor=%%%"):
        resp = jobd.request("GET", f"/api/jobs?{bad}")
        assert resp.status == 400, (bad, resp)


def test_paging_while_jobs_are_added_never_repeats_or_skips(jobd):
    before = [f"old{i}" for i in range(30)]
    for job_id in before:
        assert put(jobd, job_id).status == 201
    errors = []

    def add():
        for i in range(50):
            resp = put(jobd, f"new{i}")
            if resp.status != 201:
                errors.append(resp)

    adder = threading.Thread(target=add)
    adder.start()
    seen, cursor, pages = [], None, 0
    while pages < 100:
        query = "/api/jobs?limit=4" + (f"&cursor={cursor}" if cursor else "")
        page = jobd.request("GET", query).json()
        seen += [job["ID"] for job in page["Jobs"]]
        cursor, pages = page["Next"], pages + 1
        if not cursor:
            break
        time.sleep(0.01)
    adder.join()
    assert not errors
    assert len(seen) == len(set(seen)), "a job was listed twice"
    assert [job_id for job_id in seen if job_id.startswith("old")] == before[::-1]


# ---- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, allow", [
    ("PATCH", "/api/jobs/x", "DELETE, GET, HEAD, PUT"),
    ("DELETE", "/api/jobs", "GET, HEAD, POST"),
    ("GET", "/api/jobs/x/cancel", "POST"),
    ("POST", "/api/jobs/x/output", "GET, HEAD"),
    ("GET", "/api/upload", "POST"),
])
def test_wrong_method_is_405_with_allow(jobd, method, path, allow):
    resp = jobd.request(method, path)
    assert resp.status == 405 and resp.headers["Allow"] == allow
    assert resp.json()["error"] == "method_not_allowed" and resp.json()["status"] == 405


def test_the_go_api_sees_resource_api_jobs(jobd):
    assert put(jobd, "both", {"run.sh": "echo both\n"}).status == 201
    job, files = jobd.output("both")
    assert job["ID"] == "both" and files["jobd.stdout"] == b"both\n"
    listed = json.loads(jobd.request("GET", "/api/jobs").body)
    assert [j["ID"] for j in listed["Jobs"]] == ["both"]

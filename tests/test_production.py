"""Running jobd in production: token, time limits, queue cap, health, metrics, callbacks,
JSON logs -- all through HTTP against a real jobd."""

import array
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import sqlite3
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import make_zip, unzip
from helpers import alive, wait_status
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def upload_body(job_id, script, **extra):
    """A Go-style upload body for a job whose zip holds only run.sh."""
    payload = base64.b64encode(make_zip({"run.sh": script})).decode()
    return json.dumps({"id": job_id, "input": payload, **extra})


def put(jobd, job_id, script, headers=None):
    return jobd.request("PUT", f"/api/jobs/{job_id}", make_zip({"run.sh": script}),
                        {**AUTH, **(headers or {})})


# ---- authentication ----------------------------------------------------------------------

EVERY_API_REQUEST = [
    ("POST", "/api/upload"), ("GET", "/api/get/x"), ("GET", "/api/jobs"), ("POST", "/api/jobs"),
    ("GET", "/api/jobs/x"), ("PUT", "/api/jobs/x"), ("DELETE", "/api/jobs/x"),
    ("GET", "/api/jobs/x/output"), ("HEAD", "/api/jobs/x/output"),
    ("GET", "/api/jobs/x/logs/stdout"), ("POST", "/api/jobs/x/cancel"),
    ("GET", "/api/openapi.json"), ("GET", "/api/nothing-here"), ("GET", "/metrics"),
]


@pytest.mark.parametrize("how", ["env", "file"])
def test_every_api_request_needs_the_token(make_jobd, tmp_path, how):
    if how == "env":
        jobd = make_jobd(env={**os.environ, "JOBD_TOKEN": TOKEN})
    else:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        jobd = make_jobd(args=["--token-file", str(token_file)],
                         env={k: v for k, v in os.environ.items() if k != "JOBD_TOKEN"})
    for method, path in EVERY_API_REQUEST:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            resp = jobd.request(method, path, headers=headers)
            assert resp.status == 401, (method, path, headers, resp)
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            if method != "HEAD":
                assert resp.json() == {"error": "unauthorized", "status": 401,
                                       "message": resp.json()["message"]}
        resp = jobd.request(method, path, headers=AUTH)
        assert resp.status != 401, (method, path, resp)
    assert jobd.request("GET", "/healthz").status == 200  # probes need no token
    body = upload_body("t1", "echo ok\n")
    assert jobd.request("POST", "/api/upload", body, AUTH).status == 201
    assert jobd.request("POST", "/api/upload", body.replace("t1", "t2")).status == 401
    assert jobd.request("GET", "/api/jobs/t2", headers=AUTH).status == 404  # nothing stored


def test_metrics_can_be_public(make_jobd):
    jobd = make_jobd(args=["--metrics-public"], env={**os.environ, "JOBD_TOKEN": TOKEN})
    assert jobd.request("GET", "/metrics").status == 200
    assert jobd.request("GET", "/api/jobs").status == 401


def test_a_warning_when_open_beyond_loopback(make_jobd):
    env = {k: v for k, v in os.environ.items() if k != "JOBD_TOKEN"}
    local = make_jobd(env=env)
    assert not any("no token set" in line for line in local.lines)
    wide = make_jobd(args=["--host", "0.0.0.0"], env=env)
    assert sum("no token set" in line for line in wide.lines) == 1
    locked = make_jobd(args=["--host", "0.0.0.0"], env={**env, "JOBD_TOKEN": TOKEN})
    assert not any("no token set" in line for line in locked.lines)


def test_an_empty_token_file_is_refused(make_jobd, tmp_path):
    (tmp_path / "empty").write_text("\n")
    jobd = make_jobd(start=False)
    proc = subprocess.run(
        jobd.command + ["--port", "0", "--token-file", str(tmp_path / "empty"),
                        "--data", str(tmp_path / "d"), "--db", str(tmp_path / "db")],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "empty" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_token_is_read_as_the_client_reads_it(make_jobd, tmp_path):
    """JOBD_TOKEN from a secret often ends in a newline: jobd strips it, as its client does;
    a token file that is not UTF-8 is a one-line error, not a traceback."""
    jobd = make_jobd(env={**os.environ, "JOBD_TOKEN": f" {TOKEN}\n"})
    assert jobd.request("GET", "/api/jobs", headers=AUTH).status == 200
    assert jobd.request("GET", "/api/jobs").status == 401
    (tmp_path / "latin1").write_bytes(b"caf\xe9\n")
    proc = subprocess.run(
        jobd.command + ["--port", "0", "--token-file", str(tmp_path / "latin1"),
                        "--data", str(tmp_path / "d"), "--db", str(tmp_path / "db")],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "cannot read the token file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    blank = subprocess.run(
        jobd.command + ["--port", "0", "--data", str(tmp_path / "d"), "--db", str(tmp_path / "db")],
        env={**os.environ, "JOBD_TOKEN": " \n"}, capture_output=True, text=True, timeout=30)
    assert blank.returncode != 0 and "white space" in blank.stderr  # not an open jobd
    assert len(blank.stderr.strip().splitlines()) == 1, blank.stderr


# ---- time limits and the queue cap ---------------------------------------------------------

CHILDREN = """\
sleep 300 & echo $! >> pids
(sleep 300) & echo $! >> pids
echo started > started
wait
"""


def test_a_job_past_its_time_limit_is_killed_with_its_children(make_jobd):
    jobd = make_jobd(args=["--grace", "1"], env={**os.environ, "JOBD_TOKEN": TOKEN})
    started = time.monotonic()
    body = upload_body("slow", CHILDREN, timeout=1)
    assert jobd.request("POST", "/api/upload", body, AUTH).status == 201
    job = wait_status(jobd, "slow", {"FAILED"}, headers=AUTH)
    assert time.monotonic() - started < 6
    assert "timed out after 1 s" in job["Message"]
    output = jobd.request("GET", "/api/jobs/slow/output", headers=AUTH)
    files = unzip(output.body)
    pids = [int(p) for p in files["pids"].split()]
    assert pids and not any(alive(pid) for pid in pids)


def test_time_limit_by_header_default_and_cap(make_jobd):
    jobd = make_jobd(args=["--grace", "1", "--timeout", "1", "--max-timeout", "2"],
                     env={**os.environ, "JOBD_TOKEN": TOKEN})
    assert put(jobd, "default", "sleep 30\n").status == 201
    assert put(jobd, "capped", "sleep 30\n", {"X-Jobd-Timeout": "100"}).status == 201
    assert put(jobd, "short", "sleep 30\n", {"X-Jobd-Timeout": "0.5"}).status == 201
    assert put(jobd, "quick", "true\n", {"X-Jobd-Timeout": "5"}).status == 201
    assert "after 1 s" in wait_status(jobd, "default", {"FAILED"}, headers=AUTH)["Message"]
    assert "after 2 s" in wait_status(jobd, "capped", {"FAILED"}, headers=AUTH)["Message"]
    assert "after 0.5 s" in wait_status(jobd, "short", {"FAILED"}, headers=AUTH)["Message"]
    assert wait_status(jobd, "quick", {"SUCCESS", "FAILED"}, headers=AUTH)["Status"] == "SUCCESS"
    for bad in ("0", "-1", "soon", "inf", "nan"):
        resp = put(jobd, "bad", "true\n", {"X-Jobd-Timeout": bad})
        assert resp.status == 400, (bad, resp)


def test_uploads_beyond_the_queue_cap_get_429_and_store_nothing(make_jobd):
    jobd = make_jobd(args=["--workers", "1", "--max-queued", "2"])
    assert put(jobd, "running", "sleep 2\n").status == 201
    wait_status(jobd, "running", {"RUNNING"})
    assert put(jobd, "q1", "true\n").status == 201
    assert put(jobd, "q2", "true\n").status == 201
    full = put(jobd, "q3", "true\n")
    assert full.status == 429 and int(full.headers["Retry-After"]) > 0
    assert full.json()["error"] == "too_many_requests"
    assert jobd.request("POST", "/api/upload", upload_body("q4", "true\n")).status == 429
    for job_id in ("q3", "q4"):
        assert jobd.request("GET", f"/api/jobs/{job_id}").status == 404
    assert not list((jobd.data / ".jobd" / "input").iterdir())  # small inputs live in the db
    wait_status(jobd, "q2", {"SUCCESS"})
    assert put(jobd, "q3", "true\n").status == 201  # room again


# ---- health and metrics ----------------------------------------------------------------------

def test_healthz_and_metrics_count_running_jobs(jobd):
    assert put(jobd, "counted", "sleep 30\n").status == 201
    wait_status(jobd, "counted", {"RUNNING"})
    assert jobd.request("GET", "/healthz").json()["running"] == 1
    families = {f.name: f for f in text_string_to_metric_families(
        jobd.request("GET", "/metrics").body.decode())}
    assert families["jobd_running_jobs"].samples[0].value == 1
    assert jobd.request("POST", "/api/jobs/counted/cancel").status == 200
    assert jobd.request("GET", "/healthz").json()["running"] == 0


@contextlib.contextmanager
def unwritable_folder(path):
    """No new entries in `path` for a while: chmod for users, the immutable flag for root
    (whom permissions do not stop)."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_healthz_reports_and_fails_when_the_data_dir_or_database_fail(jobd):
    health = jobd.request("GET", "/healthz")
    assert health.status == 200
    body = health.json()
    assert body["status"] == "ok" and body["version"] and body["uptime_seconds"] >= 0
    assert body["data_free_bytes"] > 0 and body["queued"] == 0
    tmp = jobd.data / ".jobd" / "tmp"
    os.rename(tmp, tmp.with_name("tmp-away"))
    tmp.write_text("not a directory")
    try:
        broken = jobd.request("GET", "/healthz")
        assert broken.status == 503 and broken.json()["data_dir"] != "ok"
    finally:
        tmp.unlink()
        os.rename(tmp.with_name("tmp-away"), tmp)
    assert jobd.request("GET", "/healthz").status == 200
    # the data directory itself (where job directories are made) refusing new entries
    with unwritable_folder(jobd.data):
        broken = jobd.request("GET", "/healthz")
        assert broken.status == 503 and broken.json()["data_dir"] != "ok", broken
    assert jobd.request("GET", "/healthz").status == 200
    blocker = sqlite3.connect(jobd.db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        locked = jobd.request("GET", "/healthz")
        assert locked.status == 503 and "locked" in locked.json()["database"]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert jobd.request("GET", "/healthz").status == 200


def test_metrics_parse_as_prometheus_text(jobd):
    for i in range(3):
        assert jobd.upload(f"m{i}", {"run.sh": "true\n"}).status == 201
    assert jobd.upload("mfail", {"run.sh": "exit 1\n"}).status == 201
    for job_id in ("m0", "m1", "m2", "mfail"):
        jobd.wait(job_id)
    jobd.request("GET", "/api/jobs/unknown")
    text = jobd.request("GET", "/metrics")
    assert text.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text.body.decode())}
    jobs = {s.labels["state"]: s.value for s in families["jobd_jobs"].samples}
    assert jobs["SUCCESS"] == 3 and jobs["FAILED"] == 1 and jobs["QUEUED"] == 0
    assert families["jobd_queue_depth"].samples[0].value == 0
    assert families["jobd_running_jobs"].type == "gauge"
    duration = families["jobd_job_duration_seconds"]
    assert duration.type == "histogram"
    count = [s.value for s in duration.samples if s.name.endswith("_count")][0]
    assert count == 4
    requests = {s.labels["code"]: s.value for s in families["jobd_http_requests"].samples
                if s.name == "jobd_http_requests_total"}
    assert requests["201"] == 4 and requests["404"] >= 1
    received = families["jobd_http_received_bytes"].samples[0].value
    sent = families["jobd_http_sent_bytes"].samples[0].value
    assert received > 4 * 100 and sent > 4 * 100


# ---- callbacks -------------------------------------------------------------------------------

class Receiver:
    """A callback receiver on 127.0.0.1 that answers with scripted status codes."""

    def __init__(self, answers=(), port=0, delay=0.0):
        self.calls, self.answers, self.delay = [], list(answers), delay
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((self.path, dict(self.headers), body, time.monotonic()))
                time.sleep(receiver.delay)
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count, timeout=20):
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            assert time.monotonic() < deadline, f"only {len(self.calls)} callbacks arrived"
            time.sleep(0.05)
        return self.calls

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def upload_with_callback(jobd, job_id, url, script="echo done\n", headers=None):
    body = upload_body(job_id, script, callback=url)
    return jobd.request("POST", "/api/upload", body, headers or {})


def test_callbacks_arrive_signed_and_are_retried(make_jobd):
    receiver = Receiver(answers=[500, 503])  # two failures, then 200
    try:
        jobd = make_jobd(args=["--callback-allow", receiver.url],
                         env={**os.environ, "JOBD_TOKEN": TOKEN})
        assert upload_with_callback(jobd, "cb1", receiver.url + "cb1", headers=AUTH).status == 201
        calls = receiver.wait(3)
        path, headers, body, _ = calls[-1]
        assert path == "/hooks/cb1"
        status = json.loads(body)
        assert status["ID"] == "cb1" and status["Status"] == "SUCCESS" and "Output" not in status
        expected = hmac.new(TOKEN.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Jobd-Signature"] == f"sha256={expected}"
        assert all(call[2] == body for call in calls)  # every attempt sends the same bytes
        assert calls[2][3] - calls[1][3] > calls[1][3] - calls[0][3] - 0.2  # backing off
        time.sleep(1.5)
        assert len(receiver.calls) == 3  # delivered once it worked
    finally:
        receiver.close()


def test_callback_urls_must_be_allowed(make_jobd):
    jobd = make_jobd()
    resp = upload_with_callback(jobd, "nocb", "http://127.0.0.1:9/x")
    assert resp.status == 400 and "not enabled" in resp.json()["message"]
    jobd = make_jobd(args=["--callback-allow", "http://127.0.0.1:9/hooks/"])
    for url in ("http://127.0.0.1:9/other", "http://127.0.0.2:9/hooks/x",
                "https://127.0.0.1:9/hooks/x", "http://127.0.0.1:9.evil/hooks/",
                "ftp://127.0.0.1:9/hooks/x", "",
                # dot segments would climb out of the prefix; control characters and spaces
                # make a URL no request line can carry
                "http://127.0.0.1:9/hooks/../admin", "http://127.0.0.1:9/hooks/%2e%2E/admin",
                "HTTP://127.0.0.1:9/hooks/./x", "http://127.0.0.1:9/hooks/a\r\nX: y",
                "http://127.0.0.1:9/hooks/a b"):
        resp = upload_with_callback(jobd, "cbx", url)
        assert resp.status == 400, (url, resp)
    assert jobd.request("GET", "/api/jobs/cbx").status == 404
    assert upload_with_callback(jobd, "cbok", "http://127.0.0.1:9/hooks/ok").status == 201
    headers = {"X-Jobd-Callback": "http://evil.example/hooks/"}
    assert jobd.request("PUT", "/api/jobs/raw", make_zip({"run.sh": "true\n"}),
                        headers).status == 400


def test_a_pending_callback_is_sent_after_a_restart(make_jobd):
    probe = Receiver()
    port, url = probe.port, probe.url
    probe.close()  # nobody listens there now
    jobd = make_jobd(args=["--callback-allow", url])
    assert upload_with_callback(jobd, "later", url + "later").status == 201
    jobd.wait("later")
    time.sleep(0.5)
    assert jobd.stop() == 0
    receiver = Receiver(port=port)
    try:
        jobd.start()
        calls = receiver.wait(1)
        assert json.loads(calls[0][2])["ID"] == "later"
    finally:
        receiver.close()


def test_a_slow_callback_never_holds_up_the_workers(make_jobd):
    receiver = Receiver(delay=5)
    try:
        jobd = make_jobd(args=["--callback-allow", receiver.url, "--workers", "1"])
        assert upload_with_callback(jobd, "first", receiver.url + "first").status == 201
        receiver.wait(1)  # the receiver is now stuck for 5 s
        started = time.monotonic()
        assert jobd.upload("second", {"run.sh": "true\n"}).status == 201
        jobd.wait("second", timeout=3)
        assert time.monotonic() - started < 2
    finally:
        receiver.close()


# ---- logs --------------------------------------------------------------------------------------

def test_json_logs_are_one_object_a_line(make_jobd):
    jobd = make_jobd(args=["--log-format", "json"])
    assert jobd.upload("j", {"run.sh": "true\n"}).status == 201
    jobd.wait("j")
    assert jobd.stop() == 0
    events = [json.loads(line) for line in jobd.lines if line.strip()]
    assert all({"time", "level", "event"} <= set(event) for event in events)
    finished = [e for e in events if e["event"] == "job" and e.get("status") == "SUCCESS"]
    assert finished and finished[0]["job"] == "j" and finished[0]["seconds"] >= 0
    requests = [e for e in events if e["event"] == "http"]
    assert {"method", "path", "status", "ms"} <= set(requests[0])


def test_jobs_see_jobds_environment_but_not_its_secrets(make_jobd):
    env = {**os.environ, "JOBD_TOKEN": TOKEN, "SLURML_API_TOKEN": "other-secret",
           "MY_SETTING": "kept"}
    jobd = make_jobd(env=env)
    assert put(jobd, "env", "env > env.txt\n").status == 201
    wait_status(jobd, "env", {"SUCCESS"}, headers=AUTH)
    files = unzip(jobd.request("GET", "/api/jobs/env/output", headers=AUTH).body)
    seen = dict(line.split("=", 1) for line in files["env.txt"].decode().splitlines()
                if "=" in line)
    assert seen["MY_SETTING"] == "kept"
    assert "JOBD_TOKEN" not in seen and "SLURML_API_TOKEN" not in seen


# ---- the data directory on ext2/3/4 ------------------------------------------------------

FS_IOC_GETFLAGS = 2 << 30 | struct.calcsize("l") << 16 | ord("f") << 8 | 1  # linux/fs.h
FS_IOC_SETFLAGS = 1 << 30 | struct.calcsize("l") << 16 | ord("f") << 8 | 2
FS_TOPDIR_FL = 0x00020000


def attribute_flags(path, add=0):
    """The ext2/3/4 attribute flags of a directory (what lsattr shows), after adding
    `add` to them; None where the file system has no such attributes or refuses these."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        if add:
            flags[0] |= add
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        return flags[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def test_the_data_directory_spreads_job_folders_over_the_disk(jobd, tmp_path):
    """jobd gives DATAPATH the T attribute (chattr +T), and only DATAPATH, so that ext4
    spreads the job folders over its block groups; jobs run as before."""
    (tmp_path / "probe").mkdir()
    if not (attribute_flags(tmp_path / "probe", add=FS_TOPDIR_FL) or 0) & FS_TOPDIR_FL:
        pytest.skip("the test directory's file system has no T attribute (not ext2/3/4)")
    assert attribute_flags(jobd.data) & FS_TOPDIR_FL
    assert not attribute_flags(jobd.workdir) & FS_TOPDIR_FL
    assert not attribute_flags(jobd.data / ".jobd") & FS_TOPDIR_FL
    assert jobd.upload("spread", {"run.sh": "echo spread > out.txt\n"}).status == 201
    job, files = jobd.output("spread")
    assert job["Status"] == "SUCCESS" and files["out.txt"] == b"spread\n"

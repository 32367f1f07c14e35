"""Checks of the orchestrator replay itself, against a tiny in-memory client on 127.0.0.1.

The stub client below is only a test double for orchestrator_sim (it reads uploads with
jobd's multipart reader); the real tests of jobd drive `python3 jobd.py` with orchestrator_sim.
"""

import http.server
import io
import json
import os
import sys
import threading
import time
import zipfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jobd  # noqa: E402
import orchestrator_sim as sim  # noqa: E402


def payload(job_id, status):
    return {"id": job_id, "input": {}, "status": status, "loc": f"/data/{job_id}", "pid": 0,
            "killed": False}


class StubClient(http.server.ThreadingHTTPServer):
    """Answers the client routes from a script of statuses per job."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.jobs = {}  # id -> {"files": {...}, "answers": [...], "killed": bool}
        self.requests = []  # (method, path, client port, headers)
        self.next_id = 41
        self.script = []  # answers for the next job: statuses, "zip", 404, "junk"
        self.upload_answer = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class StubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, code, body=b"", content_type="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.server.requests.append(("POST", self.path, self.client_address[1], dict(self.headers)))
        if self.path == "/submit":
            files = {}

            def open_part(headers, name, filename):
                if filename is None:
                    return None
                sink = io.BytesIO()
                sink.close = lambda: files.__setitem__(jobd.safe_basename(filename), sink.getvalue())
                return sink

            try:
                boundary = jobd.parse_boundary(self.headers.get("Content-Type"))
                jobd.read_multipart(jobd.RequestBody(self.rfile, self.headers, 1 << 30), boundary,
                                    open_part)
            except (ValueError, jobd.JobdError) as e:
                return self.send(400, str(e).encode())
            if self.server.upload_answer is not None:
                return self.send(*self.server.upload_answer)
            self.server.next_id += 1
            job_id = self.server.next_id
            self.server.jobs[job_id] = {"files": files, "answers": list(self.server.script),
                                        "killed": False}
            return self.send(200, json.dumps(payload(job_id, "Prepared")).encode())
        if self.path.startswith("/kill/"):
            job = self.server.jobs.get(int(self.path.rsplit("/", 1)[1]))
            if job is None:
                return self.send(404, json.dumps(payload(0, "Unknown")).encode())
            job["killed"] = True
            return self.send(200, b"", "text/plain")
        self.send(404)

    def do_GET(self):
        self.server.requests.append(("GET", self.path, self.client_address[1], dict(self.headers)))
        prefix, _, job_id = self.path.rpartition("/")
        job = self.server.jobs.get(int(job_id))
        if job is None:
            return self.send(404, json.dumps(payload(0, "Unknown")).encode())
        if prefix == "/retrieve_partial":
            return self.send(200, zip_of(job["files"]), "application/zip")
        answer = job["answers"].pop(0) if len(job["answers"]) > 1 else job["answers"][0]
        if answer == "zip":
            return self.send(200, zip_of(job["files"]), "application/zip")
        if answer == "zip-as-octets":
            return self.send(200, zip_of(job["files"]), "application/octet-stream")
        if answer == "junk":
            return self.send(200, b"{not json")
        if isinstance(answer, int):
            return self.send(answer, json.dumps(payload(0, "Unknown")).encode())
        self.send(200, json.dumps(payload(int(job_id), answer)).encode())


def zip_of(files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def stub():
    server = StubClient()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def fast(stub, **kw):
    return sim.Orchestrator(stub.url, poll_interval=0.02, request_timeout=5, **kw)


def test_upload_is_reqwest_shaped_and_readable(stub, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "run.sh").write_bytes(b"echo hi\n")
    (tmp_path / "sub" / "in put.dat").write_bytes(b"\x00" * 70000)
    stub.script = ["Running", "zip"]
    orch = fast(stub)
    job = orch.submit(sim.files_from_dir(tmp_path))
    assert job == 42
    assert stub.jobs[42]["files"] == {"run.sh": b"echo hi\n", "in put.dat": b"\x00" * 70000}
    method, path, _, headers = stub.requests[0]
    assert (method, path) == ("POST", "/submit")
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    boundary = headers["content-type"].split("=", 1)[1]
    assert [len(x) for x in boundary.split("-")] == [16, 16, 16, 16]
    assert "Transfer-Encoding" not in headers and int(headers["content-length"]) > 70000


def test_empty_job_folder_sends_an_empty_body(stub, tmp_path):
    stub.script = ["Invalid"]
    orch = fast(stub)
    job = orch.submit(sim.files_from_dir(tmp_path))
    assert stub.requests[0][3]["content-length"] == "0"
    assert orch.poll_until_final(job, timeout=5) == ("Invalid", None)


def test_polls_until_zip_with_a_new_connection_each_time(stub):
    stub.script = ["Running", 404, 500, "junk", "Running", "zip-as-octets", "zip"]
    orch = fast(stub)
    job = orch.submit({"run.sh": b"x"})
    status, result = orch.poll_until_final(job, timeout=5)
    assert status == "Completed"
    assert zipfile.ZipFile(io.BytesIO(result)).read("run.sh") == b"x"
    assert [s for _, s in orch.history[job]] == [
        "Running", None, None, None, "Running", None, "Completed"]
    ports = [port for _, _, port, _ in stub.requests]
    assert len(set(ports)) == len(ports)  # one connection per request


def test_json_status_is_copied_and_final_statuses_stop_polling(stub):
    for final in ("Failed", "Invalid", "Killed", "Cleaned", "Completed", "Queued", "Unknown"):
        stub.script = ["Running", final]
        orch = fast(stub)
        job = orch.submit({"run.sh": b"x"})
        assert orch.poll_until_final(job, timeout=5) == (final, None)


def test_prepared_is_polled_only_by_newer_servers(stub):
    stub.script = ["Prepared", "Prepared", "zip"]
    assert fast(stub).poll_until_final(fast(stub).submit({"a": b""}), timeout=5)[0] == "Completed"
    stub.script = ["Prepared", "zip"]
    old = fast(stub, polled=("Submitted", "Running"))
    assert old.poll_until_final(old.submit({"a": b""}), timeout=5) == ("Prepared", None)


def test_poll_interval_is_half_a_second(stub):
    stub.script = ["Running", "Running", "zip"]
    orch = sim.Orchestrator(stub.url, request_timeout=5)
    start = time.monotonic()
    assert orch.poll_until_final(orch.submit({"a": b""}), timeout=5)[0] == "Completed"
    assert 0.9 <= time.monotonic() - start < 2.5  # three polls, two waits of 0.5 s


def test_timeout_is_bounded(stub):
    stub.script = ["Running"]
    orch = fast(stub)
    job = orch.submit({"a": b""})
    with pytest.raises(TimeoutError):
        orch.poll_until_final(job, timeout=0.3)


def test_kill_then_no_more_polls(stub):
    stub.script = ["Running"]
    orch = fast(stub)
    job = orch.submit({"a": b""})
    assert orch.kill(job) is True
    assert stub.jobs[job]["killed"]
    assert orch.poll_until_final(job, timeout=5) == ("Killed", None)
    assert [m for m, *_ in stub.requests] == ["POST", "POST"]
    assert stub.requests[1][1] == f"/kill/{job}"
    assert stub.requests[1][3]["content-length"] == "0"
    assert orch.kill(999) is False


def test_upload_failures(stub):
    orch = fast(stub)
    for answer in [(500, b"boom"), (200, b"not json"), (200, b'{"id": -1}'),
                   (200, json.dumps(dict(payload(1, "Prepared"), id=2 ** 32)).encode()),
                   (200, json.dumps(dict(payload(1, "Prepared"), pid=None)).encode()),
                   (200, json.dumps(dict(payload(1, "prepared"))).encode())]:
        stub.upload_answer = answer
        with pytest.raises(sim.UploadFailed):
            orch.submit({"a": b""})


def test_partial_url_and_download(stub):
    assert sim.partial_url("http://h:1/retrieve") == "http://h:1/retrieve_partial"
    assert sim.partial_url("http://h:1/api/download") == "http://h:1/api/retrieve_partial"
    assert sim.partial_url("http://h:1/retrieve/") == "http://h:1/retrieve/retrieve_partial"
    stub.script = ["Running"]
    orch = fast(stub)
    job = orch.submit({"out.txt": b"so far"})
    assert zipfile.ZipFile(io.BytesIO(orch.partial(job))).read("out.txt") == b"so far"
    assert stub.requests[-1][1] == f"/retrieve_partial/{job}"
    with pytest.raises(sim.OrchestratorError):
        orch.partial(12345)


def test_only_loopback_urls():
    with pytest.raises(ValueError):
        sim.Orchestrator("http://10.0.0.1:9000")
    with pytest.raises(ValueError):
        sim.Orchestrator("https://127.0.0.1:9000")

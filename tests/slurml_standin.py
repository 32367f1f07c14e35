"""A stand-in for the slurml HTTP service that the Go jobd forwards `slurml: true` jobs to.

Stdlib only. It speaks the client protocol of the Go daemon (rvhonorato/jobd,
domain/jobs/jobs_dto.go, PostToSlurml / GetFromSlurml):

  POST /api/submit            body {"payload": "<base64 zip>"}, header `Authorization: <token>`
                              (the raw token, no "Bearer")  -> 201 {"jobid": N}
  GET  /api/download/{jobid}  same header -> 204 not ready (no body)
                                          -> 206 {"output": "<base64>"}  partial (Go: PARTIAL)
                                          -> 200 {"output": "<base64>"}  done    (Go: SUCCESS)
                                          -> 500                          failed  (Go: FAILED)
  Go treats any other status, or a body it cannot decode, as FAILED.

Every request is recorded (`requests`), and what each job answers is scripted by the test:

    with SlurmlStandin(token="t") as s:
        s.plan(204, 204, (200, b"zip bytes"))   # the next submitted job: 2x not ready, then done
        s.plan(500)                              # the job after that: failed
        ... point the daemon at s.url, run it ...
        s.wait_for(lambda r: r.path == "/api/download/1000", count=3)

A plan's steps are used one per download request; the last one repeats. A step is a status
(int), (status, output) with output as bytes (base64-encoded for you) or str (sent as is),
or a Step for full control (raw body, delay). Unplanned jobs answer 200 with their own
payload as output. A wrong or missing token gets 401 (and is recorded).
"""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Step:
    """One scripted answer: HTTP status, and either `output` (-> {"output": ...}) or raw `body`."""

    def __init__(self, status, output=None, body=None, delay=0.0,
                 content_type="application/json"):
        self.status = status
        self.output = output
        self.body = body
        self.delay = delay
        self.content_type = content_type

    @classmethod
    def of(cls, spec):
        """A Step from an int, a (status, output) tuple, or a Step."""
        if isinstance(spec, Step):
            return spec
        if isinstance(spec, int):
            return cls(spec)
        status, output = spec
        return cls(status, output=output)

    def render(self, default_output):
        """(status, body bytes or None, content type) for this step."""
        if self.body is not None:
            body = self.body.encode() if isinstance(self.body, str) else self.body
            return self.status, body, self.content_type
        if self.status in (200, 206):
            output = default_output if self.output is None else self.output
            if isinstance(output, bytes):
                output = base64.b64encode(output).decode()
            return self.status, json.dumps({"output": output}).encode(), self.content_type
        if self.status == 500:
            return 500, json.dumps({"error": "job failed"}).encode(), self.content_type
        return self.status, None, self.content_type


class Request:
    """One request the stand-in received."""

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers          # dict, original header names
        self.body = body                # bytes
        self.time = time.monotonic()
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    @property
    def authorization(self):
        return self.headers.get("Authorization")

    def __repr__(self):
        return "<Request %s %s %d bytes>" % (self.method, self.path, len(self.body))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "slurml-standin/1"

    def log_message(self, fmt, *args):  # quiet: tests read `requests` instead
        pass

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        body = self._read_body()
        standin = self.server.standin
        request = Request(self.command, self.path, dict(self.headers.items()), body)
        status, payload, ctype, delay = standin._answer(request)
        if delay:
            time.sleep(delay)
        if status == 204:  # no body, and no Content-Length either (RFC 9110)
            payload = None
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", ctype)
        if status != 204:
            self.send_header("Content-Length", str(len(payload or b"")))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _handle


class SlurmlStandin:
    """The stand-in server on 127.0.0.1 (port 0 by default); see the module docstring."""

    def __init__(self, token="test-token", host="127.0.0.1", port=0, first_jobid=1000):
        self.token = token
        self._lock = threading.Condition()
        self._next_jobid = first_jobid
        self._pending_plans = []     # plans for the next submitted jobs, in order
        self._submit_answers = []    # scripted answers for the next submits, in order
        self.plans = {}              # jobid -> list of Step
        self.payloads = {}           # jobid -> payload string as received
        self.requests = []
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.standin = self
        self._thread = None

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return "http://%s:%d" % (host, port)

    # ---- scripting

    def plan(self, *steps, jobid=None):
        """Script the download answers of one job (the next submitted one by default)."""
        steps = [Step.of(s) for s in steps] or [Step(200)]
        with self._lock:
            if jobid is None:
                self._pending_plans.append(steps)
            else:
                self.plans[jobid] = steps

    def script_submit(self, *steps):
        """Script the answers to the next submits (default: 201 {"jobid": N})."""
        with self._lock:
            self._submit_answers.extend(Step.of(s) for s in steps)

    # ---- inspection

    def submits(self):
        """The POST /api/submit requests received, in order."""
        with self._lock:
            return [r for r in self.requests if r.path == "/api/submit"]

    def downloads(self, jobid=None):
        """The GET /api/download requests received (for one job id, if given)."""
        with self._lock:
            return [r for r in self.requests if r.path.startswith("/api/download/")
                    and (jobid is None or r.path == "/api/download/%s" % jobid)]

    def wait_for(self, predicate=lambda r: True, count=1, timeout=10.0):
        """Block until `count` recorded requests match `predicate`; return them."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                hits = [r for r in self.requests if predicate(r)]
                if len(hits) >= count:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("%d/%d matching requests after %.1f s: %r"
                                       % (len(hits), count, timeout, self.requests))
                self._lock.wait(min(left, 0.5))

    # ---- serving

    def _answer(self, request):
        """(status, body, content type, delay) for one request; records it."""
        with self._lock:
            self.requests.append(request)
            self._lock.notify_all()
            if self.token is not None and request.authorization != self.token:
                return 401, json.dumps({"error": "unauthorized"}).encode(), "application/json", 0
            if request.path == "/api/submit" and request.method == "POST":
                return self._answer_submit(request)
            prefix = "/api/download/"
            if request.path.startswith(prefix) and request.method == "GET":
                jobid_text = request.path[len(prefix):]
                if jobid_text.isdigit() and int(jobid_text) in self.plans:
                    return self._answer_download(int(jobid_text))
            return 404, json.dumps({"error": "not found"}).encode(), "application/json", 0

    def _answer_submit(self, request):
        if self._submit_answers:
            step = self._submit_answers.pop(0)
            if step.status != 201 or step.body is not None:
                status, body, ctype = step.render(None)
                return status, body, ctype, step.delay
        payload = (request.json or {}).get("payload") if isinstance(request.json, dict) else None
        if not isinstance(payload, str):
            return 400, json.dumps({"error": "payload missing"}).encode(), "application/json", 0
        jobid = self._next_jobid
        self._next_jobid += 1
        self.payloads[jobid] = payload
        self.plans[jobid] = self._pending_plans.pop(0) if self._pending_plans else [Step(200)]
        return 201, json.dumps({"jobid": jobid}).encode(), "application/json", 0

    def _answer_download(self, jobid):
        steps = self.plans[jobid]
        step = steps.pop(0) if len(steps) > 1 else steps[0]
        status, body, ctype = step.render(self.payloads.get(jobid, ""))
        return status, body, ctype, step.delay

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

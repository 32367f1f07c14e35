"""Replay of job-orchestrator's server mode towards one "client" URL (stdlib only).

It behaves the way rvhonorato/job-orchestrator's server talks to a client, as read from its
source (src/services/{server,client,endpoint}.rs, src/models/payload_dao.rs) and from reqwest's
multipart encoder (src/async_impl/multipart.rs, src/async_impl/request.rs):

- upload: POST UPLOAD_URL, multipart/form-data built like reqwest's Form: boundary of four
  16-digit hex numbers joined by '-', one part per file of the job folder, field name = the
  file's path relative to the folder (percent-encoded into `name*=utf-8''...` when it holds '/',
  a space, '%', a control or non-ASCII character...), filename = the file's basename (with '\\',
  '"', CR and LF backslash-escaped), no Content-Type per part, Content-Length set, no preamble,
  "--boundary--\\r\\n" at the end; no file at all gives an empty body with Content-Length: 0.
  A 2xx whose body is a valid Payload gives the destination id; anything else fails the job.
- poll: GET DOWNLOAD_URL/{id} every 500 ms, one new connection per request: exactly 200 with a
  Content-Type containing "application/zip" -> the zip is the result, Completed; any other 2xx
  -> the Payload's status is copied verbatim (a body that is not a Payload counts as an error);
  any error (404 and 5xx included) -> unchanged, polled again. Only jobs in a polled status
  (Submitted, Prepared, Running) are polled, so any other status ends the polling.
- kill: POST TERMINATE_URL/{id} with no body; a 2xx -> Killed and polling stops; otherwise the
  job keeps its status.
- partial: GET on DOWNLOAD_URL with its last path segment replaced by "retrieve_partial", then
  "/{id}"; the zip goes to the user as is.
- credentials: the server sends no header of its own, but reqwest turns a URL's user:password
  into Basic auth (RequestBuilder::new -> extract_authority -> basic_auth, "user:" + password).

Differences on purpose: the real server has no time-outs (here every request and loop is bounded)
and polls up to 10 jobs at once (here one job at a time). Only loopback URLs are accepted.
"""

import base64
import http.client
import json
import os
import secrets
import time
import urllib.parse

POLL_INTERVAL = 0.5
POLLED_STATUSES = ("Submitted", "Prepared", "Running")
# serde's names for the orchestrator's Status enum (src/models/status_dto.rs): exact case.
STATUSES = ("Pending", "Processing", "Completed", "Failed", "Invalid", "Queued", "Submitted",
            "Unknown", "Cleaned", "Prepared", "Running", "Killed", "Locked")
U32_MAX = 2 ** 32 - 1
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class OrchestratorError(Exception):
    """The client answered in a way the orchestrator treats as a failure."""


class UploadFailed(OrchestratorError):
    """The upload was refused or unreadable: the orchestrator marks the job Failed, no retry."""


# --------------------------------------------------------------------------------------------
# Payload (src/models/payload_dao.rs): serde derive, every field required, extra keys ignored.
# --------------------------------------------------------------------------------------------


def _is_u32(value):
    return type(value) is int and 0 <= value <= U32_MAX


def parse_payload(raw):
    """Decode a Payload as serde would; raise ValueError where serde_json would fail."""
    payload = json.loads(raw)
    if not isinstance(payload, dict):
        raise ValueError("Payload is not a JSON object")
    missing = [k for k in ("id", "input", "status", "loc", "pid", "killed") if k not in payload]
    if missing:
        raise ValueError(f"Payload misses {missing}")
    if not _is_u32(payload["id"]):
        raise ValueError(f"Payload id {payload['id']!r} is not a u32")
    if not _is_u32(payload["pid"]):
        raise ValueError(f"Payload pid {payload['pid']!r} is not a u32")
    if type(payload["killed"]) is not bool:
        raise ValueError("Payload killed is not a bool")
    if not isinstance(payload["loc"], str):
        raise ValueError("Payload loc is not a string")
    if payload["status"] not in STATUSES:
        raise ValueError(f"Payload status {payload['status']!r} is not a Status variant")
    inputs = payload["input"]
    if not isinstance(inputs, dict) or not all(
            isinstance(v, list) and all(type(b) is int and 0 <= b <= 255 for b in v)
            for v in inputs.values()):
        raise ValueError("Payload input is not a map of byte lists")
    return payload


# --------------------------------------------------------------------------------------------
# reqwest's multipart encoding
# --------------------------------------------------------------------------------------------

# percent_encoding's CONTROLS + the WHATWG path-segment set: what reqwest's default encodes.
_PATH_SEGMENT_SET = frozenset(b' "<>`#?{}/%')


def _percent_encode_name(name):
    """Return (encoded, changed) like utf8_percent_encode(name, PATH_SEGMENT_ENCODE_SET)."""
    out = []
    for byte in name.encode("utf-8"):
        if byte < 0x20 or byte >= 0x7F or byte in _PATH_SEGMENT_SET:
            out.append(f"%{byte:02X}")
        else:
            out.append(chr(byte))
    encoded = "".join(out)
    return encoded, encoded != name


def new_boundary():
    """A boundary shaped like reqwest's gen_boundary()."""
    return "-".join(f"{secrets.randbits(64):016x}" for _ in range(4))


def part_header(field_name, filename):
    """The header block reqwest writes for a part (without the blank line)."""
    encoded, changed = _percent_encode_name(field_name)
    head = "Content-Disposition: form-data; "
    head += f"name*=utf-8''{encoded}" if changed else f'name="{field_name}"'
    if filename is not None:
        escaped = (filename.replace("\\", "\\\\").replace('"', '\\"')
                   .replace("\r", "\\\r").replace("\n", "\\\n"))
        head += f'; filename="{escaped}"'
    return head.encode("utf-8")


def _data_size(value):
    return os.path.getsize(value) if isinstance(value, (str, os.PathLike)) else len(value)


def encode_form(files, boundary):
    """Return (content_length, iterator of body chunks) for {relative path: bytes or file path}.

    Each part is named by its relative path and carries its basename as filename, as the
    orchestrator's Client::upload does; a path value is streamed from disk, not loaded.
    """
    b = boundary.encode("ascii")
    parts = []
    length = 0
    for rel_path, value in files.items():
        head = b"--" + b + b"\r\n" + part_header(rel_path, rel_path.rsplit("/", 1)[-1]) + b"\r\n\r\n"
        size = _data_size(value)
        parts.append((head, value))
        length += len(head) + size + 2
    if parts:
        length += 2 + len(b) + 4

    def chunks():
        for head, value in parts:
            yield head
            if isinstance(value, (str, os.PathLike)):
                with open(value, "rb") as f:
                    for block in iter(lambda: f.read(1 << 16), b""):
                        yield block
            else:
                yield bytes(value)
            yield b"\r\n"
        if parts:
            yield b"--" + b + b"--\r\n"

    return length, chunks()


def files_from_dir(job_dir):
    """{relative path: file path} for the regular files under job_dir, like WalkDir + is_file()."""
    found = {}
    for root, dirs, names in os.walk(job_dir):  # os.walk does not follow symlinked dirs either
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found[os.path.relpath(path, job_dir).replace(os.sep, "/")] = path
    return found


# --------------------------------------------------------------------------------------------
# The server's side of the protocol
# --------------------------------------------------------------------------------------------


def partial_url(download_url):
    """DOWNLOAD_URL with its last path segment replaced, exactly as endpoint::retrieve_partial."""
    pos = download_url.rfind("/")
    if pos < 0:
        return download_url + "/retrieve_partial"
    if pos + 1 < len(download_url):
        return download_url[:pos + 1] + "retrieve_partial"
    return download_url + "retrieve_partial"


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lowercased names
        self.body = body


class Orchestrator:
    """The orchestrator's server mode, for one service whose client is at base_url.

        orch = Orchestrator("http://127.0.0.1:8080")
        job = orch.submit({"run.sh": b"echo hi > out.txt\\n"})
        status, zip_bytes = orch.poll_until_final(job, timeout=30)
    """

    def __init__(self, base_url=None, *, upload_url=None, download_url=None, terminate_url=None,
                 request_timeout=60.0, poll_interval=POLL_INTERVAL, polled=POLLED_STATUSES):
        if base_url is not None:
            base_url = base_url.rstrip("/")
        self.upload_url = upload_url or base_url + "/submit"
        self.download_url = download_url or base_url + "/retrieve"
        self.terminate_url = terminate_url or base_url + "/kill"
        for url in (self.upload_url, self.download_url, self.terminate_url):
            _check_loopback(url)
        self.request_timeout = request_timeout
        self.poll_interval = poll_interval
        # Older servers (e.g. commit 07137f7 of src/services/server.rs) poll only Submitted and
        # Running: pass polled=("Submitted", "Running") to check a client against those too.
        self.polled = tuple(polled)
        self.status = {}  # destination id -> status as the orchestrator holds it
        self.history = {}  # destination id -> every answer seen, in order: (http status, status)
        self.results = {}  # destination id -> zip bytes

    # One request on one new connection, closed afterwards (reqwest::Client::new() per call).
    def request(self, method, url, body=None, headers=(), length=None):
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80,
                                          timeout=self.request_timeout)
        try:
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            conn.putrequest(method, target, skip_accept_encoding=True)
            conn.putheader("accept", "*/*")
            if parts.username or parts.password is not None:
                credentials = (urllib.parse.unquote(parts.username or "") + ":" +
                               urllib.parse.unquote(parts.password or ""))
                conn.putheader("authorization",
                               "Basic " + base64.b64encode(credentials.encode()).decode())
            for name, value in headers:
                conn.putheader(name, value)
            if method == "POST":
                conn.putheader("content-length", str(length if length is not None else 0))
            conn.endheaders()
            if body is not None:
                for chunk in body:
                    conn.send(chunk)
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def submit(self, files):
        """Upload {relative path: bytes or file path}; return the client's id (u32)."""
        boundary = new_boundary()
        length, chunks = encode_form(files, boundary)
        try:
            resp = self.request(
                "POST", self.upload_url, body=chunks, length=length,
                headers=[("content-type", f"multipart/form-data; boundary={boundary}")])
        except OSError as e:
            raise UploadFailed(f"request failed: {e}") from e
        if not 200 <= resp.status < 300:
            raise UploadFailed(f"client answered {resp.status}: {resp.body[:200]!r}")
        try:
            dest_id = parse_payload(resp.body)["id"]
        except ValueError as e:
            raise UploadFailed(f"client answer is not a Payload: {e}") from e
        self.status[dest_id] = "Submitted"
        self.history[dest_id] = []
        return dest_id

    def poll_once(self, dest_id):
        """One GET /retrieve/{id}; update and return the job's status as the server would."""
        try:
            resp = self.request("GET", f"{self.download_url}/{dest_id}")
        except OSError:
            self.history.setdefault(dest_id, []).append((None, None))
            return self.status.get(dest_id)  # unchanged
        content_type = resp.headers.get("content-type", "")
        if resp.status == 200 and "application/zip" in content_type:
            self.results[dest_id] = resp.body
            new = "Completed"
        elif 200 <= resp.status < 300:
            try:
                new = parse_payload(resp.body)["status"]
            except ValueError:
                new = None
        else:
            new = None
        self.history.setdefault(dest_id, []).append((resp.status, new))
        if new is not None:
            self.status[dest_id] = new
        return self.status.get(dest_id)

    def poll_until_final(self, dest_id, timeout=60.0):
        """Poll every poll_interval until the status leaves the polled set; return (status, zip).

        The zip is None unless the job Completed through a zip answer. Raises TimeoutError
        if the job is still polled after `timeout` seconds.
        """
        self.status.setdefault(dest_id, "Submitted")
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / max(self.poll_interval, 0.01)) + 2):
            if self.status[dest_id] not in self.polled:
                break
            self.poll_once(dest_id)
            if self.status[dest_id] not in self.polled or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        status = self.status[dest_id]
        if status in self.polled:
            raise TimeoutError(f"job {dest_id} still {status} after {timeout}s: "
                               f"{self.history.get(dest_id, [])[-5:]}")
        return status, self.results.get(dest_id)

    def kill(self, dest_id):
        """POST /kill/{id}; True (and the job is Killed, no more polling) on a 2xx."""
        try:
            resp = self.request("POST", f"{self.terminate_url}/{dest_id}")
        except OSError:
            return False
        if 200 <= resp.status < 300:
            self.status[dest_id] = "Killed"
            return True
        return False

    def partial(self, dest_id):
        """GET the partial zip of the job's folder; return its bytes, or raise on a non-2xx."""
        resp = self.request("GET", f"{partial_url(self.download_url)}/{dest_id}")
        if not 200 <= resp.status < 300:
            raise OrchestratorError(f"retrieve_partial answered {resp.status}")
        return resp.body


def _check_loopback(url):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"only http:// URLs on the loopback interface are allowed, not {url!r}")

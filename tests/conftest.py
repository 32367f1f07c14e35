"""Shared fixtures: a real jobd on an ephemeral port, started as a subprocess.

The `jobd` fixture is parametrised over the implementations under test: the source
(`python3 jobd.py`) and the frozen binary (`dist/jobd`, built by `make build`). Every
test that uses it runs against both. Set JOBD_TEST_IMPL=source (or binary) to pick one.
"""

import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest


def pytest_configure(config):
    """Give the run's subprocesses one temp dir, removed at the end: the frozen jobd
    unpacks itself into $TMPDIR at every start and leaves that copy (about 20 MB) behind
    when it is killed with SIGKILL, as the crash tests do."""
    import tempfile
    config.jobd_tmpdir = tempfile.mkdtemp(prefix="jobd-tests-")
    os.environ["TMPDIR"] = config.jobd_tmpdir


def pytest_unconfigure(config):
    import shutil
    shutil.rmtree(getattr(config, "jobd_tmpdir", ""), ignore_errors=True)

ROOT = Path(__file__).resolve().parent.parent
BINARY = ROOT / "dist" / "jobd"
IMPLEMENTATIONS = [name for name in os.environ.get("JOBD_TEST_IMPL", "source,binary").split(",")
                   if name]


def jobd_command(impl):
    """argv prefix that starts jobd from source or from the frozen binary."""
    if impl == "source":
        return [sys.executable, str(ROOT / "jobd.py")]
    if not BINARY.exists():
        pytest.skip("dist/jobd is not built (make build); make test builds it")
    return [str(BINARY)]


def make_zip(files, modes=None, compression=zipfile.ZIP_DEFLATED):
    """A zip (bytes) of {name: str|bytes}; `modes` gives unix modes for some names."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = compression
            mode = (modes or {}).get(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, content.encode() if isinstance(content, str) else content)
    return buf.getvalue()


def unzip(data):
    """{name: bytes} of a zip given as bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:200]!r}>"


class Jobd:
    """A jobd subprocess with its own data directory and database, on 127.0.0.1."""

    def __init__(self, command, workdir, args=(), env=None):
        self.command = list(command)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = self.workdir / "data"
        self.db = self.workdir / "jobd.sqlite3"
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.proc = None
        self.port = None
        self.lines = []
        self._listening = threading.Event()

    # -- process ----------------------------------------------------------------------

    def argv(self):
        """The command that starts it."""
        return self.command + ["--host", "127.0.0.1", "--port", "0", "--db", str(self.db),
                               "--data", str(self.data)] + self.args

    def start(self, timeout=15):
        """Launch it and wait until it listens."""
        self.launch()
        if not self.wait_listening(timeout):
            self.kill()
            raise AssertionError("jobd did not start:\n" + self.log_text())
        return self

    def launch(self):
        """Start the process; a thread reads its log into self.lines and finds its port."""
        self.lines, self.port, self._listening = [], None, threading.Event()
        self.proc = subprocess.Popen(self.argv(), cwd=self.workdir, env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        threading.Thread(target=self._read_log, args=(self.proc, self.lines, self._listening),
                         daemon=True).start()

    def wait_listening(self, timeout):
        """The port, once jobd listens; None if it exits first or takes longer."""
        self._listening.wait(timeout)
        return self.port

    def _read_log(self, proc, lines, listening):
        # Each launch has its own list and event: the log of a killed jobd (the frozen one
        # is two processes) may end only after the next launch has begun.
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            lines.append(line)
            match = re.search(r"listening on http://\S*?:(\d+)", line)
            if match and not listening.is_set():
                self.port = int(match.group(1))
                listening.set()
        listening.set()  # the end of the log: jobd has exited

    def log_text(self):
        return "\n".join(self.lines[-200:])

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Send `sig` and wait for the exit; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"jobd did not exit within {timeout}s of {sig!r}")

    def kill(self):
        """SIGKILL jobd's whole process group (a crash: jobs' own groups survive)."""
        if self.proc is not None and self.proc.poll() is None:
            with_suppress(lambda: os.killpg(self.proc.pid, signal.SIGKILL))
            self.proc.wait(10)

    def close(self):
        """End of a test: stop gracefully when that is quick (the frozen jobd removes the
        copy of itself it unpacked into TMPDIR), else kill."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        self.kill()

    def restart(self):
        return self.start()

    # -- HTTP -------------------------------------------------------------------------

    def request(self, method, path, body=None, headers=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()

    def upload(self, job_id, files=None, zip_bytes=None, **extra):
        """POST /api/upload with {"id", "input": base64 of a zip} (plus extra keys)."""
        data = zip_bytes if zip_bytes is not None else make_zip(files or {"run.sh": "true\n"})
        body = {"id": job_id, "input": base64.b64encode(data).decode(), **extra}
        return self.request("POST", "/api/upload", json.dumps(body))

    def get(self, job_id):
        return self.request("GET", f"/api/get/{job_id}")

    def wait(self, job_id, timeout=30, ready=(200, 206)):
        """Poll GET /api/get/{id} until it is finished; the final Response."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.get(job_id)
            if resp.status in ready:
                return resp
            assert resp.status == 202, resp
            time.sleep(0.02)
        raise AssertionError(f"job {job_id} did not finish within {timeout}s\n" + self.log_text())

    def output(self, job_id, timeout=30):
        """(job object, {name: bytes} of its output zip) once the job has finished."""
        job = self.wait(job_id, timeout).json()
        return job, unzip(base64.b64decode(job["Output"], validate=True))


def with_suppress(fn):
    try:
        fn()
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(params=IMPLEMENTATIONS)
def jobd_command_for_impl(request):
    return jobd_command(request.param)


@pytest.fixture
def make_jobd(tmp_path, jobd_command_for_impl):
    """Factory: make_jobd(args=[...], env={...}) -> a started Jobd; all stopped at the end."""
    started = []

    def make(args=(), env=None, start=True, workdir=None):
        server = Jobd(jobd_command_for_impl, workdir or tmp_path, args, env)
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def jobd(make_jobd):
    """A started jobd with default settings."""
    return make_jobd()

"""The command-line client (`jobd submit|status|wait|fetch|logs|cancel|rm|ls`), end to end:
the client runs as a subprocess (source or frozen binary, like the server) against a real
jobd, or against tiny stub servers in this file where a server must misbehave (a zip-slip
result, the Go API only, a 401). Everything talks to 127.0.0.1 only."""

import base64
import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import threading
import time
import warnings
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT, Jobd, make_zip, unzip
from helpers import status, wait_status

STATUS_KEYS = ["LastUpdated", "ID", "Status", "Path", "Message", "SlurmID", "Slurml",
               "ExitCode", "CreatedAt", "StartedAt", "FinishedAt", "InputBytes", "OutputBytes"]
EXIT_ERROR, EXIT_UNREACHABLE, EXIT_UNAUTHORIZED, EXIT_NOT_FOUND = 110, 111, 112, 113
EXIT_FAILED, EXIT_CANCELLED, EXIT_TIMED_OUT, EXIT_NOT_FINISHED = 114, 115, 116, 117
EXIT_INTERRUPTED = 130


class Client:
    """Runs the client (`<jobd command> COMMAND ...`) against one server URL."""

    def __init__(self, command, url, cwd):
        self.command, self.url, self.cwd = list(command), url, Path(cwd)

    def env(self, extra=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBD_")}
        env["JOBD_URL"] = self.url
        env.update(extra or {})
        return env

    def run(self, *args, timeout=60, env=None):
        """CompletedProcess (text) of one client command."""
        return subprocess.run(self.command + [str(a) for a in args], cwd=self.cwd,
                              env=self.env(env), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def start(self, *args, env=None):
        """The client running in its own process group (see ctrl_c)."""
        return subprocess.Popen(self.command + [str(a) for a in args], cwd=self.cwd,
                                env=self.env(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)


@pytest.fixture
def client(jobd, jobd_command_for_impl, tmp_path):
    work = tmp_path / "client"
    work.mkdir()
    return Client(jobd_command_for_impl, f"http://127.0.0.1:{jobd.port}", work)


def stub_client(stub, jobd_command_for_impl, tmp_path):
    work = tmp_path / "client"
    work.mkdir(exist_ok=True)
    return Client(jobd_command_for_impl, stub.url, work)


def job_folder(base, files, name="job"):
    """A job folder holding `files` ({relative path: text}); its path."""
    folder = Path(base) / name
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return folder


def read_line(stream, timeout=20):
    """One line from a subprocess pipe, waiting at most `timeout` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "no line from the client in time"
    return stream.readline()


def one_line_error(result):
    """The client failed with exactly one line on stderr, and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobd: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def wait_for_log(jobd, text, count=1, timeout=10):
    """Wait until jobd's log holds `text` `count` times (its log is read by a thread)."""
    deadline = time.monotonic() + timeout
    while jobd.log_text().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return jobd.log_text().count(text)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- stub servers ----------------------------------------------------------------------------

def read_body(handler):
    """A request body, Content-Length or chunked (the client streams folders chunked)."""
    if "chunked" in handler.headers.get("Transfer-Encoding", ""):
        data = bytearray()
        for _ in range(1_000_000):
            size = int(handler.rfile.readline().split(b";")[0], 16)
            if size == 0:
                handler.rfile.readline()
                return bytes(data)
            data += handler.rfile.read(size)
            handler.rfile.readline()
        raise AssertionError("endless chunked body")
    return handler.rfile.read(int(handler.headers.get("Content-Length", 0)))


class Stub:
    """A tiny HTTP server on 127.0.0.1: `answer(request)` -> (status, headers, body)."""

    def __init__(self, answer):
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self):
                request = {"method": self.command, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()},
                           "body": read_body(self)}
                stub.requests.append(request)
                code, headers, body = answer(request)
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stubs():
    started = []

    def make(answer):
        stub = Stub(answer)
        started.append(stub)
        return stub

    yield make
    for stub in started:
        stub.close()


def json_answer(code, obj, **headers):
    return code, {"Content-Type": "application/json; charset=utf-8", **headers}, \
        json.dumps(obj).encode()


def status_object(job_id, state, message="", exit_code=None):
    return {"LastUpdated": "2026-01-01T00:00:00Z", "ID": job_id, "Status": state, "Path": "",
            "Message": message, "SlurmID": 0, "Slurml": False, "ExitCode": exit_code,
            "CreatedAt": "2026-01-01T00:00:00Z", "StartedAt": None, "FinishedAt": None,
            "InputBytes": 1, "OutputBytes": None}


def resource_stub(job_status, output=b""):
    """answer() of a resource-API server with one job `j1` in the given status object,
    whose result zip is `output`; POST /api/jobs accepts anything as j1."""
    def answer(request):
        path = request["path"]
        if path.startswith("/api/jobs?"):
            return json_answer(200, {"Jobs": [], "Next": None})
        if request["method"] == "POST" and path == "/api/jobs":
            return json_answer(201, status_object("j1", "QUEUED"), Location="/api/jobs/j1")
        if path == "/api/jobs/j1":
            return json_answer(200, job_status)
        if path == "/api/jobs/j1/output":
            return 200, {"Content-Type": "application/zip", "ETag": '"j1"'}, output
        return json_answer(404, {"error": "not_found", "message": "job not found", "status": 404})
    return answer


# ---- help and dispatch -----------------------------------------------------------------------

def test_help_names_server_flags_and_commands(jobd_command_for_impl):
    top = subprocess.run(jobd_command_for_impl + ["--help"], capture_output=True, text=True,
                         timeout=30)
    assert top.returncode == 0
    for word in ("--port", "--data", "serve", "submit", "status", "wait", "fetch", "logs",
                 "cancel", "rm", "ls", "health", "JOBD_URL"):
        assert word in top.stdout, word
    assert top.stdout.index("submit PATH") < top.stdout.index("--port")  # commands first
    for command in ("submit", "status", "wait", "fetch", "logs", "cancel", "rm", "ls"):
        sub = subprocess.run(jobd_command_for_impl + [command, "--help"], capture_output=True,
                             text=True, timeout=30)
        assert sub.returncode == 0 and f"usage: jobd {command}" in sub.stdout, sub
    assert "116" in subprocess.run(jobd_command_for_impl + ["wait", "--help"],
                                   capture_output=True, text=True, timeout=30).stdout
    bad = subprocess.run(jobd_command_for_impl + ["submit"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "PATH" in bad.stderr


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "unknown command 'bogus' (commands: serve, submit,"),
    (["--port", "1", "ls"], "the command comes first: jobd ls"),
    (["--port", "1", "extra"], "unrecognized arguments: extra"),
])
def test_a_wrong_command_line_says_what_is_wrong(jobd_command_for_impl, argv, message):
    result = subprocess.run(jobd_command_for_impl + argv, capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and message in result.stderr, result


def test_a_closed_stdout_is_no_error(client, jobd):
    assert jobd.upload("closed", {"run.sh": "true\n"}).status == 201
    result = subprocess.run(client.command + ["ls"], env=client.env(), capture_output=False,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=60, preexec_fn=lambda: os.close(1))
    assert result.returncode == 0 and result.stderr == "", result


def test_no_arguments_or_serve_still_serve(jobd_command_for_impl, tmp_path):
    server = Jobd(jobd_command_for_impl + ["serve"], tmp_path / "serve").start()
    try:
        assert server.request("GET", "/api/jobs").status == 200
    finally:
        server.close()
    env = dict(os.environ, PORT="0", DB_PATH=str(tmp_path / "db"), DATAPATH=str(tmp_path / "d"),
               JOBD_HOST="127.0.0.1")
    bare = subprocess.Popen(jobd_command_for_impl, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on http://127.0.0.1:" in read_line(bare.stderr)
    finally:
        bare.send_signal(signal.SIGTERM)
        bare.wait(30)


# ---- submit, wait, results -------------------------------------------------------------------

def test_submit_folder_prints_the_id_and_nothing_else(client, jobd, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "cat data/in.txt > copy.txt\n",
                                   "data/in.txt": "input\n"})
    result = client.run("submit", folder)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    job_id = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id), result.stdout
    wait_status(jobd, job_id, {"SUCCESS"})
    files = unzip(jobd.request("GET", f"/api/jobs/{job_id}/output").body)
    assert files["copy.txt"] == b"input\n" and files["data/in.txt"] == b"input\n"


def test_submit_wait_output_round_trip(client, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "mkdir -p res; tr a-z A-Z < in.txt > res/up.txt\n"
                                             "echo done\n",
                                   "in.txt": "hello\n"})
    os.chmod(folder / "run.sh", 0o755)
    result = client.run("submit", folder, "--id", "rt1", "--wait", "-o", "out/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "rt1\n" and result.stderr == ""
    out = client.cwd / "out"
    assert (out / "res" / "up.txt").read_text() == "HELLO\n"
    assert (out / "jobd.stdout").read_text() == "done\n"
    assert os.stat(out / "run.sh").st_mode & 0o111
    assert sorted(p.name for p in out.iterdir()) == ["in.txt", "jobd.stderr", "jobd.stdout",
                                                     "res", "run.sh"]  # no partial left


def test_a_name_that_is_not_utf8_is_zipped_as_the_server_zips_it(client, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "cat ./*.txt\n"})
    with open(os.path.join(os.fsencode(folder), b"bad\xff.txt"), "wb") as f:
        f.write(b"odd name\n")
    result = client.run("submit", folder, "--id", "odd", "--wait", "-o", "odd")
    assert result.returncode == 0, result.stderr
    assert (client.cwd / "odd" / "bad\ufffd.txt").read_bytes() == b"odd name\n"


def test_links_in_a_submitted_folder_are_followed(client, tmp_path):
    """As zip does: a link to a file or a folder goes as what it points to."""
    folder = job_folder(tmp_path, {"run.sh": "cat linked.txt shared/s.txt\n"})
    shared = job_folder(tmp_path, {"s.txt": "from a linked folder\n",
                                   "file.txt": "from a linked file\n"}, name="shared")
    os.symlink(shared / "file.txt", folder / "linked.txt")
    os.symlink(shared, folder / "shared")
    result = client.run("submit", folder, "--id", "links", "--wait", "-o", "links")
    assert result.returncode == 0, result.stderr
    assert (client.cwd / "links" / "jobd.stdout").read_text() == \
        "from a linked file\nfrom a linked folder\n"


def test_submit_zip_file(client, tmp_path):
    archive = tmp_path / "job.zip"
    archive.write_bytes(make_zip({"run.sh": "echo zipped > z.txt\n"}))
    result = client.run("submit", archive, "--wait", "-o", "zout")
    assert result.returncode == 0, result.stderr
    assert (client.cwd / "zout" / "z.txt").read_text() == "zipped\n"


def test_quick_start_example(client):
    result = client.run("submit", ROOT / "examples" / "hello", "--wait", "-o", "out/")
    assert result.returncode == 0, result.stderr
    assert (client.cwd / "out" / "greetings.txt").read_text() == \
        "Hello, Ada!\nHello, Grace!\nHello, Linus!\n"


def test_refuses_a_job_without_run_sh_before_uploading(client, jobd, tmp_path):
    folder = job_folder(tmp_path, {"other.sh": "true\n"})
    result = client.run("submit", folder)
    assert result.returncode == EXIT_ERROR and "run.sh" in one_line_error(result)
    archive = tmp_path / "nojob.zip"
    archive.write_bytes(make_zip({"sub/run.sh": "true\n"}))
    result = client.run("submit", archive)
    assert result.returncode == EXIT_ERROR and "run.sh" in one_line_error(result)
    # the server's rules, checked before the upload: './/run.sh' is run.sh, '../x' is not
    archive.write_bytes(make_zip({".//run.sh": "true\n", "../x": "x"}))
    result = client.run("submit", archive)
    assert result.returncode == EXIT_ERROR and "unsafe path" in one_line_error(result)
    assert jobd.request("GET", "/api/jobs").json()["Jobs"] == []
    archive.write_bytes(make_zip({".//run.sh": "true\n"}))
    assert client.run("submit", archive, "--id", "dotted").returncode == 0


@pytest.mark.parametrize("script, code", [("exit 7", 7), ("true", 0), ("kill -KILL $$", 137)])
def test_exit_code_propagates(client, tmp_path, script, code):
    folder = job_folder(tmp_path, {"run.sh": script + "\n"})
    result = client.run("submit", folder, "--wait")
    assert result.returncode == code, result.stderr
    job_id = result.stdout.strip()
    again = client.run("wait", job_id)
    assert again.returncode == code
    if code:
        assert f"job {job_id}: FAILED" in one_line_error(again)
    else:
        assert again.stderr == "" and again.stdout == ""


def test_json_output_parses(client, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "exit 3\n"})
    submitted = json.loads(client.run("submit", folder, "--json").stdout)
    assert list(submitted) == STATUS_KEYS and submitted["Status"] in ("QUEUED", "RUNNING",
                                                                      "FAILED")
    waited = client.run("wait", submitted["ID"], "--json")
    assert waited.returncode == 3
    final = json.loads(waited.stdout)
    assert final["Status"] == "FAILED" and final["ExitCode"] == 3
    shown = json.loads(client.run("status", submitted["ID"], "--json").stdout)
    assert shown == final
    listed = json.loads(client.run("ls", "--json").stdout)
    assert [job["ID"] for job in listed] == [submitted["ID"]]
    human = client.run("status", submitted["ID"])
    assert "FAILED (exit code 3)" in human.stdout and human.returncode == 0


# ---- cancel, time-outs, not found, unreachable -----------------------------------------------

def test_cancel_and_cancelled_exit_code(client, jobd, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "sleep 30\n"})
    job_id = client.run("submit", folder).stdout.strip()
    wait_status(jobd, job_id, {"RUNNING"})
    cancelled = client.run("cancel", job_id, "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["Status"] == "CANCELLED"
    result = client.run("wait", job_id)
    assert result.returncode == EXIT_CANCELLED and "CANCELLED" in one_line_error(result)
    done = job_folder(tmp_path, {"run.sh": "true\n"}, name="done")
    finished = client.run("submit", done, "--wait").stdout.strip()
    refused = client.run("cancel", finished)
    assert refused.returncode == EXIT_ERROR and "already finished" in one_line_error(refused)


def test_timed_out_job_exit_code(client, jobd, tmp_path):
    """A real time limit, once jobd enforces X-Jobd-Timeout (the production issue)."""
    folder = job_folder(tmp_path, {"run.sh": "sleep 4\n"})
    result = client.run("submit", folder, "--timeout", "1", "--wait")
    if result.returncode == 0:
        pytest.skip("this jobd does not enforce X-Jobd-Timeout yet")
    assert result.returncode == EXIT_TIMED_OUT, result.stderr
    assert "timed out" in result.stderr


def test_timeout_header_and_timed_out_code_with_a_stub(stubs, jobd_command_for_impl, tmp_path):
    timed_out = status_object("j1", "FAILED", "job timed out after 1.5 s", None)
    stub = stubs(resource_stub(timed_out, make_zip({"run.sh": "sleep 9\n"})))
    client = stub_client(stub, jobd_command_for_impl, tmp_path)
    folder = job_folder(tmp_path, {"run.sh": "sleep 9\n"})
    result = client.run("submit", folder, "--timeout", "1.5", "--wait")
    assert result.returncode == EXIT_TIMED_OUT, result.stderr
    upload = [r for r in stub.requests if r["method"] == "POST"][0]
    assert upload["headers"]["x-jobd-timeout"] == "1.5"
    assert upload["headers"]["transfer-encoding"] == "chunked"
    assert zipfile.ZipFile(io.BytesIO(upload["body"])).read("run.sh") == \
        b"sleep 9\n"
    # the job's own stderr saying "timed out" is not jobd's time limit
    own = status_object("j1", "FAILED", "could not finish the job, error: exit status 28: "
                                        "curl: operation timed out", 28)
    stub2 = stubs(resource_stub(own))
    result = stub_client(stub2, jobd_command_for_impl, tmp_path).run("wait", "j1")
    assert result.returncode == 28


def test_not_found_and_unreachable(client, jobd_command_for_impl, tmp_path):
    for command in (["status", "nosuch"], ["wait", "nosuch"], ["fetch", "nosuch"],
                    ["logs", "nosuch"], ["cancel", "nosuch"], ["rm", "nosuch"]):
        result = client.run(*command)
        assert result.returncode == EXIT_NOT_FOUND, (command, result)
        assert "nosuch" in one_line_error(result)
    nowhere = Client(jobd_command_for_impl, f"http://127.0.0.1:{free_port()}", client.cwd)
    folder = job_folder(tmp_path, {"run.sh": "true\n"})
    for command in (["status", "x"], ["submit", folder, "--wait"], ["ls"]):
        result = nowhere.run(*command)
        assert result.returncode == EXIT_UNREACHABLE, (command, result)
        assert "cannot reach jobd" in one_line_error(result)


def test_unauthorized(stubs, jobd_command_for_impl, tmp_path):
    def answer(request):
        if request["headers"].get("authorization") != "Bearer s3cret":
            return json_answer(401, {"error": "unauthorized", "message": "missing or wrong "
                                     "token", "status": 401}, **{"WWW-Authenticate": "Bearer"})
        return json_answer(200, status_object("j1", "SUCCESS", exit_code=0))
    client = stub_client(stubs(answer), jobd_command_for_impl, tmp_path)
    result = client.run("status", "j1")
    assert result.returncode == EXIT_UNAUTHORIZED and "JOBD_TOKEN" in one_line_error(result)
    assert client.run("status", "j1", env={"JOBD_TOKEN": "wrong"}).returncode == \
        EXIT_UNAUTHORIZED
    assert client.run("status", "j1", env={"JOBD_TOKEN": "s3cret"}).returncode == 0
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    result = client.run("status", "j1", "--token-file", token_file)
    assert result.returncode == 0 and "SUCCESS" in result.stdout
    result = client.run("status", "j1", "--token-file", tmp_path / "missing")
    assert result.returncode == EXIT_ERROR and "token file" in one_line_error(result)


def test_unauthorized_against_jobd_with_a_token(make_jobd, jobd_command_for_impl, tmp_path):
    """The real thing, once jobd takes a token (the production issue)."""
    server = make_jobd(env={**os.environ, "JOBD_TOKEN": "s3cret"})
    if server.request("GET", "/api/jobs").status != 401:
        pytest.skip("this jobd has no token authentication yet")
    client = Client(jobd_command_for_impl, f"http://127.0.0.1:{server.port}", tmp_path)
    assert client.run("ls").returncode == EXIT_UNAUTHORIZED
    folder = job_folder(tmp_path, {"run.sh": "echo ok\n"})
    result = client.run("submit", folder, "--wait", "-o", "out", env={"JOBD_TOKEN": "s3cret"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "jobd.stdout").read_text() == "ok\n"


# ---- logs, ls, rm ----------------------------------------------------------------------------

def test_logs_follow_streams_while_the_job_runs(client, jobd, tmp_path):
    # the job holds after its first line until the test, having seen it, lets it go on
    folder = job_folder(tmp_path, {"run.sh": "echo line 1; echo err 1 >&2\n"
                                             "for i in $(seq 300); do [ -e go ] && break; "
                                             "sleep 0.05; done\n"
                                             "for i in 2 3 4 5; do echo line $i; "
                                             "echo err $i >&2; sleep 0.1; done\n"})
    job_id = client.run("submit", folder).stdout.strip()
    follower = client.start("logs", job_id, "-f")
    try:
        assert read_line(follower.stdout) == "line 1\n"
        assert status(jobd, job_id)["Status"] == "RUNNING"
        (jobd.data / job_id / "go").touch()
        rest, errors = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 0 and rest == "".join(f"line {i}\n" for i in range(2, 6))
    assert status(jobd, job_id)["Status"] == "SUCCESS"
    result = client.run("logs", job_id, "--stderr")
    assert result.stdout == "".join(f"err {i}\n" for i in range(1, 6))
    assert client.run("logs", job_id).stdout.count("line") == 5


def test_logs_follow_resumes_a_cut_stream_where_it_was_cut(client, jobd, jobd_command_for_impl,
                                                           tmp_path):
    """Every answer is cut after 1,000 bytes; each reconnection asks for the log from the
    first byte not yet printed, so 3,000 bytes arrive whole, each once."""
    log = "".join(f"{i:05d} " + "x" * 93 + "\n" for i in range(30))  # 30 lines of 100 bytes
    folder = job_folder(tmp_path, {"log.txt": log, "run.sh": "cat log.txt; sleep 1\n"})
    job_id = client.run("submit", folder).stdout.strip()
    proxy = CuttingProxy(jobd.port, limit=1_000, cut=b"/logs/stdout")
    try:
        follower = Client(jobd_command_for_impl, proxy.url, client.cwd).run("logs", job_id, "-f")
    finally:
        proxy.close()
    assert follower.returncode == 0, follower.stderr
    assert follower.stdout == log
    offsets = [int(re.search(r"offset=(\d+)", line).group(1))
               for line in proxy.request_lines if "/logs/stdout" in line]
    assert len(offsets) == proxy.cuts + 1 >= 4 and offsets[0] == 0
    assert offsets == sorted(set(offsets)) and offsets[-1] < len(log)


def test_submit_follow_prints_the_jobs_stdout(client, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "echo first; sleep 0.3; echo second; exit 4\n"})
    result = client.run("submit", folder, "--follow")
    assert result.returncode == 4
    assert result.stdout == "first\nsecond\n"


def test_ls_status_filter(client, tmp_path):
    ok = job_folder(tmp_path, {"run.sh": "true\n"}, name="ok")
    bad = job_folder(tmp_path, {"run.sh": "exit 1\n"}, name="bad")
    ids = {name: client.run("submit", folder, "--wait").stdout.strip()
           for name, folder in (("ok1", ok), ("ok2", ok), ("bad", bad))}
    failed = json.loads(client.run("ls", "--status", "FAILED", "--json").stdout)
    assert [job["ID"] for job in failed] == [ids["bad"]]
    succeeded = client.run("ls", "--status", "success")
    lines = succeeded.stdout.splitlines()
    assert len(lines) == 2 and "ID" not in lines[0]  # no header line when piped
    assert [line.split()[0] for line in lines] == [ids["ok2"], ids["ok1"]]  # newest first
    assert len(client.run("ls", "--limit", "1").stdout.splitlines()) == 1
    assert client.run("ls", "--status", "BOGUS").returncode == EXIT_ERROR


def test_rm(client, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "sleep 20\n"})
    job_id = client.run("submit", folder).stdout.strip()
    result = client.run("rm", job_id)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert client.run("status", job_id).returncode == EXIT_NOT_FOUND
    assert client.run("rm", job_id).returncode == EXIT_NOT_FOUND


# ---- fetch: resume, overwrite, safety --------------------------------------------------------

class CuttingProxy:
    """Forwards connections on 127.0.0.1 to jobd, cutting every answer to a GET whose path
    holds `cut` (a job's output: an interrupted download) after `limit` bytes."""

    def __init__(self, port, limit, cut=b"/output "):
        self.port, self.limit, self.cut = port, limit, cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts = 0
        self.request_lines = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        for _ in range(100):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.forward, args=(conn,), daemon=True).start()

    def forward(self, conn):
        with conn, socket.create_connection(("127.0.0.1", self.port)) as upstream:
            conn.settimeout(10)
            upstream.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            upstream.sendall(head)  # GET requests only: no body follows
            self.request_lines.append(head.split(b"\r\n")[0].decode())
            cut = self.cut in self.request_lines[-1].encode()
            sent = 0
            while True:
                data = upstream.recv(65536)
                if not data:
                    return
                if cut and sent + len(data) >= self.limit:
                    conn.sendall(data[:self.limit - sent])
                    self.cuts += 1
                    return
                conn.sendall(data)
                sent += len(data)

    def close(self):
        self.listener.close()


def test_fetch_resumes_a_cut_download(client, jobd, jobd_command_for_impl, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "head -c 6000000 /dev/urandom > random.bin\n"})
    job_id = client.run("submit", folder, "--wait").stdout.strip()
    whole = unzip(jobd.request("GET", f"/api/jobs/{job_id}/output").body)
    proxy = CuttingProxy(jobd.port, limit=1_000_000)
    try:
        cut = Client(jobd_command_for_impl, proxy.url, client.cwd).run("fetch", job_id,
                                                                        "-o", "res")
    finally:
        proxy.close()
    # cut three times (one try and two resumes at once), then it gives up, keeping the part
    assert cut.returncode == EXIT_UNREACHABLE and proxy.cuts == 3, cut.stderr
    assert "run the same command again" in one_line_error(cut)
    part = client.cwd / "res" / f".jobd-{job_id}.zip.part"
    assert 2_500_000 < part.stat().st_size < 3_000_000
    ranged = f"path=/api/jobs/{job_id}/output status=206"
    assert wait_for_log(jobd, ranged, 2) == 2
    resumed = client.run("fetch", job_id, "-o", "res")
    assert resumed.returncode == 0, resumed.stderr
    assert wait_for_log(jobd, ranged, 3) == 3
    assert (client.cwd / "res" / "random.bin").read_bytes() == whole["random.bin"]
    assert not part.exists() and not Path(str(part) + ".etag").exists()


def test_fetch_restarts_when_the_output_changed(client, jobd, tmp_path):
    """A partial download of another job with the same id (a different ETag): If-Range
    makes jobd send the whole new output, which replaces the stale part."""
    folder = job_folder(tmp_path, {"run.sh": "echo new > new.txt\n"})
    assert client.run("submit", folder, "--id", "same", "--wait").returncode == 0
    (client.cwd / "res").mkdir()
    part = client.cwd / "res" / ".jobd-same.zip.part"
    part.write_bytes(b"stale bytes of an older job")
    Path(str(part) + ".etag").write_text('"same-1-999"')
    assert client.run("fetch", "same", "-o", "res").returncode == 0
    assert (client.cwd / "res" / "new.txt").read_text() == "new\n"
    assert wait_for_log(jobd, "path=/api/jobs/same/output status=200") == 1


def test_fetch_zip_and_unfinished(client, jobd, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "echo z > z.txt\n"})
    job_id = client.run("submit", folder, "--wait").stdout.strip()
    assert client.run("fetch", job_id, "--zip", "r.zip").returncode == 0
    assert unzip((client.cwd / "r.zip").read_bytes())["z.txt"] == b"z\n"
    assert client.run("fetch", job_id, "--zip", "r.zip").returncode == EXIT_ERROR
    assert client.run("fetch", job_id, "--zip", "r.zip", "--force").returncode == 0
    assert client.run("fetch", job_id).returncode == 0  # default folder: ./ID
    assert (client.cwd / job_id / "z.txt").read_text() == "z\n"
    slow = job_folder(tmp_path, {"run.sh": "sleep 20\n"}, name="slow")
    slow_id = client.run("submit", slow).stdout.strip()
    result = client.run("fetch", slow_id, "-o", "never")
    assert result.returncode == EXIT_NOT_FINISHED and "not finished" in one_line_error(result)
    assert not (client.cwd / "never").exists()


def test_fetch_refuses_to_overwrite_without_force(client, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "echo theirs > result.txt\n"})
    job_id = client.run("submit", folder, "--wait").stdout.strip()
    out = client.cwd / "out"
    out.mkdir()
    (out / "result.txt").write_text("mine\n")
    result = client.run("fetch", job_id, "-o", out)
    assert result.returncode == EXIT_ERROR
    assert "result.txt exists" in one_line_error(result) and "--force" in result.stderr
    assert (out / "result.txt").read_text() == "mine\n" and not (out / "run.sh").exists()
    result = client.run("fetch", job_id, "-o", out, "--force")
    assert result.returncode == 0, result.stderr
    assert (out / "result.txt").read_text() == "theirs\n"


def evil_zip(name, symlink=False):
    info = zipfile.ZipInfo(name)
    if symlink:
        info.external_attr = 0o120777 << 16
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr("fine.txt", "fine\n")
        zf.writestr(info, "/etc" if symlink else "evil\n")
    return data.getvalue()


@pytest.mark.parametrize("name, symlink", [("../escape.txt", False), ("a/../../escape.txt", False),
                                           ("/tmp/jobd-client-abs.txt", False),
                                           ("..\\escape.txt", False), ("link", True)])
def test_fetch_refuses_a_malicious_result_zip(stubs, jobd_command_for_impl, tmp_path, name,
                                              symlink):
    done = status_object("j1", "SUCCESS", "job finished successfully", 0)
    stub = stubs(resource_stub(done, evil_zip(name, symlink)))
    client = stub_client(stub, jobd_command_for_impl, tmp_path)
    result = client.run("fetch", "j1", "-o", "box/inner")
    assert result.returncode == EXIT_ERROR, result
    assert "refused" in one_line_error(result)
    assert not (client.cwd / "box" / "escape.txt").exists()
    assert not Path("/tmp/jobd-client-abs.txt").exists()
    kept = sorted(p.name for p in (client.cwd / "box" / "inner").iterdir())
    assert kept == [".jobd-j1.zip.part", ".jobd-j1.zip.part.etag"]  # only the download


def test_fetch_checks_every_name_before_writing_anything(stubs, jobd_command_for_impl,
                                                          tmp_path):
    done = status_object("j1", "SUCCESS", "job finished successfully", 0)
    for n, entries in enumerate(([("a.txt", "1"), ("a.txt", "2")],
                                 [("a.txt", "1"), ("a.txt/b", "2")])):
        data = io.BytesIO()
        with zipfile.ZipFile(data, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": the point of this zip
            for name, text in entries:
                zf.writestr(name, text)
        client = stub_client(stubs(resource_stub(done, data.getvalue())),
                             jobd_command_for_impl, tmp_path)
        result = client.run("fetch", "j1", "-o", f"res{n}", "--force")
        assert result.returncode == EXIT_ERROR and "refused" in one_line_error(result), result
        assert not (client.cwd / f"res{n}" / "a.txt").exists()


def test_fetch_never_writes_through_a_link_in_the_folder(stubs, jobd_command_for_impl,
                                                          tmp_path):
    done = status_object("j1", "SUCCESS", "job finished successfully", 0)
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr("sub/planted.txt", "evil\n")
    client = stub_client(stubs(resource_stub(done, data.getvalue())), jobd_command_for_impl,
                         tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (client.cwd / "res").mkdir()
    os.symlink(outside, client.cwd / "res" / "sub")
    for force in ([], ["--force"]):
        result = client.run("fetch", "j1", "-o", "res", *force)
        assert result.returncode == EXIT_ERROR, result
        assert "symbolic link" in one_line_error(result)
        assert list(outside.iterdir()) == []


# ---- Ctrl-C while waiting --------------------------------------------------------------------

def ctrl_c(proc):
    """SIGINT to the client's whole process group, as a terminal sends it: a frozen jobd's
    bootloaders get it too, and forward it to the Python process, which so gets copies."""
    os.killpg(proc.pid, signal.SIGINT)


def start_waiting(client, jobd, tmp_path, *flags):
    """A `submit --wait` of a long job, once it is in its waiting loop (it has asked
    jobd for the job's status)."""
    folder = job_folder(tmp_path, {"run.sh": "sleep 30\n"})
    proc = client.start("submit", folder, "--wait", *flags)
    job_id = read_line(proc.stdout).strip()
    assert wait_for_log(jobd, f"path=/api/jobs/{job_id} status=200") >= 1, jobd.log_text()
    return proc, job_id


def test_ctrl_c_leaves_the_job_running(client, jobd, tmp_path):
    proc, job_id = start_waiting(client, jobd, tmp_path, "-o", "later")
    ctrl_c(proc)
    time.sleep(0.05)  # a late copy of the same Ctrl-C (a busy bootloader forwarding it)
    proc.send_signal(signal.SIGINT)
    _, errors = proc.communicate(timeout=15)
    assert proc.returncode == EXIT_INTERRUPTED, errors
    assert f"job {job_id} keeps running" in errors
    assert f"jobd wait {job_id} -o later" in errors and "Traceback" not in errors
    assert status(jobd, job_id)["Status"] in ("QUEUED", "RUNNING")


def test_second_ctrl_c_cancels_the_job(client, jobd, tmp_path):
    proc, job_id = start_waiting(client, jobd, tmp_path)
    ctrl_c(proc)
    time.sleep(0.7)
    ctrl_c(proc)
    _, errors = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_CANCELLED, errors
    assert status(jobd, job_id)["Status"] == "CANCELLED"


def test_cancel_on_interrupt(client, jobd, tmp_path):
    proc, job_id = start_waiting(client, jobd, tmp_path, "--cancel-on-interrupt")
    ctrl_c(proc)
    _, errors = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_CANCELLED, errors
    assert status(jobd, job_id)["Status"] == "CANCELLED"


# ---- terminal or pipe ------------------------------------------------------------------------

def run_in_terminal(client, *args, timeout=60):
    """(exit status, everything written to the terminal) of the client under a pty."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(client.command + [str(a) for a in args], cwd=client.cwd,
                            env=client.env(), stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the client has exited and closed the terminal
                break
            if not data:
                break
            output += data
    os.close(leader)
    return proc.wait(timeout=10), output.decode("utf-8", "replace")


def test_progress_line_only_on_a_terminal(client, tmp_path):
    folder = job_folder(tmp_path, {"run.sh": "sleep 2; echo hi > hi.txt\n"})
    (folder / "big.bin").write_bytes(os.urandom(3_000_000))
    code, screen = run_in_terminal(client, "submit", folder, "--wait", "-o", "tty-out")
    assert code == 0, screen
    assert "\r\x1b[K" in screen and re.search(r"uploading: [\d.]+ [kM]?B  [\d.]+ [kM]?B/s",
                                                 screen), screen
    assert re.search(r"job [0-9a-f]{32}: (QUEUED|RUNNING)  0:0\d", screen), screen
    assert "downloading:" in screen and "SUCCESS" in screen
    piped = client.run("submit", folder, "--wait", "-o", "pipe-out")
    assert piped.returncode == 0 and piped.stderr == ""
    assert re.fullmatch(r"[0-9a-f]{32}\n", piped.stdout)


# ---- against a server with only the Go API ---------------------------------------------------

class GoStub:
    """The Go jobd's wire contract (docs/spec/go-contract.md), nothing more: /api/upload,
    /api/get/{id} (202 twice, then the result), plain-text 404 elsewhere. A job "runs" by
    adding result.txt to its input; `exit N` in run.sh makes it fail as Go words it."""

    def __init__(self, json_404=False):
        self.jobs, self.polls, self.json_404 = {}, {}, json_404

    def answer(self, request):
        path = request["path"]
        if request["method"] == "POST" and path == "/api/upload":
            fields = {k.lower(): v for k, v in json.loads(request["body"]).items()}
            job_id, data = fields["id"], base64.b64decode(fields["input"], validate=True)
            if job_id in self.jobs:
                return json_answer(400, {"error": "bad_request", "message": "job already "
                                         "exists", "status": 400})
            self.jobs[job_id] = unzip(data)
            return json_answer(201, self.job_object(job_id, "QUEUED", "", fields["input"]))
        match = re.fullmatch(r"/api/get/([^/]+)", path)
        if request["method"] == "GET" and match:
            job_id = match.group(1)
            if job_id not in self.jobs:
                return json_answer(404, {"error": "not_found", "message": "job not found",
                                         "status": 404})
            self.polls[job_id] = self.polls.get(job_id, 0) + 1
            if self.polls[job_id] <= 2:
                return json_answer(202, {"error": "no_content", "message": "job not ready",
                                         "status": 202})
            files = dict(self.jobs[job_id], **{"result.txt": b"computed\n"})
            code = re.search(rb"exit (\d+)", files["run.sh"])
            state, message = ("FAILED", f"could not finish the job, error: exit status "
                                        f"{int(code.group(1))}") if code else \
                ("SUCCESS", "job finished successfully")
            output = base64.b64encode(make_zip(files)).decode()
            return json_answer(200, self.job_object(job_id, state, output, "", message))
        if self.json_404:  # a jobd from before /api/jobs
            return json_answer(404, {"error": "not_found", "message": "no such endpoint: "
                                     + path.split("?")[0], "status": 404})
        return 404, {"Content-Type": "text/plain"}, b"404 page not found"

    @staticmethod
    def job_object(job_id, state, output, echoed_input, message=""):
        return {"LastUpdated": "2026-11-29T05:45:34.406774229Z", "ID": job_id, "Status": state,
                "Path": "/data/" + job_id, "Input": echoed_input, "Output": output,
                "Message": message, "SlurmID": 0, "Slurml": False}


@pytest.mark.parametrize("json_404", [False, True], ids=["go-404", "jobd-404"])
def test_go_api_fallback(stubs, jobd_command_for_impl, tmp_path, json_404):
    go = GoStub(json_404)
    stub = stubs(go.answer)
    client = stub_client(stub, jobd_command_for_impl, tmp_path)
    folder = job_folder(tmp_path, {"run.sh": "echo hi\n", "in/data.txt": "data\n"})
    result = client.run("submit", folder, "--wait", "-o", "out")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert (client.cwd / "out" / "result.txt").read_text() == "computed\n"
    assert (client.cwd / "out" / "in" / "data.txt").read_text() == "data\n"
    upload = [r for r in stub.requests if r["path"] == "/api/upload"][0]
    assert upload["headers"]["transfer-encoding"] == "chunked"  # a folder: streamed
    # a zip: streamed too, with its Content-Length worked out beforehand
    archive = tmp_path / "fail.zip"
    archive.write_bytes(make_zip({"run.sh": "exit 3\n"}))
    result = client.run("submit", archive, "--id", "gofail")
    assert result.returncode == 0 and result.stdout == "gofail\n", result.stderr
    upload = [r for r in stub.requests if r["path"] == "/api/upload"][-1]
    assert int(upload["headers"]["content-length"]) == len(upload["body"])
    assert client.run("fetch", "gofail", "-o", "early").returncode == EXIT_NOT_FINISHED
    assert not (client.cwd / "early").exists()
    result = client.run("wait", "gofail")
    assert result.returncode == 3 and "exit status 3" in one_line_error(result)
    assert client.run("fetch", "gofail", "-o", "res").returncode == 0
    assert (client.cwd / "res" / "result.txt").read_text() == "computed\n"
    assert client.run("submit", archive, "--id", "gofail").returncode == EXIT_ERROR
    assert client.run("wait", "nosuch").returncode == EXIT_NOT_FOUND
    result = client.run("status", job_id)
    assert result.returncode == EXIT_ERROR and "/api/jobs" in one_line_error(result)


def test_health_for_a_container_healthcheck(client, jobd):
    healthy = client.run("health")
    assert healthy.returncode == 0 and healthy.stdout.strip() == "ok", healthy
    details = client.run("health", "--json")
    assert json.loads(details.stdout)["database"] == "ok"
    tmp = jobd.data / ".jobd" / "tmp"  # a data directory that cannot be written: 503
    os.rename(tmp, tmp.with_name("tmp-away"))
    tmp.write_text("not a directory")
    try:
        sick = client.run("health")
        assert sick.returncode == EXIT_ERROR and sick.stdout.strip() == "error", sick
    finally:
        tmp.unlink()
        os.rename(tmp.with_name("tmp-away"), tmp)
    gone = client.run("health", "--url", "http://127.0.0.1:9")
    assert gone.returncode == EXIT_UNREACHABLE

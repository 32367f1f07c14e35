"""Configuration: the Go environment variables, flags that win over them, defaults,
--version/--help, and refusals of bad values."""

import os
import shutil
import signal
import socket
import subprocess

import pytest

from conftest import Jobd
from helpers import wait_until

BASE_ENV = {k: v for k, v in os.environ.items()
            if k not in ("PORT", "DB_PATH", "DATAPATH", "DEBUG") and not k.startswith("JOBD_")}


class BareJobd(Jobd):
    """A jobd started with exactly the given arguments (the fixture's always pins
    --host, --port, --db and --data)."""

    def argv(self):
        return self.command + self.args


@pytest.fixture
def bare(tmp_path, jobd_command_for_impl):
    """Factory: bare(args, env, cwd=None) -> a started BareJobd on 127.0.0.1 unless the
    arguments say otherwise; all killed at the end."""
    started = []

    def make(args, env=None, cwd=None, prefix=()):
        server = BareJobd(list(prefix) + jobd_command_for_impl, cwd or tmp_path, args,
                          {**BASE_ENV, **(env or {})})
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.kill()


@pytest.fixture
def run_jobd(jobd_command_for_impl, tmp_path):
    """Run jobd to its exit (for --help, --version and refusals): (code, stdout, stderr)."""
    def run(args, env=None, timeout=15):
        proc = subprocess.run(jobd_command_for_impl + list(args), cwd=tmp_path,
                              env={**BASE_ENV, **(env or {})}, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, text=True)
        return proc.returncode, proc.stdout, proc.stderr
    return run


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_line(server):
    return next(line for line in server.lines if "listening on http://" in line)


def run_one_job(server, job_id="cfg", script="echo cfg\n"):
    assert server.upload(job_id, {"run.sh": script}).status == 201
    job, files = server.output(job_id, timeout=15)
    assert job["Status"] == "SUCCESS", job["Message"]
    return files


# ==================================================================================
# The Go environment variables, and flags over them
# ==================================================================================

def test_port_from_the_environment(bare, tmp_path):
    port = free_port()
    server = bare(["--host", "127.0.0.1"], env={"PORT": str(port)})
    assert server.port == port
    run_one_job(server)


def test_port_flag_wins_over_the_environment(bare):
    env_port, flag_port = free_port(), free_port()
    server = bare(["--host", "127.0.0.1", "--port", str(flag_port)], env={"PORT": str(env_port)})
    assert server.port == flag_port != env_port


def test_db_path_and_datapath_from_the_environment(bare, tmp_path):
    server = bare(["--host", "127.0.0.1", "--port", "0"],
                  env={"DB_PATH": str(tmp_path / "custom.sqlite3"),
                       "DATAPATH": str(tmp_path / "jobs"), "DEBUG": "true"})
    run_one_job(server)
    assert (tmp_path / "custom.sqlite3").is_file()
    assert (tmp_path / "jobs" / "cfg" / "jobd.stdout").read_text() == "cfg\n"  # Go's layout
    assert not (tmp_path / "db").exists() and not (tmp_path / "data").exists()


def test_db_path_naming_an_existing_directory_holds_the_database_there(bare, tmp_path):
    (tmp_path / "dbdir").mkdir()
    server = bare(["--host", "127.0.0.1", "--port", "0"],
                  env={"DB_PATH": str(tmp_path / "dbdir"), "DATAPATH": str(tmp_path / "jobs")})
    run_one_job(server)
    assert (tmp_path / "dbdir" / "jobd.sqlite3").is_file()
    server.stop()
    server.start()  # and it finds its jobs there again
    assert server.output("cfg")[0]["Status"] == "SUCCESS"


def test_db_and_data_flags_win_over_the_environment(bare, tmp_path):
    server = bare(["--host", "127.0.0.1", "--port", "0", "--db", str(tmp_path / "flag.sqlite3"),
                   "--data", str(tmp_path / "flagdata")],
                  env={"DB_PATH": str(tmp_path / "env.sqlite3"),
                       "DATAPATH": str(tmp_path / "envdata")})
    run_one_job(server)
    assert (tmp_path / "flag.sqlite3").is_file() and (tmp_path / "flagdata").is_dir()
    assert not (tmp_path / "env.sqlite3").exists() and not (tmp_path / "envdata").exists()


def test_defaults_are_db_and_data_in_the_working_directory(bare, tmp_path):
    server = bare(["--host", "127.0.0.1", "--port", "0"], env={"DB_PATH": "", "DATAPATH": ""})
    run_one_job(server)
    assert (tmp_path / "db").is_file()   # Go's ./db, as our SQLite file
    assert (tmp_path / "data").is_dir()
    assert not (tmp_path / "data" / "cfg").exists()  # no DEBUG: the job directory goes


@pytest.mark.parametrize("env,args,kept", [
    ({"DEBUG": "true"}, [], True),
    ({}, ["--debug"], True),
    ({"DEBUG": "false"}, [], False),
    ({"DEBUG": ""}, [], False),
    ({}, [], False),
], ids=["DEBUG=true", "--debug", "DEBUG=false", "DEBUG=empty", "unset"])
def test_debug_keeps_the_job_directory(bare, tmp_path, env, args, kept):
    server = bare(["--host", "127.0.0.1", "--port", "0", "--db", str(tmp_path / "j.sqlite3"),
                   "--data", str(tmp_path / "data")] + args, env=env)
    files = run_one_job(server, script="echo kept > result.txt\n")
    assert files["result.txt"] == b"kept\n"
    job_dir = tmp_path / "data" / "cfg"
    if kept:
        assert (job_dir / "result.txt").read_text() == "kept\n"
        assert (job_dir / "run.sh").exists() and (job_dir / "jobd.stderr").exists()
    else:
        assert not job_dir.exists()


def test_workers_from_environment_and_flag(bare, tmp_path):
    common = ["--host", "127.0.0.1", "--port", "0", "--db", str(tmp_path / "j.sqlite3"),
              "--data", str(tmp_path / "data")]
    server = bare(common, env={"JOBD_WORKERS": "3"})
    assert "workers=3" in listening_line(server).split()
    server.stop()
    server = bare(common + ["--workers", "1"], env={"JOBD_WORKERS": "3"})
    assert "workers=1" in listening_line(server).split()


def test_default_workers_is_the_cpu_count(bare, tmp_path):
    server = bare(["--host", "127.0.0.1", "--port", "0", "--db", str(tmp_path / "j.sqlite3"),
                   "--data", str(tmp_path / "data")])
    assert f"workers={os.cpu_count()}" in listening_line(server).split()


def test_serve_subcommand_is_accepted(bare, tmp_path):
    server = bare(["serve", "--host", "127.0.0.1", "--port", "0", "--db",
                   str(tmp_path / "j.sqlite3"), "--data", str(tmp_path / "data")])
    run_one_job(server)


def test_default_port_8080_on_all_interfaces(bare, tmp_path):
    # Go listens on :8080. Check it without taking 8080 (or any port) on this machine:
    # in a fresh network namespace, which has nothing but a down loopback.
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--net", "true"],
                                         capture_output=True).returncode != 0:
        pytest.skip("cannot make a network namespace here (unshare --net)")
    server = bare(["--db", str(tmp_path / "j.sqlite3"), "--data", str(tmp_path / "data")],
                  prefix=[unshare, "--net"])
    # every interface, IPv6 and IPv4 (the namespace's loopback is down, so "::" binds
    # dual-stack when the kernel has IPv6, else 0.0.0.0)
    line = listening_line(server)
    assert "listening on http://[::]:8080" in line or "listening on http://0.0.0.0:8080" in line
    assert server.stop() == 0


# ==================================================================================
# --version, --help, and refusals
# ==================================================================================

def test_version(run_jobd):
    code, out, err = run_jobd(["--version"])
    assert code == 0
    assert out.startswith("jobd ") and out.split()[1][0].isdigit(), (out, err)


def test_help_lists_flags_and_the_go_variables(run_jobd):
    code, out, _ = run_jobd(["--help"])
    assert code == 0
    for word in ("--host", "--port", "--db", "--data", "--workers", "--retention", "--grace",
                 "--max-upload", "--max-unpacked", "--max-entries", "--request-timeout",
                 "--version", "PORT", "DB_PATH", "DATAPATH", "DEBUG"):
        assert word in out, word


@pytest.mark.parametrize("args,env", [
    (["--port", "abc"], {}), (["--port", "70000"], {}), (["--port", "-1"], {}),
    (["--workers", "0"], {}), (["--workers", "many"], {}), (["--retention", "forever"], {}),
    (["--retention", "-1"], {}), (["--grace", "soon"], {}), (["--max-upload", "12Q"], {}),
    (["--max-unpacked", "big"], {}), (["--max-entries", "0"], {}),
    (["--request-timeout", "never"], {}), (["--log-format", "xml"], {}),
    ([], {"PORT": "abc"}), ([], {"PORT": "99999"}), ([], {"JOBD_WORKERS": "0"}),
    ([], {"JOBD_RETENTION": "2 weeks"}), ([], {"JOBD_MAX_UPLOAD": "lots"}),
], ids=lambda value: " ".join(value) if isinstance(value, list) else
    ",".join(f"{k}={v}" for k, v in value.items()))
def test_bad_values_give_a_one_line_error(run_jobd, tmp_path, args, env):
    code, out, err = run_jobd(["--host", "127.0.0.1", "--db", str(tmp_path / "j.sqlite3"),
                               "--data", str(tmp_path / "data")] + args, env=env)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "listening" not in err and "Traceback" not in err
    name = args[0] if args else next(iter(env))
    assert name in lines[0], lines[0]
    assert not (tmp_path / "j.sqlite3").exists()  # refused before touching anything


def test_unknown_flag_is_refused(run_jobd):
    code, _, err = run_jobd(["--no-such-flag"])
    assert code != 0 and "--no-such-flag" in err and "Traceback" not in err


def test_port_in_use_gives_a_one_line_error(run_jobd, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, _, err = run_jobd(["--host", "127.0.0.1", "--port", str(port), "--db",
                                 str(tmp_path / "j.sqlite3"), "--data", str(tmp_path / "data")])
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("flag,where", [("--db", "/proc/jobd-test/x.sqlite3"),
                                        ("--data", "/proc/jobd-test/data")])
def test_unusable_paths_give_a_one_line_error(run_jobd, tmp_path, flag, where):
    args = {"--db": str(tmp_path / "j.sqlite3"), "--data": str(tmp_path / "data"), flag: where}
    code, _, err = run_jobd(["--host", "127.0.0.1", "--port", "0", "--db", args["--db"],
                             "--data", args["--data"]])
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err


def test_sigterm_right_after_start_exits_0(bare, tmp_path):
    server = bare(["--host", "127.0.0.1", "--port", "0", "--db", str(tmp_path / "j.sqlite3"),
                   "--data", str(tmp_path / "data")])
    assert server.stop(signal.SIGTERM, timeout=10) == 0
    wait_until(lambda: any("stopped" in line for line in server.lines), 5, what="the last line")

"""The static binary in foreign root file systems (issue 3: the root-filesystem matrix).

Each case copies dist/jobd (or $JOBD_BINARY) into a root, starts it with chroot inside a
private mount namespace (`unshare --mount`) with /proc and a minimal /dev mounted (what any
container runtime provides), runs one job over HTTP on
127.0.0.1, and stops it with SIGTERM, which must give exit status 0. Mounts made inside the
namespace vanish with it; anything still mounted under a root afterwards is lazily unmounted.
Root only: the cases are skipped, with the reason, for anyone else.
"""
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jobd_client  # noqa: E402
from conftest import Jobd  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BINARY = Path(os.environ.get("JOBD_BINARY") or REPO / "dist" / "jobd")
ROOTFS_CACHE = REPO / ".cache" / "rootfs" / "bookworm"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
JOB_TIMEOUT = 60.0
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/",
    "JOBD_TEST_MARK": "frozen",
}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="root-filesystem matrix needs root (chroot, mount namespaces, /proc mounts)"),
    pytest.mark.skipif(not BINARY.is_file(),
                       reason="no static binary at %s: run `make build` first (or set JOBD_BINARY)" % BINARY),
    pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("chroot") is None,
                       reason="needs unshare and chroot (util-linux, coreutils)"),
]


# ---------------------------------------------------------------------------- roots

def make_root(path, tmp=True):
    """A root holding only /jobd, /proc and /dev (mount points), /data and, if tmp, /tmp (1777)."""
    path.mkdir()
    shutil.copy(BINARY, path / "jobd")
    os.chmod(path / "jobd", 0o755)
    for name in ("proc", "dev", "data"):
        (path / name).mkdir()
    if tmp:
        (path / "tmp").mkdir()
        os.chmod(path / "tmp", 0o1777)
    return path


def add_busybox(root):
    """Put a static busybox and the applets the jobs use into root/bin."""
    busybox = shutil.which("busybox")
    if busybox is None or not _is_static(busybox):
        pytest.skip("needs a static busybox (apt-get install busybox-static)")
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    for applet in ("sh", "cat", "echo", "env", "id", "ls", "sleep", "touch"):
        os.symlink("busybox", root / "bin" / applet)
    return root


def _is_static(path):
    """True when the ELF file has no program interpreter (no PT_INTERP)."""
    out = subprocess.run(["readelf", "-l", path], capture_output=True, text=True).stdout
    return "INTERP" not in out


@pytest.fixture(scope="session")
def debian_rootfs():
    """Debian bookworm minbase + python3, made once by ci/make-rootfs.sh and cached in .cache/."""
    proc = subprocess.run(["bash", str(REPO / "ci" / "make-rootfs.sh"), str(ROOTFS_CACHE)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip("cannot make the Debian root: %s" % proc.stderr.strip()[-500:])
    return ROOTFS_CACHE


def static_hello(tmp_path):
    """A static ELF that prints a line: a job that runs even in an empty root (no shell)."""
    cc = shutil.which("musl-gcc") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = tmp_path / "hello.c"
    src.write_text('#include <stdio.h>\nint main(void){puts("hello from scratch");return 0;}\n')
    out = tmp_path / "hello"
    if subprocess.run([cc, "-static", "-Os", "-o", str(out), str(src)],
                      capture_output=True).returncode != 0:
        return None
    return out.read_bytes()


# ---------------------------------------------------------------------------- running

class Jail(Jobd):
    """jobd started by chroot in a private mount namespace; always cleaned up by close()."""

    def __init__(self, root, prefix=(), setup=(), env=None, user=None, pid1=False, dev=True):
        super().__init__(["/jobd"], root)  # the path inside the root; argv() wraps it
        self.root = Path(root)
        self.dev = dev               # mount a /dev with the basic nodes, as runtimes do
        self.prefix = list(prefix)   # shell steps before /proc is mounted (e.g. make the root)
        self.setup = list(setup)     # shell steps after
        self.inner_env = dict(BASE_ENV if env is None else env)
        self.user = user
        self.pid1 = pid1

    def start(self, args=("--host", "127.0.0.1", "--port", "0", "--db", "/data/jobd.sqlite3",
                          "--data", "/data/jobs")):
        """Launch jobd in the jail; wait_listening() or wait_exit() then."""
        self.args = list(args)
        self.launch()
        return self

    def argv(self):
        # What a container runtime gives every image, FROM scratch included: /proc, and a /dev
        # with the basic device nodes (jobs get /dev/null as stdin).
        dev = shlex.quote(str(self.root / "dev"))
        steps = self.prefix + ["mount -t proc proc %s" % shlex.quote(str(self.root / "proc"))]
        if self.dev:
            steps += ["mount -t tmpfs -o mode=755,nosuid tmpfs %s" % dev]
            for node in ("null", "zero", "full", "random", "urandom"):
                steps += [": > %s/%s" % (dev, node),
                          "mount --bind /dev/%s %s/%s" % (node, dev, node)]
        steps += self.setup
        chroot = ["chroot"] + (["--userspec=%s" % self.user] if self.user else [])
        env = ["env", "-i"] + ["%s=%s" % kv for kv in self.inner_env.items()]
        command = env + chroot + [str(self.root)] + self.command + self.args
        script = "set -e; %s; exec %s" % ("; ".join(steps), " ".join(map(shlex.quote, command)))
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if self.pid1:
            unshare += ["--pid", "--fork", "--kill-child"]
        return unshare + ["/bin/sh", "-c", script]

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def wait_listening(self, timeout=START_TIMEOUT):
        port = super().wait_listening(timeout)
        assert port is not None, "jobd did not start:\n" + self.log_text()
        return port

    def target_pid(self):
        """The pid of jobd itself (with --pid --fork, the child of unshare: PID 1 inside)."""
        if not self.pid1:
            return self.proc.pid
        children = Path("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pids = children.read_text().split() if children.exists() else []
            if pids:
                return int(pids[0])
            time.sleep(0.02)
        raise AssertionError("no child of unshare found")

    def stop(self):
        """SIGTERM jobd; return its exit status (bounded wait)."""
        os.kill(self.target_pid(), signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT)

    def wait_exit(self, timeout=START_TIMEOUT):
        code = self.proc.wait(timeout)
        self._listening.wait(5)
        return code

    def close(self):
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.kill()
        unmount_below(self.root)


def unmount_below(path):
    """Lazily unmount whatever is still mounted at or below path (deepest first)."""
    prefix = str(Path(path).resolve())
    mounts = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


@pytest.fixture
def jails():
    """Start jails through this fixture; each is cleaned up even when the test fails."""
    started = []

    def start(*args, **kwargs):
        jail = Jail(*args, **kwargs).start()
        started.append(jail)
        return jail

    yield start
    for jail in started:
        jail.close()


def run_and_stop(jail, job_id, script, files=None):
    """Upload one job, fetch its result, SIGTERM jobd and require exit status 0."""
    jail.wait_listening()
    try:
        job, output = jobd_client.run_job(jail.url, job_id, script, files, timeout=JOB_TIMEOUT)
    finally:
        code = jail.stop()
        assert code == 0, "exit status %s after SIGTERM; stderr:\n%s" % (code, jail.log_text())
    return job, output


def environ_of(output):
    """The environment a job's shell started with, from the env.bin it wrote."""
    raw = output["env.bin"].split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if item)


ENV_JOB = "#!/bin/sh\ncat /proc/$$/environ > env.bin\necho ok\n"


# ---------------------------------------------------------------------------- cases

def test_empty_root(tmp_path, jails):
    """FROM scratch: only /jobd and /tmp (1777). There is no shell, so the job brings a static
    program and names it as run.sh's interpreter (#!./hello); without a C compiler to make one,
    the job fails, but jobd must still run it and answer with its files."""
    root = make_root(tmp_path / "root")
    hello = static_hello(tmp_path)
    jail = jails(root)
    if hello is None:
        job, output = run_and_stop(jail, "scratch", "#!/bin/sh\necho never\n")
        assert job["Status"] == "FAILED", job
        assert output["run.sh"] == b"#!/bin/sh\necho never\n"
    else:
        job, output = run_and_stop(jail, "scratch", "#!./hello\n", files={"hello": hello})
        assert job["Status"] == "SUCCESS", job
        assert output["jobd.stdout"] == b"hello from scratch\n"


def test_empty_root_static_program(tmp_path, jails):
    """In an empty root a static program as run.sh runs (the kernel execs it directly)."""
    hello = static_hello(tmp_path)
    if hello is None:
        pytest.skip("no C compiler to make a static program")
    root = make_root(tmp_path / "root")
    job, output = run_and_stop(jails(root), "scratch-elf", hello)
    assert job["Status"] == "SUCCESS", job
    assert output["jobd.stdout"] == b"hello from scratch\n"


def test_bare_chroot_without_dev(tmp_path, jails):
    """A plain chroot with no /dev at all: jobs still run, reading an empty stdin."""
    root = add_busybox(make_root(tmp_path / "root"))
    job, output = run_and_stop(jails(root, dev=False), "nodev",
                               "#!/bin/sh\nread line || echo stdin at its end\n")
    assert job["Status"] == "SUCCESS", job
    assert output["jobd.stdout"] == b"stdin at its end\n"


def test_busybox_root_and_job_environment(tmp_path, jails):
    """run.sh through busybox sh; the job sees exactly the environment jobd started with."""
    root = add_busybox(make_root(tmp_path / "root"))
    jail = jails(root)
    job, output = run_and_stop(jail, "busybox", ENV_JOB)
    assert job["Status"] == "SUCCESS", job
    assert output["jobd.stdout"] == b"ok\n"
    env = environ_of(output)
    extra = {k: v for k, v in env.items() if k not in BASE_ENV and not k.startswith("JOBD_")}
    assert extra == {}, "variables leaked into the job by the frozen binary: %s" % extra
    assert {k: env.get(k) for k in BASE_ENV} == BASE_ENV


def test_debian_root_dynamic_program(tmp_path, jails, debian_rootfs):
    """A dynamically linked program of the root (its python3) loads the root's libraries."""
    upper, work, root = tmp_path / "upper", tmp_path / "work", tmp_path / "root"
    for d in (upper, work, root):
        d.mkdir()
    shutil.copy(BINARY, upper / "jobd")
    os.chmod(upper / "jobd", 0o755)
    (upper / "data").mkdir()
    env = dict(BASE_ENV, LANG="C.UTF-8", LD_LIBRARY_PATH="/opt/jobd-test/lib")
    overlay = "mount -t overlay overlay -o %s %s" % (
        shlex.quote("lowerdir=%s,upperdir=%s,workdir=%s" % (debian_rootfs, upper, work)),
        shlex.quote(str(root)))
    jail = jails(root, prefix=[overlay], env=env)
    script = ("#!/bin/sh\n"
              "cat /proc/$$/environ > env.bin\n"
              "python3 -c 'import sys, zlib; print(sys.version_info[0], zlib.crc32(b\"jobd\"))'\n"
              "python3 -c 'print(open(\"/proc/self/maps\").read())' > maps.txt\n")
    job, output = run_and_stop(jail, "debian", script)
    assert job["Status"] == "SUCCESS", (job, output.get("jobd.stderr"))
    assert output["jobd.stdout"].decode().split() == ["3", str(zlib.crc32(b"jobd"))]
    maps = output["maps.txt"].decode()
    assert "_MEI" not in maps and "staticx-" not in maps, "python3 loaded the bundle's libraries"
    job_env = environ_of(output)
    assert job_env.get("LD_LIBRARY_PATH") == "/opt/jobd-test/lib"
    extra = {k: v for k, v in job_env.items() if k not in env and not k.startswith("JOBD_")}
    assert extra == {}, "variables leaked into the job by the frozen binary: %s" % extra


def test_no_tmp_but_tmpdir(tmp_path, jails):
    """No /tmp in the root: TMPDIR names where to unpack."""
    root = add_busybox(make_root(tmp_path / "root", tmp=False))
    (root / "scratch").mkdir()
    os.chmod(root / "scratch", 0o1777)
    jail = jails(root, env=dict(BASE_ENV, TMPDIR="/scratch"))
    job, output = run_and_stop(jail, "tmpdir", "#!/bin/sh\necho $TMPDIR\n")
    assert job["Status"] == "SUCCESS"
    assert output["jobd.stdout"] == b"/scratch\n"


def test_readonly_root_writable_data(tmp_path, jails):
    """Read-only root; only the data directory (bind-mounted) is writable; TMPDIR inside it."""
    root = add_busybox(make_root(tmp_path / "root", tmp=False))
    data = tmp_path / "data"
    data.mkdir()
    r, d = shlex.quote(str(root)), shlex.quote(str(data))
    prefix = ["mount --bind %s %s" % (r, r), "mount -o remount,bind,ro %s" % r,
              "mount --bind %s %s/data" % (d, r), "mkdir -p %s/data/tmp" % r]
    jail = jails(root, prefix=prefix, env=dict(BASE_ENV, TMPDIR="/data/tmp"))
    job, output = run_and_stop(jail, "readonly",
                               "#!/bin/sh\ntouch /cannot 2>/dev/null && echo writable || echo ro\n")
    assert job["Status"] == "SUCCESS"
    assert output["jobd.stdout"] == b"ro\n"
    assert not (root / "cannot").exists()


def test_unprivileged_user(tmp_path, jails):
    """uid 65534 with a data directory it owns."""
    root = add_busybox(make_root(tmp_path / "root"))
    os.chown(root / "data", 65534, 65534)
    jail = jails(root, user="65534:65534")
    job, output = run_and_stop(jail, "nobody", "#!/bin/sh\nid -u\n")
    assert job["Status"] == "SUCCESS"
    assert output["jobd.stdout"] == b"65534\n"


def test_sigterm_as_pid1(tmp_path, jails):
    """jobd as PID 1 of its own PID namespace (what a container runtime does)."""
    root = add_busybox(make_root(tmp_path / "root"))
    jail = jails(root, pid1=True)
    job, output = run_and_stop(jail, "pid1", "#!/bin/sh\necho $$\n")
    assert job["Status"] == "SUCCESS"


@pytest.mark.parametrize("case", ["missing", "readonly", "noexec"])
def test_unusable_temp_dir(tmp_path, jails, case):
    """A missing, read-only or noexec temp dir: one clear line naming TMPDIR, non-zero exit."""
    root = add_busybox(make_root(tmp_path / "root", tmp=(case != "missing")))
    r = shlex.quote(str(root))
    prefix = {
        "missing": [],
        "readonly": ["mount --bind %s %s" % (r, r), "mount -o remount,bind,ro %s" % r],
        "noexec": ["mount -t tmpfs -o noexec,mode=1777 tmpfs %s/tmp" % r],
    }[case]
    jail = jails(root, prefix=prefix)
    code = jail.wait_exit()
    lines = [line for line in jail.lines if line.strip()]
    assert code != 0
    assert len(lines) == 1, "expected one line on stderr, got:\n" + jail.log_text()
    assert "TMPDIR" in lines[0]

"""A real single-node Slurm for tests: slurmctld + slurmd on 127.0.0.1, state in a temp dir.

Stdlib only. Needs root and Debian's Slurm packages (slurmctld, slurmd, slurm-client):
ci/slurm-steps.sh (or `install_slurm()`) installs them. No munge: auth/none, which is why
both daemons bind to 127.0.0.1 only.

    with SlurmCluster(min_job_age=2) as cluster:     # starts; returns once a job has run
        job_id = cluster.sbatch("--chdir", job_dir, "--wrap", "exec ./run.sh")
        cluster.wait_state(job_id, "COMPLETED")
        subprocess.run(["squeue", ...], env=cluster.env)   # clients need SLURM_CONF

Nothing is left behind: every daemon, slurmstepd and job process carries the cluster's
SLURM_CONF path in its environment (slurmstepd sets it even with --export=NONE), and stop()
kills whatever still carries it. Daemons also die with the Python process (PR_SET_PDEATHSIG),
and start() reaps the leftovers of a harness that was killed before it could stop.
The pytest fixtures are in slurm_fixtures.py.
"""

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

SERVER_BINARIES = ("slurmctld", "slurmd")
CLIENT_BINARIES = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
PACKAGES = ("slurmctld", "slurmd", "slurm-client")

CALL_TIMEOUT = 15.0          # a healthy client call takes ~7 ms; auth trouble makes them hang
OWNER_FILE = "harness.owner"  # "<pid> <start ticks>" of the Python process that owns a cluster
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE")


# --------------------------------------------------------------------------- availability

def missing_binaries():
    """Names of the Slurm programs that are not on PATH."""
    return [b for b in SERVER_BINARIES + CLIENT_BINARIES if shutil.which(b) is None]


def skip_reason():
    """Why a real Slurm cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "real Slurm tests need root (the test cluster runs as SlurmUser=root)"
    missing = missing_binaries()
    if missing:
        return ("Slurm not installed (missing on PATH: %s); run ci/slurm-steps.sh as root"
                % ", ".join(missing))
    return None


def install_slurm(timeout=900):
    """Install Debian's Slurm packages with apt when they are missing (root only).

    Writes no slurm.conf: the packages' init scripts would try to start daemons with it.
    A policy-rc.d that forbids service starts is in place for the install.
    """
    if not missing_binaries():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("cannot install Slurm: need root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = "/usr/sbin/policy-rc.d"
    made_policy = not os.path.exists(policy)
    if made_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=timeout)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                       env=env, check=True, timeout=timeout)
    finally:
        if made_policy:
            os.unlink(policy)


# --------------------------------------------------------------------------- processes

def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ticks(pid):
    """The start time of a process in clock ticks (tells a PID from its reuse), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _slurm_conf_of(pid):
    """The SLURM_CONF a process was started with, or None."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            for entry in f.read().split(b"\0"):
                if entry.startswith(b"SLURM_CONF="):
                    return entry[len(b"SLURM_CONF="):].decode(errors="replace")
    except OSError:
        pass
    return None


def _protected_pids():
    """This process and its ancestors: never ours to kill."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open("/proc/%d/stat" % pid) as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _pids_by_conf():
    """{SLURM_CONF path: [pid, ...]} for every live process that has one."""
    found = {}
    protected = _protected_pids()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in protected:
            conf = _slurm_conf_of(int(name))
            if conf:
                found.setdefault(conf, []).append(int(name))
    return found


def _kill_all(pids, grace=3.0, reap=lambda: None):
    """TERM, then KILL after `grace` s, the given PIDs; wait (bounded) until they are gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            reap()
            time.sleep(0.05)


def _owner_alive(base):
    """Whether the harness process that owns the cluster in `base` is still running."""
    try:
        with open(os.path.join(base, OWNER_FILE)) as f:
            pid, ticks = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return False
    return _start_ticks(pid) == ticks


def reap_stale_clusters():
    """Kill the processes of test clusters whose owning harness died without stopping them.

    Only clusters made by this module are touched: their base dir holds OWNER_FILE.
    """
    for conf, pids in _pids_by_conf().items():
        base = os.path.dirname(os.path.dirname(conf))
        if os.path.exists(os.path.join(base, OWNER_FILE)) and not _owner_alive(base):
            _kill_all(pids)
            if os.path.basename(base).startswith("jobd-slurm-"):
                shutil.rmtree(base, ignore_errors=True)


def _die_with_parent():
    """In the child before exec: get SIGKILL when the thread that started us exits."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- the cluster

class SlurmError(RuntimeError):
    """The test cluster could not start, or a client call failed or hung."""


class SlurmCluster:
    """One slurmctld + one slurmd on 127.0.0.1, all state under a fresh temp directory.

    min_job_age: seconds a finished job stays in slurmctld's memory (Slurm's MinJobAge).
        Slurm purges on a cycle of max(10, MinJobAge) s (60 s at most), so a job vanishes
        MinJobAge..MinJobAge+cycle s after it ends: 2 gives 2-12 s.
    cpus: CPUs the node advertises; default max(16, real count). More than the machine has
        is allowed (SlurmdParameters=config_overrides): trivial jobs then run side by side
        (50 jobs: 4 s with 16 CPUs, 25 s with the real 2).
    extra_conf: extra slurm.conf lines (str or list), appended last (later lines win).
    warmup: after start, run one trivial job to completion, so that the scheduler's first
        pass (~3 s after slurmctld starts) is behind us and tests see steady-state timing.
    """

    def __init__(self, min_job_age=300, cpus=None, extra_conf=(), base_dir=None,
                 start_timeout=60.0, warmup=True):
        self.min_job_age = int(min_job_age)
        self.cpus = int(cpus or max(16, os.cpu_count() or 1))
        self.extra_conf = [extra_conf] if isinstance(extra_conf, str) else list(extra_conf)
        self.start_timeout = start_timeout
        self.warmup = warmup
        self._own_base = base_dir is None
        self.base = os.path.abspath(base_dir or tempfile.mkdtemp(prefix="jobd-slurm-"))
        self.conf_path = os.path.join(self.base, "etc", "slurm.conf")
        self.jobcomp_path = os.path.join(self.base, "log", "jobcomp.txt")
        self.node_name = socket.gethostname().split(".")[0]
        self.ctld_port = None
        self.slurmd_port = None
        self.env = dict(os.environ, SLURM_CONF=self.conf_path)
        for var in list(self.env):
            # Inside another Slurm job, or with SBATCH_*/SQUEUE_* defaults set, a client
            # would pick up options we did not ask for.
            if var.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "SCANCEL_", "SINFO_")) \
                    and var != "SLURM_CONF":
                del self.env[var]
        self._procs = {}
        self._stopped = True
        self.baseline = 0  # Slurm ids up to this one are earlier tests' (mark_ids())

    # ---- config

    def slurm_conf(self):
        """The text of slurm.conf for this cluster."""
        b = self.base
        lines = [
            "ClusterName=jobdtest",
            "SlurmctldHost=%s(127.0.0.1)" % self.node_name,
            "SlurmctldPort=%d" % self.ctld_port,
            "SlurmdPort=%d" % self.slurmd_port,
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            # auth/none trusts anyone who can connect: listen on 127.0.0.1 only.
            "CommunicationParameters=NoInAddrAny,NoCtldInAddrAny",
            "StateSaveLocation=%s/state" % b,
            "SlurmdSpoolDir=%s/spool/slurmd-%%n" % b,
            "SlurmctldPidFile=%s/run/slurmctld.pid" % b,
            "SlurmdPidFile=%s/run/slurmd-%%n.pid" % b,
            "SlurmctldLogFile=%s/log/slurmctld.log" % b,
            "SlurmdLogFile=%s/log/slurmd.log" % b,
            # cgroups do not work in every container (gVisor: scancel hangs in COMPLETING);
            # linuxproc kills the job's process tree, background children included.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            "JobCompLoc=%s" % self.jobcomp_path,
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=%d" % self.min_job_age,
            "KillWait=2",
            "MailProg=/bin/true",
            "NodeName=%s NodeAddr=127.0.0.1 CPUs=%d RealMemory=%d State=UNKNOWN"
            % (self.node_name, self.cpus, _real_memory_mb()),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        return "\n".join(lines + self.extra_conf) + "\n"

    # ---- life cycle

    def start(self):
        """Write the config, start both daemons, wait until the node is idle (and warm)."""
        reason = skip_reason()
        if reason:
            raise SlurmError(reason)
        reap_stale_clusters()
        for sub in ("etc", "state", "spool/slurmd-" + self.node_name, "run", "log"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        with open(os.path.join(self.base, OWNER_FILE), "w") as f:
            f.write("%d %d\n" % (os.getpid(), _start_ticks(os.getpid())))
        self._stopped = False
        atexit.register(self.stop)
        try:
            for attempt in range(3):
                # A port found free can be taken before the daemon binds it: retry.
                self.ctld_port = free_port()
                self.slurmd_port = free_port()
                while self.slurmd_port == self.ctld_port:
                    self.slurmd_port = free_port()
                with open(self.conf_path, "w") as f:
                    f.write(self.slurm_conf())
                self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", self.conf_path])
                self._spawn("slurmd", ["slurmd", "-D", "-N", self.node_name,
                                       "-f", self.conf_path])
                try:
                    self.wait_idle(self.start_timeout)
                    break
                except SlurmError as e:
                    if attempt == 2 or "Address already in use" not in str(e):
                        raise
                    _kill_all([p.pid for p in self._procs.values() if p.poll() is None]
                              + self.leftover_pids(),
                              reap=lambda: [p.poll() for p in self._procs.values()])
            if self.warmup:
                job_id = self.sbatch("--chdir", self.base, "--output", "/dev/null",
                                     "--job-name", "warmup", "--wrap", "true")
                self.wait_state(job_id, "COMPLETED", timeout=self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name, argv):
        log = open(os.path.join(self.base, "log", name + ".stdio"), "ab")
        # PDEATHSIG is tied to the starting *thread*: only use it from the main thread.
        main = threading.current_thread() is threading.main_thread()
        try:
            self._procs[name] = subprocess.Popen(
                argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.base,
                preexec_fn=_die_with_parent if main else None)
        finally:
            log.close()

    def daemons_alive(self):
        """True while both slurmctld and slurmd are running."""
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    def wait_idle(self, timeout=60.0):
        """Block until sinfo reports the node idle; SlurmError after `timeout` s."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmError("%s exited with %s during start-up\n%s"
                                     % (name, proc.returncode, self.logs()))
            try:
                r = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=3)
            except SlurmError as e:  # hung on a controller that is not up (yet)
                last = str(e)
                continue
            last = (r.stdout + r.stderr).strip()
            if r.returncode == 0 and last.split() == ["idle"]:
                return
            time.sleep(0.2)
        raise SlurmError("node not idle after %.0f s (sinfo: %r)\n%s"
                         % (timeout, last, self.logs()))

    def cancel_all(self, timeout=15.0):
        """scancel every job and wait (bounded) until none is pending, running or completing."""
        self.run("scancel", "--user=root", check=False, timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.run("squeue", "-h", "-o", "%i", check=False, timeout=5)
            if r.returncode == 0 and not r.stdout.strip():
                return
            time.sleep(0.1)
        raise SlurmError("jobs still in the queue %.0f s after scancel" % timeout)

    def stop(self, timeout=5.0):
        """Shut both daemons down and kill anything of this cluster that is left.

        Safe to call more than once, and from atexit; never raises.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            self._orderly_shutdown(timeout)
        except Exception:  # noqa: BLE001 - the sweep below cleans up whatever happened
            pass
        try:
            reap = lambda: [p.poll() for p in self._procs.values()]  # noqa: E731
            leftovers = self.leftover_pids()
            leftovers += [p.pid for p in self._procs.values() if p.poll() is None]
            _kill_all(leftovers, reap=reap)
            reap()
        except Exception:  # noqa: BLE001 - stop() runs in teardown and atexit
            pass
        finally:
            if self._own_base and not os.environ.get("JOBD_KEEP_SLURM_DIR"):
                shutil.rmtree(self.base, ignore_errors=True)

    def _orderly_shutdown(self, timeout):
        """Cancel all jobs, `scontrol shutdown`, wait up to `timeout` s for the daemons."""
        if not self.daemons_alive():
            return
        # Let cancelled jobs finish first: a slurmd whose controller is gone spends ~9 s
        # retrying its epilog-complete message before it shuts down.
        try:
            self.cancel_all(timeout=5)
        except SlurmError:
            pass
        if self.run("scontrol", "shutdown", check=False, timeout=5).returncode != 0:
            return
        deadline = time.monotonic() + timeout
        for proc in self._procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return

    def leftover_pids(self):
        """Live processes that belong to this cluster (should be [] after stop())."""
        return [p for p in _pids_by_conf().get(self.conf_path, []) if _alive(p)]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- clients

    def mark_ids(self):
        """Remember the highest Slurm id so far (baseline): a session's cluster serves
        many tests, and their job names can repeat."""
        out = self.run("squeue", "-h", "-t", "all", "-O", "JobID").stdout.split()
        self.baseline = max((int(number) for number in out if number.isdigit()), default=0)

    def run(self, *argv, check=True, timeout=CALL_TIMEOUT, env=None, cwd=None, input=None):
        """Run a Slurm client with this cluster's environment; CompletedProcess (text)."""
        try:
            r = subprocess.run([str(a) for a in argv], env=env or self.env, cwd=cwd,
                               capture_output=True, text=True, timeout=timeout,
                               input=input, stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise SlurmError("%s timed out after %s s" % (" ".join(map(str, argv)), timeout)) from e
        if check and r.returncode != 0:
            raise SlurmError("%s exited %d: %s" % (" ".join(map(str, argv)), r.returncode,
                                                    r.stderr.strip()))
        return r

    def sbatch(self, *args, **kw):
        """Submit with `sbatch --parsable ARGS...`; return the job id (int)."""
        out = self.run("sbatch", "--parsable", *args, **kw).stdout.strip()
        return int(out.split(";")[0])

    def job_info(self, job_id):
        """`scontrol show job -o` as a dict, or None once the job has left slurmctld's memory."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            if "Invalid job id" in r.stderr:
                return None
            raise SlurmError("scontrol show job %s: %s" % (job_id, r.stderr.strip()))
        return parse_keyvals(r.stdout)

    def wait_state(self, job_id, states, timeout=30.0, interval=0.1):
        """Poll until the job's JobState is one of `states`; return the scontrol dict."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info is not None and info.get("JobState") in states:
                return info
            time.sleep(interval)
        raise SlurmError("job %s not in %s after %.0f s (last: %s)"
                         % (job_id, sorted(states), timeout, info and info.get("JobState")))

    def jobcomp_records(self):
        """The jobcomp/filetxt file as {job_id: {key: value}}."""
        records = {}
        try:
            with open(self.jobcomp_path) as f:
                for line in f:
                    rec = parse_keyvals(line)
                    if rec.get("JobId", "").isdigit():
                        records[int(rec["JobId"])] = rec
        except FileNotFoundError:
            pass
        return records

    def logs(self, tail=40):
        """The last lines of the daemons' logs, for error messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stdio", "slurmd.stdio"):
            try:
                with open(os.path.join(self.base, "log", name), errors="replace") as f:
                    lines = f.readlines()[-tail:]
            except OSError:
                continue
            parts.append("--- %s\n%s" % (name, "".join(lines)))
        return "\n".join(parts)


def _real_memory_mb():
    """About 90% of the machine's memory in MB (slurmd drains a node that has less)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return max(1, int(int(line.split()[1]) / 1024 * 0.9))
    except OSError:
        pass
    return 1000


_KEYVAL = re.compile(r"(\w[\w/:]*)=")


def parse_keyvals(text):
    """Parse Slurm's one-line `Key=Value Key=Value` output (scontrol -o, jobcomp) to a dict.

    A value runs until the next ` Key=`, so values with spaces (Command, WorkDir) survive.
    """
    text = text.strip()
    out = {}
    starts = [m for m in _KEYVAL.finditer(text) if m.start() == 0 or text[m.start() - 1] == " "]
    for m, nxt in zip(starts, starts[1:] + [None]):
        end = nxt.start() - 1 if nxt else len(text)
        out[m.group(1)] = text[m.end():end]
    return out


def smoke_check():
    """Start a cluster, run one job in a temp dir, stop; print what happened. Exit status."""
    reason = skip_reason()
    if reason:
        print("slurm smoke check skipped:", reason)
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="jobd-slurm-smoke-") as job_dir:
        with SlurmCluster() as cluster:
            up = time.monotonic() - started
            job_id = cluster.sbatch("--chdir", job_dir, "--output", "out.txt",
                                    "--wrap", "echo hello from slurm")
            info = cluster.wait_state(job_id, FINISHED, timeout=30)
            with open(os.path.join(job_dir, "out.txt")) as f:
                out = f.read().strip()
        left = cluster.leftover_pids()
    ok = info["JobState"] == "COMPLETED" and out == "hello from slurm" and not left
    print("slurm smoke check: %s (up in %.1f s, job %s %s %r, total %.1f s, leftovers %s)"
          % ("ok" if ok else "FAILED", up, job_id, info["JobState"], out,
             time.monotonic() - started, left))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(smoke_check())

"""Figures of the static binary for `make bench`: size, first HTTP answer after start, idle RSS.

    python3 tests/measure_binary.py [dist/jobd] [--runs 10] [--source jobd.py]

Start-up is the time from spawning the process to its first HTTP answer on 127.0.0.1 (any
status); RSS and PSS are summed over every process of the binary (staticx's outer loader,
PyInstaller's bootloader and Python), 1 s after that answer. Medians over --runs starts.
--source also measures `python3 jobd.py` the same way, for comparison. Stdlib only.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from helpers import process_tree

TARGETS = {"size": 8_000_000, "startup": 0.4, "rss": 30_000_000}
START_TIMEOUT = 15.0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answered(url):
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        pass
    except OSError:
        return False
    return True


def memory(pids):
    """(summed RSS, summed PSS) in bytes over pids."""
    rss = pss = 0
    for pid in pids:
        try:
            with open("/proc/%d/smaps_rollup" % pid) as f:
                for line in f:
                    key, value = line.split(":", 1)
                    if key in ("Rss", "Pss"):
                        amount = int(value.split()[0]) * 1024
                        rss += amount if key == "Rss" else 0
                        pss += amount if key == "Pss" else 0
        except OSError:
            pass
    return rss, pss


def one_run(command):
    """Start command, wait for its first HTTP answer, measure, SIGTERM it; figures of one run."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="jobd-measure-") as work:
        args = command + ["--host", "127.0.0.1", "--port", str(port),
                          "--db", os.path.join(work, "jobd.sqlite3"), "--data", os.path.join(work, "data")]
        url = "http://127.0.0.1:%d/api/get/measure-nothing" % port
        start = time.monotonic()
        proc = subprocess.Popen(args, cwd=work, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not answered(url):
                if proc.poll() is not None or time.monotonic() - start > START_TIMEOUT:
                    raise RuntimeError("%s gave no HTTP answer (exit %s)" % (" ".join(command), proc.poll()))
                time.sleep(0.005)
            startup = time.monotonic() - start
            time.sleep(1.0)
            pids = process_tree(proc.pid)
            rss, pss = memory(pids)
        finally:
            proc.terminate()
            try:
                code = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(5)
    return {"startup": startup, "rss": rss, "pss": pss, "procs": len(pids), "exit": code}


def measure(command, runs):
    results = [one_run(command) for _ in range(runs)]
    return {key: statistics.median(r[key] for r in results) for key in ("startup", "rss", "pss", "procs")} | {
        "exits": sorted({r["exit"] for r in results}), "runs": runs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("binary", nargs="?", default="dist/jobd")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--source", help="also measure `python3 SOURCE` (e.g. jobd.py)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.runs > 1000:
        ap.error("--runs must be between 1 and 1000")

    rows = [("dist/jobd" if args.binary == "dist/jobd" else args.binary,
             os.path.getsize(args.binary), measure([os.path.abspath(args.binary)], args.runs))]
    if args.source:
        rows.append(("python3 " + args.source, None,
                     measure([sys.executable, os.path.abspath(args.source)], args.runs)))

    print("| program | size | first HTTP answer (median) | idle RSS, all processes | idle PSS | processes | exit after SIGTERM |")
    print("|---|---|---|---|---|---|---|")
    for name, size, fig in rows:
        print("| %s | %s | %.3f s | %.1f MB | %.1f MB | %d | %s |" % (
            name, "-" if size is None else "%.2f MB" % (size / 1e6), fig["startup"],
            fig["rss"] / 1e6, fig["pss"] / 1e6, fig["procs"], ",".join(map(str, fig["exits"]))))
    name, size, fig = rows[0]
    print("\nmedians of %d runs; targets: size <= 8 MB, first answer <= 0.4 s, idle RSS <= 30 MB" % args.runs)
    failed = [what for what, bad in (("size", size > TARGETS["size"]),
                                     ("start-up", fig["startup"] > TARGETS["startup"]),
                                     ("idle RSS", fig["rss"] > TARGETS["rss"]),
                                     ("exit status", fig["exits"] != [0])) if bad]
    print("binary within targets" if not failed else "binary OUT of target: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

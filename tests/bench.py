#!/usr/bin/env python3
"""jobd's benchmark (`make bench`): starts jobd from source on loopback, measures, prints a table.

Every figure is the median of several runs. Targets are from the issues; the Go figures
from the wire contract (same 2-core machine, loopback). Standard library only, apart from
reusing the test fixture's Jobd class. `--only NAME` runs one measurement.
"""

import argparse
import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, Jobd, make_zip  # noqa: E402
from helpers import epoch, proc_status, wait_status  # noqa: E402

MB = 1_000_000


def start_jobd(workdir, *args, env=None):
    return Jobd([sys.executable, str(ROOT / "jobd.py")], workdir, args, env).start()


def peak_rss_reset(pid):
    """Reset the kernel's peak-RSS counter of a process (VmHWM), so a later read gives the
    peak of what happened in between."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb(pid):
    return proc_status(pid, "VmHWM") / MB


def raw_request(port, head, body_file=None):
    """Send a request (head bytes, optional file body by sendfile); return (status, headers,
    socket, reader) with the body not yet read."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(head)
    if body_file is not None:
        sock.sendfile(body_file)
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers = {}
    while True:
        line = reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, sock, reader


def drain(reader, length):
    """Read and drop `length` bytes; return how many arrived."""
    got = 0
    buf = bytearray(1 << 20)
    while got < length:
        n = reader.readinto(memoryview(buf)[: min(len(buf), length - got)])
        if not n:
            break
        got += n
    return got


def upload_requests(prefix, jobs):
    """`jobs` ready-made POST /api/upload requests of a trivial job, ids prefix0, prefix1, ..."""
    payload = base64.b64encode(make_zip({"run.sh": "true\n"})).decode()
    requests = []
    for i in range(jobs):
        body = json.dumps({"id": f"{prefix}{i}", "input": payload}).encode()
        requests.append(b"POST /api/upload HTTP/1.1\r\nHost: bench\r\nContent-Length: "
                        b"%d\r\n\r\n%s" % (len(body), body))
    return requests


def send_all(port, requests, clients):
    """Send the requests from `clients` keep-alive connections at once, each expecting 201.
    The clients are lean raw-socket ones, so that their own CPU (on the same two cores)
    does not hide the server's."""
    def client(part):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        for request in requests[part::clients]:
            sock.sendall(request)
            status = reader.readline()
            length = 0
            while True:
                line = reader.readline()
                if line == b"\r\n":
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            assert b" 201 " in status, status
        sock.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# ---- measurements -----------------------------------------------------------------------

def latency(workdir, runs=30, args=(), env=None):
    """Upload -> result of a trivial job (one keep-alive client, polling every 1 ms)."""
    server = start_jobd(workdir, *args, env=env)
    payload = base64.b64encode(make_zip({"run.sh": "true\n"})).decode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    times = []
    try:
        for i in range(runs + 3):
            started = time.perf_counter()
            conn.request("POST", "/api/upload", json.dumps({"id": f"lat{i}", "input": payload}))
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 201
            while True:
                conn.request("GET", f"/api/get/lat{i}")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    break
                time.sleep(0.001)
            if i >= 3:  # the first runs warm up imports and caches
                times.append((time.perf_counter() - started) * 1000)
    finally:
        server.stop()
    return statistics.median(times)


def burst(workdir, jobs=200, repeats=7, args=(), env=None):
    """200 trivial jobs submitted at once (16 clients); jobs/s until all have finished."""
    rates = []
    requests = upload_requests("b", jobs)
    for repeat in range(repeats):
        server = start_jobd(os.path.join(workdir, f"burst{repeat}"), *args, env=env)
        try:
            started = time.time()
            send_all(server.port, requests, clients=16)
            conn = http.client.HTTPConnection("127.0.0.1", server.port)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # asked seldom: the asking costs jobd time
                conn.request("GET", "/api/jobs?status=QUEUED,RUNNING&limit=1")
                resp = conn.getresponse()
                if not json.loads(resp.read())["Jobs"]:
                    break
                time.sleep(0.05)
            conn.request("GET", "/api/jobs?status=SUCCESS&limit=1000")
            done = json.loads(conn.getresponse().read())["Jobs"]
            assert len(done) == jobs, f"only {len(done)} of {jobs} jobs succeeded"
            # until the last job's end as jobd recorded it (same machine, same clock)
            rates.append(jobs / (max(epoch(job["FinishedAt"]) for job in done) - started))
        finally:
            server.stop()
    return statistics.median(rates)


def upload_rate(workdir, jobs=400, clients=8, repeats=7):
    """400 tiny uploads from 8 keep-alive clients, as the Go figure was measured: accepted
    jobs/s, each durably committed; every repeat on a fresh jobd (no backlog), the jobs
    running meanwhile."""
    requests = upload_requests("u", jobs)
    rates = []
    for repeat in range(repeats):
        server = start_jobd(os.path.join(workdir, f"rate{repeat}"))
        try:
            started = time.perf_counter()
            send_all(server.port, requests, clients)
            rates.append(jobs / (time.perf_counter() - started))
        finally:
            server.stop()
    return statistics.median(rates)


def big_output_go(workdir, size_mb=200, repeats=3):
    """GET /api/get of a job whose output holds 200 MB of random bytes: seconds, peak RSS."""
    server = start_jobd(workdir)
    try:
        script = f"head -c {size_mb * 1024 * 1024} /dev/urandom > random.bin\n"
        assert server.upload("big", {"run.sh": script}).status == 201
        deadline = time.monotonic() + 300
        while server.get("big").status == 202 and time.monotonic() < deadline:
            time.sleep(0.2)
        times, peaks = [], []
        for _ in range(repeats):
            peak_rss_reset(server.proc.pid)
            started = time.perf_counter()
            status, headers, sock, reader = raw_request(
                server.port, b"GET /api/get/big HTTP/1.1\r\nHost: bench\r\n\r\n")
            length = int(headers["content-length"])
            assert status == 200 and drain(reader, length) == length
            times.append(time.perf_counter() - started)
            peaks.append(peak_rss_mb(server.proc.pid))
            sock.close()
    finally:
        server.stop()
    return statistics.median(times), statistics.median(peaks)


def raw_round_trip(workdir, size_mb=300, repeats=3):
    """PUT a 300 MB zip to /api/jobs/{id}, then GET its 300 MB output: MB/s and peak RSS each way."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    big = Path(workdir) / "big.zip"
    with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("run.sh", "true\n")
        with zf.open("random.bin", "w", force_zip64=True) as f:
            for _ in range(size_mb):
                f.write(os.urandom(MB))
    total = big.stat().st_size
    server = start_jobd(os.path.join(workdir, "server"))
    up, up_rss, down, down_rss = [], [], [], []
    try:
        for repeat in range(repeats):
            job = f"raw{repeat}"
            peak_rss_reset(server.proc.pid)
            started = time.perf_counter()
            with open(big, "rb") as f:
                head = (f"PUT /api/jobs/{job} HTTP/1.1\r\nHost: bench\r\nContent-Type: "
                        f"application/zip\r\nContent-Length: {total}\r\n\r\n").encode()
                status, headers, sock, reader = raw_request(server.port, head, f)
            reader.read(int(headers["content-length"]))
            sock.close()
            assert status == 201, status
            up.append(total / MB / (time.perf_counter() - started))
            up_rss.append(peak_rss_mb(server.proc.pid))
            wait_status(server, job, "SUCCESS", timeout=300)
            peak_rss_reset(server.proc.pid)
            started = time.perf_counter()
            status, headers, sock, reader = raw_request(
                server.port, f"GET /api/jobs/{job}/output HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            length = int(headers["content-length"])
            assert status == 200 and drain(reader, length) == length
            sock.close()
            down.append(length / MB / (time.perf_counter() - started))
            down_rss.append(peak_rss_mb(server.proc.pid))
            server.request("DELETE", f"/api/jobs/{job}")
    finally:
        server.stop()
    return tuple(statistics.median(v) for v in (up, up_rss, down, down_rss))


def plain_slurm(cluster, workdir, jobs=200, runs=20):
    """The same trivial jobs with plain sbatch, no jobd: (jobs/s for 200 submitted at once by
    16 threads, until squeue says all COMPLETED; median sbatch -> COMPLETED of one job, with
    squeue asked every 10 ms)."""
    Path(workdir).mkdir(parents=True, exist_ok=True)

    def sbatch():
        return str(cluster.sbatch("--chdir", workdir, "-o", "/dev/null", "--wrap", "true"))

    def completed(ids):
        out = cluster.run("squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%T").stdout
        return out.split().count("COMPLETED") == len(ids)

    started = time.perf_counter()
    ids = []
    threads = [threading.Thread(target=lambda: ids.extend(sbatch() for _ in range(jobs // 16)))
               for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids += [sbatch() for _ in range(jobs - len(ids))]
    deadline = time.monotonic() + 300
    while not completed(ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    rate = jobs / (time.perf_counter() - started)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        job = [sbatch()]
        while not completed(job) and time.perf_counter() - started < 60:
            time.sleep(0.01)
        times.append((time.perf_counter() - started) * 1000)
    return rate, statistics.median(times)


def slurm_vs_local(workdir, jobs=200, runs=20):
    """The same trivial jobs run here, through jobd --executor slurm (default --slurm-poll),
    and with plain sbatch, on a real single-node Slurm started on this machine for the
    measurement. None (with the reason printed) when Slurm cannot run here."""
    from slurm_cluster import SlurmCluster, skip_reason
    reason = skip_reason()
    if reason:
        print(f"  slurm: skipped: {reason}", file=sys.stderr)
        return None
    with SlurmCluster() as cluster:
        slurm = ["--executor", "slurm"]
        figures = {
            "local_rate": burst(os.path.join(workdir, "local"), jobs, repeats=1),
            "slurm_rate": burst(os.path.join(workdir, "slurm"), jobs, repeats=1, args=slurm,
                                env=cluster.env),
            "local_ms": latency(os.path.join(workdir, "local-latency"), runs),
            "slurm_ms": latency(os.path.join(workdir, "slurm-latency"), runs, slurm, cluster.env),
        }
        figures["plain_rate"], figures["plain_ms"] = plain_slurm(
            cluster, os.path.join(workdir, "plain"), jobs, runs)
    return figures


# Runs a command and prints its peak RSS. A child's ru_maxrss counts the memory of the
# process it was forked from (the kernel carries the old address space's peak over exec),
# so the command is forked from this small process, not from the bench with its buffers.
PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(argv, cwd, env, timeout=600):
    """Run a command to its end: (seconds, exit status, its peak RSS in MB)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS] + argv, cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, timeout=timeout)
    seconds = time.perf_counter() - started
    return seconds, done.returncode, int(done.stdout or 0) * 1024 / MB


def client_round_trip(workdir, size_mb=200, repeats=3):
    """`jobd submit` of a 200 MB folder (zipped on the fly), then `jobd fetch -o` of its
    200 MB result (download and unpack): MB/s each way and the client's peak RSS in MB."""
    folder = Path(workdir) / "job"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.sh").write_text("true\n")
    with open(folder / "random.bin", "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(MB))
    total = sum(p.stat().st_size for p in folder.iterdir())
    server = start_jobd(os.path.join(workdir, "server"))
    env = dict(os.environ, JOBD_URL=f"http://127.0.0.1:{server.port}")
    client = [sys.executable, str(ROOT / "jobd.py")]
    up, down, peaks = [], [], []
    try:
        for repeat in range(repeats):
            job = f"client{repeat}"
            seconds, code, rss = run_measured(client + ["submit", str(folder), "--id", job],
                                              workdir, env)
            assert code == 0, f"submit exited {code}"
            up.append(total / MB / seconds)
            peaks.append(rss)
            output = wait_status(server, job, "SUCCESS", timeout=300)["OutputBytes"]
            out = Path(workdir) / "out"
            seconds, code, rss = run_measured(client + ["fetch", job, "-o", str(out)],
                                              workdir, env)
            assert code == 0, f"fetch exited {code}"
            assert (out / "random.bin").stat().st_size == size_mb * MB
            down.append(output / MB / seconds)
            peaks.append(rss)
            shutil.rmtree(out)
            server.request("DELETE", f"/api/jobs/{job}")
    finally:
        server.stop()
    return statistics.median(up), statistics.median(down), max(peaks)


# ---- the table --------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", help="run one measurement: latency, burst, rate, "
                        "output, raw, slurm, client")
    args = parser.parse_args()
    rows = []

    def row(name, value, unit, target, go, ok):
        rows.append((name, f"{value:,.1f} {unit}", target, go, "ok" if ok else "MISSED"))
        print(f"  {name}: {value:,.1f} {unit}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="jobd-bench-") as tmp:
        def wanted(name):
            return args.only in (None, name)

        if wanted("latency"):
            ms = latency(os.path.join(tmp, "latency"))
            row("upload -> result, trivial job (median)", ms, "ms", "<= 20 ms", "1,000 ms",
                ms <= 20)
        if wanted("burst"):
            rate = burst(os.path.join(tmp, "burst"))
            row("200 trivial jobs at once, until all finished", rate, "jobs/s", ">= 260",
                "260", rate >= 260)
        if wanted("rate"):
            rate = upload_rate(os.path.join(tmp, "rate"))
            row("uploads from 8 keep-alive clients, durable", rate, "jobs/s", ">= 1,500",
                "5,500 (no fsync)", rate >= 1500)
        if wanted("output"):
            seconds, rss = big_output_go(os.path.join(tmp, "output"))
            row("GET /api/get, 200 MB output: time", seconds, "s", "<= 2 s", "2.0 s",
                seconds <= 2)
            row("GET /api/get, 200 MB output: peak RSS", rss, "MB", "<= 100 MB", "4,500 MB",
                rss <= 100)
        if wanted("raw"):
            up, up_rss, down, down_rss = raw_round_trip(os.path.join(tmp, "raw"))
            row("PUT /api/jobs/{id}, 300 MB zip", up, "MB/s", ">= 200 MB/s", "-", up >= 200)
            row("  peak RSS during the upload", up_rss, "MB", "<= 100 MB", "-", up_rss <= 100)
            row("GET /api/jobs/{id}/output, 300 MB", down, "MB/s", ">= 200 MB/s", "-",
                down >= 200)
            row("  peak RSS during the download", down_rss, "MB", "<= 100 MB", "-",
                down_rss <= 100)
        if wanted("slurm"):
            slurm = slurm_vs_local(os.path.join(tmp, "slurm"))
            if slurm:
                row("200 trivial jobs at once, local (same run)", slurm["local_rate"], "jobs/s",
                    "-", "-", True)
                row("  through jobd --executor slurm", slurm["slurm_rate"], "jobs/s", "-", "-",
                    True)
                row("  plain sbatch, no jobd", slurm["plain_rate"], "jobs/s", "-", "-", True)
                row("upload -> result, local (same run)", slurm["local_ms"], "ms", "-", "-", True)
                row("  through jobd --executor slurm", slurm["slurm_ms"], "ms", "-", "-", True)
                row("  added per job by Slurm", slurm["slurm_ms"] - slurm["local_ms"], "ms", "-",
                    "-", True)
                by_jobd = slurm["slurm_ms"] - slurm["plain_ms"]
                row("  of which jobd (vs plain sbatch)", by_jobd, "ms",
                    "<= 1,000 ms (--slurm-poll)", "-", by_jobd <= 1000)
        if wanted("client"):
            up, down, rss = client_round_trip(os.path.join(tmp, "client"))
            row("jobd submit, 200 MB folder (zipped on the fly)", up, "MB/s", ">= 100 MB/s",
                "-", up >= 100)
            row("jobd fetch -o, 200 MB result (download, unpack)", down, "MB/s",
                ">= 100 MB/s", "-", down >= 100)
            row("  client's peak RSS (submit, fetch)", rss, "MB", "<= 50 MB", "-", rss <= 50)

    widths = [max(len(str(r[i])) for r in rows + [HEADER]) for i in range(5)]
    for line in [HEADER, tuple("-" * w for w in widths)] + rows:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
    return 0 if all(r[4] == "ok" for r in rows) else 1


HEADER = ("measurement (median)", "jobd", "target", "Go jobd", "")

if __name__ == "__main__":
    sys.exit(main())

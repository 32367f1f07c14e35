"""Helpers shared by the test modules: raw HTTP, hand-made zips, store inspection, waiting.

Nothing here stands in for a part of jobd: these build hostile inputs and look at what a
real jobd left on disk.
"""

import base64
import contextlib
import datetime
import functools
import json
import os
import socket
import sqlite3
import struct
import time
import weakref
import zlib

GO_ERROR_KEYS = ["error", "message", "status"]
JOB_KEYS = ["LastUpdated", "ID", "Status", "Path", "Input", "Output", "Message", "SlurmID",
            "Slurml", "ExitCode"]
JSON_TYPE = "application/json; charset=utf-8"
RFC3339_UTC = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z"


# -- waiting ---------------------------------------------------------------------------

def status(jobd, job_id, headers=None):
    """The status object of a job (GET /api/jobs/{id})."""
    return jobd.request("GET", f"/api/jobs/{job_id}", headers=headers).json()


def wait_status(jobd, job_id, wanted, timeout=20, headers=None, also=lambda job: True):
    """Poll the status object until its Status is in `wanted` (and `also` holds)."""
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = status(jobd, job_id, headers)
        if job["Status"] in wanted and also(job):
            return job
        time.sleep(0.03)
    raise AssertionError(f"{job_id} not {sorted(wanted)} after {timeout} s: {job}\n"
                         + jobd.log_text())


def alive(pid):
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_tree(pid):
    """pid and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir("/proc/%d/task" % current):
                with open("/proc/%d/task/%s/children" % (current, task)) as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def jobd_process(server):
    """(pid, threads) of jobd's own process: the one with the most threads under the
    process started (the frozen jobd runs in the third of three processes; the jobs'
    processes, its children, have one thread)."""
    best = (server.proc.pid, 0)
    for pid in process_tree(server.proc.pid):
        with contextlib.suppress(OSError):
            best = max(best, (pid, len(os.listdir(f"/proc/{pid}/task"))), key=lambda b: b[1])
    return best


def proc_status(pid, key):
    """A size from /proc/PID/status (VmRSS, VmHWM...), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def wait_until(predicate, timeout, interval=0.02, what="condition"):
    """Poll `predicate` until it returns a true value (returned); AssertionError after
    `timeout` seconds. Bounded in time, and so in count."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def gate_script(gate, body="", limit=30):
    """Shell lines that block until the file `gate` exists (at most `limit` seconds)."""
    return (f'i=0; while [ ! -e "{gate}" ] && [ $i -lt {limit * 20} ]; do sleep 0.05; '
            f"i=$((i+1)); done\n{body}")


# -- bodies ----------------------------------------------------------------------------

def upload_body(job_id, zip_bytes, **extra):
    return json.dumps({"id": job_id, "input": base64.b64encode(zip_bytes).decode(), **extra})


def assert_go_error(resp, status, error, message=None):
    """A Go-shaped error: the status, JSON content type, exactly {"error","message","status"}."""
    assert resp.status == status, resp
    assert resp.headers.get("Content-Type") == JSON_TYPE, resp.headers
    body = resp.json()
    assert list(body) == GO_ERROR_KEYS, body
    assert body["error"] == error and body["status"] == status, body
    assert isinstance(body["message"], str) and body["message"], body
    if message is not None:
        assert body["message"] == message, body
    return body


# -- what a jobd left on disk ----------------------------------------------------------

def stored_files(data_dir):
    """Every file (not folder) under the data directory, as relative paths."""
    found = []
    for root, _, files in os.walk(data_dir):
        found += [os.path.relpath(os.path.join(root, name), data_dir) for name in files]
    return sorted(found)


def job_dirs(data_dir):
    """Entries of the data directory other than jobd's own .jobd."""
    return sorted(name for name in os.listdir(data_dir) if name != ".jobd")


def job_rows(db_file):
    """{id: status} straight from the SQLite file (read-only), for states the Go API
    cannot show (QUEUED and RUNNING both answer 202)."""
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT id, status FROM jobs").fetchall())
    finally:
        db.close()


def store_state(server):
    """What a jobd holds: its records, job directories and files (the trash aside)."""
    files = [path for path in stored_files(server.data)
             if not path.startswith(os.path.join(".jobd", "trash") + os.sep)]
    return job_rows(server.db), job_dirs(server.data), files


def assert_nothing_stored(server, job_id=None, before=None):
    """No record (GET is 404), no job directory and no file under the data directory;
    or, given the store_state() `before` a request, nothing more than then."""
    if job_id is not None and isinstance(job_id, str) and "/" not in job_id and job_id:
        resp = server.get(job_id)
        assert resp.status == 404, resp
    assert store_state(server) == (before or ({}, [], []))


def shared_server(command, workdir):
    """A started Jobd for a whole module's worth of tests that store nothing (each one
    checks it left the store as it found it): saves a start per test. Stopped after."""
    from conftest import Jobd
    server = Jobd(command, workdir, ["--request-timeout", "2s"]).start()
    try:
        yield server
    finally:
        server.close()


def tree_size(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


# -- raw HTTP --------------------------------------------------------------------------

def raw_connect(port, timeout=10):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_unread = weakref.WeakKeyDictionary()  # socket -> bytes received past the last response


def read_response(sock, timeout=10):
    """(status, {lower-case header: value}, body) of one response (after any 100
    Continue); status None if the server closed the connection without answering.
    Bytes of a following (pipelined) response are kept for the next call."""
    sock.settimeout(timeout)
    data = _unread.pop(sock, b"")

    def fill():
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        return chunk

    while True:
        while b"\r\n\r\n" not in data:
            chunk = fill()
            if not chunk:
                return None, {}, data
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("iso-8859-1").split("\r\n")
        status = int(lines[0].split()[1])
        if not 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            break
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(data) < length:
        chunk = fill()
        if not chunk:
            break
        data += chunk
    body, _unread[sock] = data[:length], data[length:]
    return status, headers, body


def raw_exchange(port, data, timeout=10):
    """Send raw bytes, read one response."""
    with raw_connect(port, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(sock, timeout)


def closed_by_peer(sock, timeout):
    """True once the server closes `sock` (EOF or reset), False if it is still open
    after `timeout` seconds. Anything the server sends first is read and dropped."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


# -- zips made by hand -----------------------------------------------------------------
# zipfile cannot write everything a hostile client can (flags, lying sizes, entries
# sharing data, NUL in names), so these write the format directly.

def deflate_raw(data):
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def zip_entry(name, data=b"", method=8, mode=0o100644, flags=0, crc=None, size=None,
              compressed=None, share_with=None):
    """One entry for raw_zip(). `compressed` gives the stored bytes directly (with `crc`
    and `size`); `share_with` makes the central record point at an earlier entry's data."""
    name = name.encode() if isinstance(name, str) else name
    if compressed is None:
        compressed = deflate_raw(data) if method == 8 else data
        crc = zlib.crc32(data) if crc is None else crc
        size = len(data) if size is None else size
    return dict(name=name, compressed=compressed, method=method, mode=mode, flags=flags,
                crc=crc, size=size, share_with=share_with)


def raw_zip(entries):
    """A zip archive (bytes) of entries from zip_entry()."""
    out, central, offsets = bytearray(), bytearray(), {}
    dos_time, dos_date = 0, (44 << 9) | (1 << 5) | 1  # 2024-01-01
    for entry in entries:
        if entry["share_with"] is None:
            offsets[entry["name"]] = len(out)
            out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, entry["flags"], entry["method"],
                               dos_time, dos_date, entry["crc"], len(entry["compressed"]),
                               entry["size"], len(entry["name"]), 0)
            out += entry["name"] + entry["compressed"]
            offset = offsets[entry["name"]]
        else:
            offset = offsets[entry["share_with"].encode()]
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", (3 << 8) | 20, 20, entry["flags"],
                               entry["method"], dos_time, dos_date, entry["crc"],
                               len(entry["compressed"]), entry["size"], len(entry["name"]),
                               0, 0, 0, 0, entry["mode"] << 16, offset)
        central += entry["name"]
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                      len(central), len(out), 0)
    return bytes(out + central + end)


@functools.lru_cache(maxsize=None)
def zeros_deflated(mebibytes):
    """(raw deflate stream, crc32) of `mebibytes` MiB of zero bytes, built from one
    independently flushed 1 MiB block repeated (so it costs milliseconds, not seconds)."""
    zeros = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush(zlib.Z_FINISH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(zeros, crc)
    return block * mebibytes + tail, crc


def epoch(rfc3339):
    """Seconds since the epoch of jobd's UTC timestamps (2026-11-29T05:45:34.406774Z)."""
    moment = datetime.datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%S.%fZ")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()

#!/usr/bin/env python3
"""jobd: a small job daemon for research software.

It accepts a job -- a zip holding `run.sh` plus its inputs -- over HTTP, runs it, and
hands back a zip of the job directory. It is a drop-in replacement for the Go jobd
(rvhonorato/jobd): the same `/api/upload` and `/api/get/{id}` on the wire, without its
crashes, races and memory blow-ups. One module, standard library only.

The module reads top to bottom the way an upload flows:
configuration -> errors -> job ids and zips -> store (SQLite + files) -> runner
(worker threads, subprocesses) -> HTTP -> main.
"""

import argparse
import base64
import binascii
import contextlib
import errno
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import traceback
import uuid
import zipfile
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

__version__ = "0.1.0"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK = 1 * MiB


# ====================================================================================
# Configuration
# ====================================================================================
# One table of settings. Each can come from a flag or an environment variable; flags
# win over the environment, the environment over the default. The Go daemon's own
# variables (PORT, DB_PATH, DATAPATH, DEBUG) keep their names.

def parse_duration(text):
    """Seconds from '90', '1.5', '30s', '15m', '12h' or '2d'."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 12h, 2d)")
    number, unit = match.groups()
    return float(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def parse_size(text):
    """Bytes from '1048576', '512K', '100M', '2G' (binary units; 'MiB', 'GB' also read)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 500M, 2G)")
    number, unit = match.groups()
    return int(number) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit.lower()]


def parse_count(text):
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1: {text!r}")
    return value


def parse_port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"not a TCP port: {text!r}")
    return value


def parse_bool(text):
    return str(text).strip().lower() in ("1", "true", "yes", "on")


class Setting:
    def __init__(self, name, env, default, parse, help):
        self.name, self.env, self.default, self.parse, self.help = name, env, default, parse, help

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")


SETTINGS = [
    Setting("host", "JOBD_HOST", "0.0.0.0", str, "address to listen on"),
    Setting("port", "PORT", 8080, parse_port, "TCP port (0 picks a free one)"),
    Setting("db", "DB_PATH", "./db", str,
            "SQLite database file, or an existing directory to hold jobd.sqlite3"),
    Setting("data", "DATAPATH", "./data", str, "directory holding the jobs' working directories"),
    Setting("workers", "JOBD_WORKERS", os.cpu_count() or 1, parse_count,
            "jobs run at the same time"),
    Setting("retention", "JOBD_RETENTION", 2 * 86400.0, parse_duration,
            "how long finished jobs are kept (e.g. 2d, 12h)"),
    Setting("grace", "JOBD_GRACE", 10.0, parse_duration,
            "time between SIGTERM and SIGKILL when jobs are stopped"),
    Setting("debug", "DEBUG", False, parse_bool, "keep job directories after the run"),
    Setting("max_upload", "JOBD_MAX_UPLOAD", 2 * GiB, parse_size, "largest request body"),
    Setting("max_unpacked", "JOBD_MAX_UNPACKED", 16 * GiB, parse_size,
            "largest total unpacked size of an input zip"),
    Setting("max_entries", "JOBD_MAX_ENTRIES", 100_000, parse_count,
            "most entries in an input zip"),
    Setting("request_timeout", "JOBD_REQUEST_TIMEOUT", 60.0, parse_duration,
            "idle time after which a connection or a stalled upload is dropped"),
    Setting("log_format", "JOBD_LOG_FORMAT", "text", str, "text or json"),
]


class Config:
    """The validated settings, read once in main() and passed down; never changed after."""

    def __init__(self, **values):
        for setting in SETTINGS:
            object.__setattr__(self, setting.name, values.get(setting.name, setting.default))

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only")

    @property
    def db_file(self):
        return os.path.join(self.db, "jobd.sqlite3") if os.path.isdir(self.db) else self.db


def server_arguments(parser):
    """Add one flag per setting, with the environment variable named in its help."""
    for setting in SETTINGS:
        kind = {"debug": dict(action="store_const", const="true")}.get(setting.name, {})
        parser.add_argument(setting.flag, dest=setting.name, default=None,
                            help=f"{setting.help} [{setting.env}]", **kind)


def load_config(args, environ):
    """Merge flags (already parsed), environment and defaults into a Config."""
    values = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.name, None)
        source = setting.flag
        if raw is None and environ.get(setting.env, "") != "":
            raw, source = environ[setting.env], setting.env
        if raw is None:
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as e:
            raise SystemExit(f"jobd: {source}: {e}")
    if values.get("log_format", "text") not in ("text", "json"):
        raise SystemExit("jobd: --log-format must be text or json")
    return Config(**values)


# ====================================================================================
# Logging
# ====================================================================================

class Log:
    """One line per event on stderr: readable text (default) or one JSON object a line."""

    def __init__(self, fmt="text", stream=None):
        self.json = fmt == "json"
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def __call__(self, event, level="info", **fields):
        now = time.time()
        if self.json:
            line = json.dumps({"time": rfc3339(now), "level": level, "event": event, **fields})
        else:
            parts = [rfc3339(now, 3), event if level == "info" else f"{level.upper()} {event}"]
            parts += [f"{k}={format_log_value(v)}" for k, v in fields.items() if v is not None]
            line = " ".join(parts)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not take the daemon down


def format_log_value(value):
    text = str(value)
    return json.dumps(text) if (not text or re.search(r'[\s"=]', text)) else text


def rfc3339(timestamp, digits=6):
    """RFC 3339 in UTC with a Z, as Go's time.Time marshals (micro- instead of nanoseconds)."""
    seconds = int(timestamp)
    fraction = int((timestamp - seconds) * 10 ** digits)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:0{digits}d}Z"


# ====================================================================================
# Errors
# ====================================================================================
# Every refusal is a JobdError carrying its HTTP status; the handler turns it into the
# Go error body {"error": ..., "message": ..., "status": ...} in one place.

class JobdError(Exception):
    status = 500
    code = "internal_error"
    headers = {}

    def __init__(self, message, **headers):
        super().__init__(message)
        self.message = message
        if headers:
            self.headers = headers


class BadRequest(JobdError):
    status, code = 400, "bad_request"


class Unauthorized(JobdError):
    status, code = 401, "unauthorized"


class NotFound(JobdError):
    status, code = 404, "not_found"


class MethodNotAllowed(JobdError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(JobdError):
    status, code = 408, "request_timeout"


class Conflict(JobdError):
    status, code = 409, "conflict"


class LengthRequired(JobdError):
    status, code = 411, "length_required"


class PayloadTooLarge(JobdError):
    status, code = 413, "payload_too_large"


class HeadersTooLarge(JobdError):
    status, code = 431, "request_header_fields_too_large"


class TooManyRequests(JobdError):
    status, code = 429, "too_many_requests"


class RangeNotSatisfiable(JobdError):
    status, code = 416, "range_not_satisfiable"


class NotReady(JobdError):
    """The Go daemon's answer for a job that has not finished: 202 with an error body."""
    status, code = 202, "no_content"


# ====================================================================================
# Job ids, input zips and result zips
# ====================================================================================

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_SH = "run.sh"
STDOUT_FILE, STDERR_FILE = "jobd.stdout", "jobd.stderr"


def is_job_id(text):
    return isinstance(text, str) and ID_PATTERN.fullmatch(text) is not None


def check_job_id(text):
    if not is_job_id(text):
        raise BadRequest(f"invalid job id {text!r}: ids are 1 to 128 characters of "
                         "A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return text


def entry_parts(name):
    """The safe path components of a zip entry name, or BadRequest.

    Absolute names and '..' (also behind a backslash, which Windows tools write) are
    refused; '.' and empty components are dropped, so './run.sh' is run.sh.
    """
    if "\0" in name or name.startswith(("/", "\\")):
        raise BadRequest(f"unsafe path in zip: {name!r}")
    if any(part == ".." for part in re.split(r"[/\\]", name)):
        raise BadRequest(f"unsafe path in zip: {name!r}")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if len(name.encode()) > 4096 or any(len(part.encode()) > 255 for part in parts):
        raise BadRequest(f"path too long in zip: {name[:100]!r}...")
    return parts


def zip_entries(zf, cfg):
    """Check a zip's directory against every rule; yield (info, parts) for each entry."""
    infos = zf.infolist()
    if len(infos) > cfg.max_entries:
        raise BadRequest(f"the zip has {len(infos)} entries; at most {cfg.max_entries} are allowed")
    unpacked, files, folders = 0, set(), set()
    for info in infos:
        parts = entry_parts(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if info.is_dir():
            if kind not in (0, stat.S_IFDIR):
                raise BadRequest(f"zip entry {info.filename!r} is not a plain folder")
            folders.add("/".join(parts))
            yield info, parts
            continue
        if kind == stat.S_IFLNK:
            raise BadRequest(f"zip entry {info.filename!r} is a symbolic link; links are not allowed")
        if kind not in (0, stat.S_IFREG) or not parts:
            raise BadRequest(f"zip entry {info.filename!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise BadRequest(f"zip entry {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BadRequest(f"zip entry {info.filename!r} uses compression method "
                             f"{info.compress_type}; only deflate and store are supported")
        path = "/".join(parts)
        if path in files:
            raise BadRequest(f"zip entry {path!r} appears twice")
        files.add(path)
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        unpacked += info.file_size
        if unpacked > cfg.max_unpacked:
            raise BadRequest(f"the zip unpacks to more than {cfg.max_unpacked} bytes "
                             "(JOBD_MAX_UNPACKED); refused")
        yield info, parts
    clash = files & folders
    if clash:
        raise BadRequest(f"zip entry {sorted(clash)[0]!r} is both a file and a folder")


def check_input_zip(source, cfg):
    """Validate an uploaded zip completely (names, types, sizes, data); return its unpacked size.

    Every entry is read once so a corrupt or lying zip is refused now, with a clear
    message, and not discovered later by a worker. The size rules are checked first,
    so a zip bomb is refused without being inflated.
    """
    try:
        with zipfile.ZipFile(source) as zf:
            entries = list(zip_entries(zf, cfg))
            if not any(parts == [RUN_SH] and not info.is_dir() for info, parts in entries):
                raise BadRequest("the zip has no run.sh at its top level")
            for info, _ in entries:
                if not info.is_dir():
                    with zf.open(info) as data:
                        while data.read(CHUNK):
                            pass
            return sum(info.file_size for info, _ in entries)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError,
            NotImplementedError, RuntimeError, ValueError, OSError) as e:
        raise BadRequest(f"input is not a readable zip file: {e}")


def extract_input_zip(source, job_dir, cfg):
    """Unpack a checked input zip into job_dir; never writes outside it, never follows links."""
    with zipfile.ZipFile(source) as zf:
        for info, parts in zip_entries(zf, cfg):
            target = os.path.join(job_dir, *parts)
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            mode = ((info.external_attr >> 16) & 0o777) | 0o600
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with zf.open(info) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    os.chmod(os.path.join(job_dir, RUN_SH), 0o775)


def compression_for(path, size):
    """Deflate like Go, but store data that does not compress (deflating it only costs time)."""
    if size < MiB:
        return zipfile.ZIP_DEFLATED, 6
    with open(path, "rb") as f:
        sample = f.read(256 * KiB)
    if len(zlib.compress(sample, 1)) > 0.95 * len(sample):
        return zipfile.ZIP_STORED, None
    return zipfile.ZIP_DEFLATED, 6 if size <= 16 * MiB else 1


def write_result_zip(job_dir, dest):
    """Zip the whole job directory into dest (a path or a Spool), streaming file by file.

    Symbolic links are left out: following them could pack files from outside the job.
    """
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, allowZip64=True,
                         strict_timestamps=False) as zf:
        for root, folders, files in os.walk(job_dir):
            folders[:] = sorted(d for d in folders if not os.path.islink(os.path.join(root, d)))
            relative = os.path.relpath(root, job_dir)
            if relative != ".":
                zf.write(root, relative + "/")
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    method, level = compression_for(path, st.st_size)
                    arcname = name if relative == "." else f"{relative}/{name}"
                    zf.write(path, arcname, compress_type=method, compresslevel=level)
                except OSError:
                    continue  # unreadable or vanished: the rest of the results still count


EMPTY_ZIP = b"PK\x05\x06" + b"\0" * 18
INLINE_LIMIT = 256 * KiB


class Spool:
    """Where a payload is written as it arrives: in memory while small, else in a file.

    Small payloads are then stored in SQLite beside their record, so one fsync of the
    database covers both; a file per tiny job, each fsynced, costs several times more.
    Large payloads stay files and are moved into place. Seekable, so a zip can be
    written into it or read from it.
    """

    def __init__(self, path, limit=INLINE_LIMIT):
        self.path, self.limit = path, limit
        self.f = io.BytesIO()

    @property
    def in_memory(self):
        return isinstance(self.f, io.BytesIO)

    def write(self, data):
        if self.in_memory and self.f.tell() + len(data) > self.limit:
            spilled = open(self.path, "w+b")
            spilled.write(self.f.getbuffer())
            spilled.seek(self.f.tell())
            self.f = spilled
        return self.f.write(data)

    def read(self, size=-1):
        return self.f.read(size)

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def seekable(self):
        return True

    def flush(self):
        self.f.flush()

    @property
    def size(self):
        if self.in_memory:
            return self.f.getbuffer().nbytes
        return os.path.getsize(self.path) if self.f.closed else os.fstat(self.f.fileno()).st_size

    def getvalue(self):
        return self.f.getvalue()

    def durable_file(self):
        """Flush and fsync the spilled file, close it and return its path."""
        if not self.f.closed:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        return self.path

    def discard(self):
        if not self.in_memory:
            self.f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_line(path, limit=300):
    """The last non-empty line of a text file (for a failed job's message), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * KiB))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


# ====================================================================================
# Store: SQLite for the records, files for the payloads
# ====================================================================================

QUEUED, RUNNING, SUCCESS, FAILED, CANCELLED, PARTIAL = (
    "QUEUED", "RUNNING", "SUCCESS", "FAILED", "CANCELLED", "PARTIAL")
FINISHED = (SUCCESS, FAILED, CANCELLED, PARTIAL)
STATES = (QUEUED, RUNNING) + FINISHED
MAX_ATTEMPTS = 2  # a job that was running when jobd died twice is not tried a third time

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE)""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)",
    # Payloads small enough to live in the database (see Spool); larger ones are files.
    """CREATE TABLE IF NOT EXISTS payloads (
        job_id TEXT NOT NULL, kind TEXT NOT NULL, data BLOB NOT NULL,
        PRIMARY KEY (job_id, kind))""",
]
# Columns are added to an existing table when missing, so a newer jobd opens an older store.
JOB_COLUMNS = [
    ("status", "TEXT NOT NULL DEFAULT 'QUEUED'"),
    ("message", "TEXT NOT NULL DEFAULT ''"),
    ("exit_code", "INTEGER"),
    ("created_at", "REAL NOT NULL DEFAULT 0"),
    ("started_at", "REAL"),
    ("finished_at", "REAL"),
    ("updated_at", "REAL NOT NULL DEFAULT 0"),
    ("input_bytes", "INTEGER NOT NULL DEFAULT 0"),
    ("output_bytes", "INTEGER"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("pgid", "INTEGER"),
    ("slurml", "INTEGER NOT NULL DEFAULT 0"),
    ("slurm_id", "INTEGER NOT NULL DEFAULT 0"),
]
INDEXES = ["CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq)"]

SQL_GET = "SELECT * FROM jobs WHERE id = ?"
SQL_INSERT = """INSERT INTO jobs (id, status, created_at, updated_at, input_bytes, slurml)
                VALUES (?, 'QUEUED', ?, ?, ?, ?)"""
SQL_NEXT_QUEUED = "SELECT id FROM jobs WHERE status = 'QUEUED' ORDER BY seq LIMIT 1"
SQL_CLAIM = """UPDATE jobs SET status = 'RUNNING', started_at = ?, updated_at = ?,
               attempts = attempts + 1, pgid = NULL WHERE id = ? AND status = 'QUEUED'"""
SQL_SET_PGID = "UPDATE jobs SET pgid = ? WHERE id = ?"
SQL_FINISH = """UPDATE jobs SET status = ?, message = ?, exit_code = ?, output_bytes = ?,
                finished_at = ?, updated_at = ?, pgid = NULL WHERE id = ? AND status = ?"""
SQL_REQUEUE = """UPDATE jobs SET status = 'QUEUED', updated_at = ?, pgid = NULL,
                 attempts = attempts - ? WHERE id = ? AND status = 'RUNNING'"""
SQL_RUNNING = "SELECT * FROM jobs WHERE status = 'RUNNING' ORDER BY seq"
SQL_EXPIRED = f"""SELECT id FROM jobs WHERE status IN {FINISHED!r} AND finished_at < ?"""
SQL_DELETE = "DELETE FROM jobs WHERE id = ?"
SQL_LIST = "SELECT * FROM jobs WHERE seq < ? {filter} ORDER BY seq DESC LIMIT ?"
SQL_ALL_IDS = "SELECT id FROM jobs"
SQL_PUT_PAYLOAD = "INSERT OR REPLACE INTO payloads (job_id, kind, data) VALUES (?, ?, ?)"
SQL_GET_PAYLOAD = "SELECT data FROM payloads WHERE job_id = ? AND kind = ?"
SQL_DELETE_PAYLOADS = "DELETE FROM payloads WHERE job_id = ?"
SQL_ORPHAN_PAYLOADS = "DELETE FROM payloads WHERE job_id NOT IN (SELECT id FROM jobs)"


class Store:
    """The jobs and their files; the only code that touches SQLite.

    Layout under the data directory (DATAPATH):
        <id>/                   working directory of a running job (the Go layout)
        .jobd/input/<id>.zip    the accepted input, kept until the job is removed
        .jobd/output/<id>.zip   the result, written once when the job ends
    Inputs and results up to INLINE_LIMIT bytes live in the payloads table instead.
        .jobd/tmp/              uploads being received, emptied at start-up
        .jobd/trash/            directories being removed
    Job ids cannot start with '.', so .jobd never collides with a job.

    Rules: a connection is borrowed from a small pool for one operation and returned,
    so no two threads ever share one at a time. Every write is one explicit BEGIN
    IMMEDIATE transaction, which also serialises writers. WAL mode lets readers run
    beside the writer. Accepting a job commits with synchronous=FULL (the 201 promises
    the job survives a power cut); later transitions use NORMAL, because losing one to
    a power cut only means the job runs again.
    """

    def __init__(self, db_file, data_dir):
        self.db_file = db_file
        self.data_dir = os.path.abspath(data_dir)
        self.state_dir = os.path.join(self.data_dir, ".jobd")
        self.dirs = {name: os.path.join(self.state_dir, name)
                     for name in ("input", "output", "tmp", "trash")}
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)
        parent = os.path.dirname(os.path.abspath(db_file))
        os.makedirs(parent, exist_ok=True)
        self._idle = []
        self._queue_lock = threading.Lock()   # guards the two fields below
        self._waiting = []                    # uploads waiting for the next group commit
        self._committing = False              # whether some thread is leading commits
        self._durable = self._connect()       # the leader's connection, synchronous=FULL
        self._durable.execute("PRAGMA synchronous = FULL")
        with self._db() as db:
            db.execute("PRAGMA journal_mode = WAL")
            for statement in SCHEMA:
                db.execute(statement)
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, definition in JOB_COLUMNS:
                if name not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
            for statement in INDEXES:
                db.execute(statement)

    # -- connections ------------------------------------------------------------------

    def _connect(self):
        db = sqlite3.connect(self.db_file, timeout=60, isolation_level=None,
                             check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    @contextlib.contextmanager
    def _db(self):
        try:
            db = self._idle.pop()  # list.pop/append are atomic: the pool needs no lock
        except IndexError:
            db = self._connect()
        try:
            yield db
        finally:
            self._idle.append(db)

    @contextlib.contextmanager
    def _write(self, db=None):
        """One BEGIN IMMEDIATE transaction, on a pooled connection unless one is given."""
        with (contextlib.nullcontext(db) if db else self._db()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self):
        self._durable.close()
        while self._idle:
            self._idle.pop().close()

    # -- paths ------------------------------------------------------------------------

    def job_dir(self, job_id):
        return os.path.join(self.data_dir, job_id)

    def input_zip(self, job_id):
        return os.path.join(self.dirs["input"], job_id + ".zip")

    def output_zip(self, job_id):
        return os.path.join(self.dirs["output"], job_id + ".zip")

    def spool(self):
        """A Spool for a payload being received or written (a left-over spill file is
        removed at start-up)."""
        return Spool(os.path.join(self.dirs["tmp"], uuid.uuid4().hex))

    def _place(self, spool, job_id, kind):
        """Before a transaction: move a large payload's file into place, durably."""
        if spool is not None and not spool.in_memory:
            target = self.input_zip(job_id) if kind == "input" else self.output_zip(job_id)
            os.replace(spool.durable_file(), target)
            fsync_path(os.path.dirname(target), directory=True)

    def _open_payload(self, job_id, kind):
        """(file object, size) of a job's input or output; (None, 0) if it has none."""
        with self._db() as db:
            row = db.execute(SQL_GET_PAYLOAD, (job_id, kind)).fetchone()
        if row is not None:
            return io.BytesIO(row["data"]), len(row["data"])
        try:
            f = open(self.input_zip(job_id) if kind == "input" else self.output_zip(job_id), "rb")
        except FileNotFoundError:
            return None, 0
        return f, os.fstat(f.fileno()).st_size

    def open_input(self, job_id):
        return self._open_payload(job_id, "input")[0]

    def open_output(self, job_id):
        return self._open_payload(job_id, "output")

    def discard(self, path):
        """Remove a file or a whole directory; directories are renamed away first, so a
        process still writing by relative path never writes into a new directory of that name."""
        if os.path.isdir(path) and not os.path.islink(path):
            doomed = os.path.join(self.dirs["trash"], uuid.uuid4().hex)
            try:
                os.rename(path, doomed)
            except OSError:
                doomed = path
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- the life of a job ---------------------------------------------------------------

    def add(self, job_id, spool, slurml=False):
        """Accept a job whose input zip is in `spool`: durable when this returns.

        Raises Conflict when the id exists. The id check and the insert are one
        transaction, so of racing uploads exactly one wins. Uploads arriving together
        share that transaction and its fsync (group commit): the first waiting upload
        leads, commits everyone waiting, wakes them, and hands the lead to the next one.
        """
        entry = {"id": job_id, "spool": spool, "slurml": int(slurml), "error": None,
                 "lead": False, "event": threading.Event()}
        if not spool.in_memory:
            spool.durable_file()  # the fsync of a large input happens outside the queue
        with self._queue_lock:
            self._waiting.append(entry)
            entry["lead"] = not self._committing
            self._committing = True
        if not entry["lead"]:
            entry["event"].wait()  # set when committed, or when handed the lead
        if entry["lead"]:
            with self._queue_lock:
                batch, self._waiting = self._waiting, []
            self._commit(batch)
            with self._queue_lock:
                if self._waiting:
                    self._waiting[0]["lead"] = True
                    self._waiting[0]["event"].set()
                else:
                    self._committing = False
        if entry["error"] is not None:
            raise entry["error"]
        return entry["job"]

    def _commit(self, batch):
        now = time.time()
        try:
            moved = False
            with self._write(self._durable) as db:
                for entry in batch:
                    job_id, spool = entry["id"], entry["spool"]
                    size = spool.size
                    try:
                        db.execute(SQL_INSERT, (job_id, now, now, size, entry["slurml"]))
                    except sqlite3.IntegrityError:  # the id exists (only this row is undone)
                        entry["error"] = Conflict("job already exists")
                        continue
                    if spool.in_memory:
                        db.execute(SQL_PUT_PAYLOAD, (job_id, "input", spool.getvalue()))
                    else:
                        os.replace(spool.path, self.input_zip(job_id))
                        moved = True
                    entry["job"] = db.execute(SQL_GET, (job_id,)).fetchone()
                if moved:
                    fsync_path(self.dirs["input"], directory=True)
        except Exception as e:
            for entry in batch:
                entry["error"] = entry["error"] or e
        for entry in batch:
            entry["lead"] = False
            entry["event"].set()

    def get(self, job_id):
        with self._db() as db:
            return db.execute(SQL_GET, (job_id,)).fetchone()

    def claim_next(self):
        """Move the oldest queued job to RUNNING and return it, or None. Atomic."""
        with self._db() as db:
            if db.execute(SQL_NEXT_QUEUED).fetchone() is None:
                return None  # the common idle case needs no write lock
        now = time.time()
        with self._write() as db:
            row = db.execute(SQL_NEXT_QUEUED).fetchone()
            if row is None:
                return None
            db.execute(SQL_CLAIM, (now, now, row["id"]))
        return self.get(row["id"])

    def set_pgid(self, job_id, pgid):
        with self._write() as db:
            db.execute(SQL_SET_PGID, (pgid, job_id))

    def finish(self, job_id, status, message, exit_code=None, output=None, was=RUNNING):
        """Record the end of a job that is in state `was`, with its result zip (a Spool);
        False if the job was not in that state."""
        size = output.size if output is not None else None
        self._place(output, job_id, "output")
        now = time.time()
        with self._write() as db:
            cursor = db.execute(SQL_FINISH, (status, message, exit_code, size,
                                             now, now, job_id, was))
            if cursor.rowcount == 1 and output is not None and output.in_memory:
                db.execute(SQL_PUT_PAYLOAD, (job_id, "output", output.getvalue()))
        if cursor.rowcount == 0 and output is not None and not output.in_memory:
            self.discard(self.output_zip(job_id))  # the job was deleted meanwhile
        return cursor.rowcount == 1

    def requeue(self, job_id, count_attempt):
        """Put a running job back in the queue (jobd is stopping or restarting)."""
        with self._write() as db:
            db.execute(SQL_REQUEUE, (time.time(), 0 if count_attempt else 1, job_id))

    def list_jobs(self, statuses, before, limit):
        """Jobs newest first, older than sequence number `before`, optionally by status."""
        where = f"AND status IN ({','.join('?' * len(statuses))})" if statuses else ""
        with self._db() as db:
            return db.execute(SQL_LIST.format(filter=where),
                              (before, *statuses, limit)).fetchall()

    def running_jobs(self):
        with self._db() as db:
            return db.execute(SQL_RUNNING).fetchall()

    def expired(self, before):
        with self._db() as db:
            return [row["id"] for row in db.execute(SQL_EXPIRED, (before,))]

    def remove(self, job_id):
        """Delete a job's record and every file it has."""
        with self._write() as db:
            db.execute(SQL_DELETE, (job_id,))
            db.execute(SQL_DELETE_PAYLOADS, (job_id,))
        for path in (self.input_zip(job_id), self.output_zip(job_id), self.job_dir(job_id)):
            self.discard(path)

    def sweep_orphans(self):
        """At start-up: drop half-received uploads and payload files no record points to."""
        for kind in ("tmp", "trash"):
            for name in os.listdir(self.dirs[kind]):
                shutil.rmtree(os.path.join(self.dirs[kind], name), ignore_errors=True)
                self.discard(os.path.join(self.dirs[kind], name))
        with self._write() as db:
            db.execute(SQL_ORPHAN_PAYLOADS)
            known = {row["id"] for row in db.execute(SQL_ALL_IDS)}
        for kind in ("input", "output"):
            for name in os.listdir(self.dirs[kind]):
                if name[:-4] not in known:
                    self.discard(os.path.join(self.dirs[kind], name))


# ====================================================================================
# Runner: a fixed pool of worker threads, one subprocess per job
# ====================================================================================

def job_environment():
    """The environment jobs run with: the one jobd was started with.

    A frozen jobd (PyInstaller) points LD_LIBRARY_PATH into its own unpacked bundle;
    a tool started by run.sh would then load jobd's libraries instead of its image's
    and can crash. Restore the original value, or drop it if there was none.
    """
    env = dict(os.environ)
    if getattr(sys, "frozen", False):
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is None:
            env.pop("LD_LIBRARY_PATH", None)
        else:
            env["LD_LIBRARY_PATH"] = original
    return env


def run_command(job_dir, env):
    """argv for run.sh: itself when it has a #! line, else bash (or /bin/sh without bash)."""
    with open(os.path.join(job_dir, RUN_SH), "rb") as f:
        if f.read(2) == b"#!":
            return ["./" + RUN_SH]
    return [shutil.which("bash", path=env.get("PATH", os.defpath)) or "/bin/sh", RUN_SH]


def signal_group(pgid, sig):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_leftovers(pgid, job_dir):
    """Kill what an earlier jobd left of a job: processes working in its directory, and
    its process group once a member proves the group is still that job's (pids get reused)."""
    if not os.path.isdir("/proc"):
        return 0
    inside, groups = [], set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            with open(f"/proc/{name}/stat") as f:
                group = int(f.read().rsplit(")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        if cwd == job_dir or cwd.startswith(job_dir + "/"):
            inside.append(int(name))
            groups.add(group)
    for pid in inside:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if pgid and pgid in groups:
        signal_group(pgid, signal.SIGKILL)
    return len(inside)


def describe_exit(code, stderr_path):
    """(status, message, exit code) for a finished run.sh, with Go's wording."""
    if code == 0:
        return SUCCESS, "job finished successfully", 0
    if code < 0:
        name = (signal.strsignal(-code) or f"signal {-code}").lower()
        message, code = f"could not finish the job, error: signal: {name}", 128 - code
    else:
        message = f"could not finish the job, error: exit status {code}"
    tail = last_line(stderr_path)
    return FAILED, f"{message}: {tail}" if tail else message, code


class ActiveJob:
    """A job a worker is running: its process, and why it is being stopped, if it is."""

    def __init__(self, job_id):
        self.job_id = job_id
        self.lock = threading.Lock()
        self.proc = None
        self.reason = None       # "cancel", "timeout" or "shutdown" once stopping
        self.kill_at = None      # monotonic time of the SIGKILL that follows SIGTERM
        self.done = threading.Event()  # set when the worker has recorded the job's end

    def attach(self, proc, grace):
        """Remember the started process; stop it at once if a stop came first."""
        with self.lock:
            self.proc = proc
            reason = self.reason
            self.reason = None
        if reason:
            self.stop(reason, grace)

    def stop(self, reason, grace):
        """SIGTERM the job's whole process group now, SIGKILL it after `grace` seconds."""
        with self.lock:
            if self.reason:
                return
            self.reason = reason
            proc = self.proc
            if proc is None:
                return  # attach() will stop it
            self.kill_at = time.monotonic() + grace
        signal_group(proc.pid, signal.SIGTERM)
        timer = threading.Timer(grace, signal_group, (proc.pid, signal.SIGKILL))
        timer.daemon = True
        timer.start()


class Runner:
    """Runs queued jobs on a fixed pool of worker threads.

    A worker is woken the moment a job is accepted, claims the oldest queued job in one
    atomic store transaction (so each job runs exactly once), runs it in its own process
    group and records the result. A failure in one job never stops a worker.
    """

    def __init__(self, store, cfg, log):
        self.store, self.cfg, self.log = store, cfg, log
        self.env = job_environment()
        self.stopping = threading.Event()
        self.wakeup = threading.Condition()
        self.generation = 0              # bumped by notify(), so no wake-up is ever lost
        self.lock = threading.Lock()     # guards self.active and every claim
        self.active = {}                 # job id -> ActiveJob
        self.threads = []

    # -- start, notify, stop ----------------------------------------------------------

    def start(self):
        self.recover()
        self.sweep()
        for number in range(self.cfg.workers):
            self._spawn(self.work, f"worker-{number}")
        self._spawn(self.sweep_loop, "janitor")

    def _spawn(self, target, name):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def notify(self):
        with self.wakeup:
            self.generation += 1
            self.wakeup.notify()

    def stop(self, grace):
        """Stop every running job (TERM, then KILL after grace) and queue it again."""
        self.stopping.set()
        with self.wakeup:
            self.wakeup.notify_all()
        with self.lock:
            running = list(self.active.values())
        for active in running:
            active.stop("shutdown", grace)
        deadline = time.monotonic() + grace + 5
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- the worker loop --------------------------------------------------------------

    def work(self):
        while not self.stopping.is_set():
            with self.wakeup:
                seen = self.generation
            try:
                with self.lock:
                    job = self.store.claim_next()
                    if job is not None:
                        self.active[job["id"]] = ActiveJob(job["id"])
            except Exception:
                self.log("worker error", level="error", error=traceback.format_exc())
                job = None
            if job is None:
                with self.wakeup:
                    while self.generation == seen and not self.stopping.is_set():
                        if not self.wakeup.wait(timeout=5.0):
                            break  # look again now and then, whatever happened
                continue
            try:
                self.run(job, self.active[job["id"]])
            except Exception:
                self.log("worker error", level="error", job=job["id"],
                         error=traceback.format_exc())
            finally:
                with self.lock:
                    self.active.pop(job["id"], None).done.set()

    def run(self, job, active):
        job_id = job["id"]
        job_dir = self.store.job_dir(job_id)
        self.log("job", id=job_id, status=RUNNING, attempt=job["attempts"])
        started = time.monotonic()
        try:
            self.store.discard(job_dir)  # what an interrupted attempt left
            os.makedirs(job_dir)
            source = self.store.open_input(job_id)
            if source is None:
                raise FileNotFoundError("the job's input is missing from the store")
            with source:
                extract_input_zip(source, job_dir, self.cfg)
            outcome = self.execute(job_id, job_dir, active)
        except (OSError, JobdError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            outcome = FAILED, f"could not prepare the job: {getattr(e, 'message', e)}", None
        if outcome is None:  # jobd is stopping: run it again at the next start
            self.store.requeue(job_id, count_attempt=False)
            self.store.discard(job_dir)
            self.log("job", id=job_id, status=QUEUED, reason="jobd stopping")
            return
        status, message, exit_code = outcome
        self.finish(job_id, status, message, exit_code)
        self.log("job", id=job_id, status=status, exit_code=exit_code,
                 seconds=round(time.monotonic() - started, 3),
                 message=None if status == SUCCESS else message)

    def execute(self, job_id, job_dir, active):
        """Run run.sh to its end; (status, message, exit code), or None when jobd stops."""
        argv = run_command(job_dir, self.env)
        with open(os.path.join(job_dir, STDOUT_FILE), "wb") as out, \
                open(os.path.join(job_dir, STDERR_FILE), "wb") as err:
            for attempt in range(50):
                try:
                    proc = subprocess.Popen(argv, cwd=job_dir, env=self.env,
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                            start_new_session=True)
                    break
                except OSError as e:
                    # ETXTBSY: another thread's fork briefly holds run.sh open for writing
                    if e.errno == errno.ETXTBSY and attempt < 49:
                        time.sleep(0.01)
                        continue
                    what = "its interpreter" if argv[0].startswith("./") else argv[0]
                    return FAILED, f"could not start run.sh ({what}): {e.strerror}", None
        self.store.set_pgid(job_id, proc.pid)
        active.attach(proc, self.cfg.grace)
        code = proc.wait()
        self.end_group(proc.pid, active)
        if active.reason == "shutdown":
            return None
        if active.reason == "cancel":
            return CANCELLED, "job cancelled", None
        return describe_exit(code, os.path.join(job_dir, STDERR_FILE))

    def end_group(self, pgid, active):
        """Once run.sh has exited, make sure nothing it started outlives the job."""
        if active.reason:
            while group_alive(pgid) and time.monotonic() < (active.kill_at or 0):
                time.sleep(0.02)
        signal_group(pgid, signal.SIGKILL)

    def finish(self, job_id, status, message, exit_code=None, was=RUNNING):
        """Zip the job directory once into the result, record the end (if the job is
        still in state `was`), and remove the directory unless DEBUG."""
        job_dir = self.store.job_dir(job_id)
        output = self.store.spool()
        try:
            if os.path.isdir(job_dir):
                write_result_zip(job_dir, output)
            else:
                output.write(EMPTY_ZIP)
            return self.store.finish(job_id, status, message, exit_code, output, was)
        except OSError as e:
            self.log("result zip failed", level="error", job=job_id, error=str(e))
            return self.store.finish(job_id, status, message, exit_code, None, was)
        finally:
            output.discard()
            if not self.cfg.debug:
                self.store.discard(job_dir)

    # -- cancel -----------------------------------------------------------------------

    def cancel(self, job_id, wait=0.0):
        """Cancel a queued or running job, waiting up to `wait` seconds for a running one
        to end; False if it had already finished (or is not known)."""
        with self.lock:
            if self.finish(job_id, CANCELLED, "job cancelled before it started", was=QUEUED):
                self.log("job", id=job_id, status=CANCELLED)
                return True
            active = self.active.get(job_id)
        if active is None:
            return False
        active.stop("cancel", self.cfg.grace)
        active.done.wait(wait)
        return True

    def delete(self, job_id):
        """Cancel a job if needed, then remove its record and every file."""
        self.cancel(job_id, wait=self.cfg.grace + 5)
        self.store.remove(job_id)
        self.log("job removed", id=job_id, reason="deleted")

    # -- restart and retention ----------------------------------------------------------

    def recover(self):
        """Start-up: clean what a crash left, queue interrupted jobs again (up to a limit)."""
        self.store.sweep_orphans()
        for job in self.store.running_jobs():
            job_id = job["id"]
            job_dir = self.store.job_dir(job_id)
            killed = kill_leftovers(job["pgid"], job_dir)
            self.store.discard(job_dir)
            if job["attempts"] >= MAX_ATTEMPTS:
                message = (f"job was interrupted {job['attempts']} times "
                           "(jobd stopped while it ran); not run again")
                self.finish(job_id, FAILED, message)
                self.log("job", id=job_id, status=FAILED, message=message)
            else:
                self.store.requeue(job_id, count_attempt=True)
                self.log("job", id=job_id, status=QUEUED, reason="interrupted by a stop of jobd",
                         killed_processes=killed or None)

    def sweep_loop(self):
        interval = min(3600.0, max(0.5, self.cfg.retention / 4))
        while not self.stopping.wait(interval):
            try:
                self.sweep()
            except Exception:
                self.log("sweep error", level="error", error=traceback.format_exc())

    def sweep(self):
        """Remove finished jobs (record and files) older than the retention period."""
        for job_id in self.store.expired(time.time() - self.cfg.retention):
            self.store.remove(job_id)
            self.log("job removed", id=job_id, reason="retention")


# ====================================================================================
# HTTP: request bodies
# ====================================================================================

class RequestBody:
    """One request's body as a stream (Content-Length or chunked), capped at `limit`.

    read() returns b"" at the end. A body that ends early, is malformed or grows past
    the cap raises a JobdError; the handler then closes the connection.
    """

    def __init__(self, rfile, headers, limit):
        self.rfile, self.limit = rfile, limit
        self.received = 0
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.left = 0       # bytes left in the body (or in the current chunk)
        self.done = False
        if headers.get("Transfer-Encoding") and not self.chunked:
            raise BadRequest("unsupported Transfer-Encoding")
        if not self.chunked:
            length = headers.get("Content-Length", "0").strip()
            if not length.isdigit():
                raise BadRequest(f"invalid Content-Length {length!r}")
            self.left = int(length)
            if self.left > limit:
                raise PayloadTooLarge(f"request body of {self.left} bytes is larger than the "
                                      f"limit of {limit} bytes (JOBD_MAX_UPLOAD)")
            self.done = self.left == 0

    @property
    def finished(self):
        return self.done

    def read(self, size=CHUNK):
        if self.done:
            return b""
        if self.chunked and self.left == 0:
            self._next_chunk()
            if self.done:
                return b""
        data = self.rfile.read(min(size, self.left))
        if not data:
            raise BadRequest("request body ended early")
        self.left -= len(data)
        self.received += len(data)
        if self.received > self.limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {self.limit} "
                                  "bytes (JOBD_MAX_UPLOAD)")
        if self.left == 0:
            if self.chunked and self.rfile.read(2) != b"\r\n":
                raise BadRequest("malformed chunked body")
            self.done = not self.chunked
        return data

    def _next_chunk(self):
        line = self.rfile.readline(1024)
        try:
            self.left = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise BadRequest("malformed chunked body") from None
        if self.left == 0:
            while self.rfile.readline(8 * KiB) not in (b"\r\n", b"\n", b""):
                pass  # trailers are ignored
            self.done = True

    def drain(self, most):
        """Read and drop what is left of the body, if it is small; True when done."""
        while not self.done and most > 0:
            most -= len(self.read(min(most, 64 * KiB)))
        return self.done


class Base64File:
    """Writes base64 text, fed in pieces of any size, to a file as the decoded bytes.

    Like Go's decoder it ignores CR and LF; padding may be left out.
    """

    def __init__(self, f):
        self.f = f
        self.carry = b""
        self.size = 0
        self.padded = False

    def write(self, text):
        data = self.carry + text.translate(None, b"\r\n")
        cut = len(data) - len(data) % 4
        self.carry = data[cut:]
        if cut:
            self._decode(data[:cut])

    def close(self):
        if len(self.carry) % 4 == 1:
            raise BadRequest("input is not valid base64 (truncated)")
        if self.carry:
            self._decode(self.carry + b"=" * (-len(self.carry) % 4))

    def _decode(self, block):
        if self.padded:
            raise BadRequest("input is not valid base64 (data after the padding)")
        try:
            data = base64.b64decode(block, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("input is not valid base64") from None
        self.padded = block.endswith(b"=")
        self.f.write(data)
        self.size += len(data)


class UploadReader:
    """Reads the Go upload body {"id", "input", "slurml", ...} from a stream.

    "input" (base64 of a zip) may be hundreds of megabytes, so it is decoded on the fly
    into a file rather than held in memory; every other value is small and goes through
    json.loads. As in Go, keys match case-insensitively, the last of duplicate keys wins,
    and unknown keys are ignored.
    """

    KNOWN = ("id", "slurml", "timeout", "callback")
    SMALL, LARGE = 64 * KiB, 16 * MiB
    STRUCTURE = re.compile(rb'["\[\]{}]')
    VALUE_END = re.compile(rb"[,}\]\s]")
    ESCAPES = {ord("/"): b"/", ord("\\"): b"\\", ord('"'): b'"', ord("n"): b"\n",
               ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("f"): b"\f"}

    def __init__(self, body, spool):
        self.body, self.spool = body, spool
        self.buf = bytearray()
        self.pos = 0

    def read(self):
        """(fields, input_given): the known keys' values, and whether "input" was a string."""
        fields, input_given = {}, False
        self.expect(b"{", "the body must be a JSON object")
        if self.peek() == b"}":
            self.pos += 1
        else:
            while True:
                if self.peek() != b'"':
                    raise BadRequest("invalid JSON: expected a string key")
                key = self.loads(self.take_value(self.SMALL)).lower()
                self.expect(b":", "invalid JSON: expected ':' after a key")
                if key == "input" and self.peek() == b'"':
                    self.stream_input()
                    input_given = True
                elif key == "input":
                    value = self.loads(self.take_value(self.SMALL))
                    if value is not None:
                        raise BadRequest('invalid JSON: "input" must be a base64 string')
                    input_given = False
                else:
                    raw = self.take_value(self.SMALL if key in self.KNOWN else self.LARGE)
                    value = self.loads(raw)
                    if key in self.KNOWN:
                        fields[key] = value
                separator = self.peek()
                self.pos += 1
                if separator == b"}":
                    break
                if separator != b",":
                    raise BadRequest("invalid JSON: expected ',' or '}'")
        while True:  # only white space may follow the object
            if self.buf[self.pos:].strip():
                raise BadRequest("invalid JSON: data after the object")
            self.buf.clear()
            self.pos = 0
            if not self.fill(required=False):
                return fields, input_given

    @staticmethod
    def loads(raw):
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"invalid JSON: {e}") from None

    # -- the buffer -------------------------------------------------------------------

    def fill(self, required=True):
        chunk = self.body.read(CHUNK)
        if not chunk:
            if required:
                raise BadRequest("invalid JSON: unexpected end of input")
            return False
        self.buf += chunk
        return True

    def peek(self):
        """The next byte that is not white space (b"" at the end of the body)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in b" \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                if self.pos > CHUNK:  # drop what has been consumed
                    del self.buf[: self.pos]
                    self.pos = 0
                return bytes(self.buf[self.pos: self.pos + 1])
            if not self.fill(required=False):
                return b""

    def expect(self, char, message):
        if self.peek() != char:
            raise BadRequest(message)
        self.pos += 1

    def need(self, start, limit):
        self.fill()
        if len(self.buf) - start > limit:
            raise BadRequest("invalid JSON: a value is too large")

    # -- values -----------------------------------------------------------------------

    def string_end(self, at, start, limit):
        """Index just past the string that opens at `at` (escapes honoured)."""
        i = at + 1
        while True:
            quote = self.buf.find(b'"', i)
            if quote == -1:
                i = len(self.buf)
                self.need(start, limit)
                continue
            slashes = 0
            while self.buf[quote - 1 - slashes] == 0x5C:
                slashes += 1
            if slashes % 2 == 0:
                return quote + 1
            i = quote + 1

    def take_value(self, limit):
        """The raw bytes of the next value (string, number, literal, object or array)."""
        first = self.peek()
        start = i = self.pos
        if first == b"":
            raise BadRequest("invalid JSON: unexpected end of input")
        if first == b'"':
            end = self.string_end(start, start, limit)
        elif first in (b"{", b"["):
            depth = 0
            while True:
                match = self.STRUCTURE.search(self.buf, i)
                if match is None:
                    i = len(self.buf)
                    self.need(start, limit)
                    continue
                char = self.buf[match.start()]
                if char == 0x22:
                    i = self.string_end(match.start(), start, limit)
                    continue
                depth += 1 if char in b"{[" else -1
                i = match.start() + 1
                if depth == 0:
                    end = i
                    break
        else:
            while True:
                match = self.VALUE_END.search(self.buf, i)
                if match is not None:
                    end = match.start()
                    break
                i = len(self.buf)
                if not self.fill(required=False):
                    end = i
                    break
                if len(self.buf) - start > limit:
                    raise BadRequest("invalid JSON: a value is too large")
        self.pos = end
        return bytes(self.buf[start:end])

    def stream_input(self):
        """Decode the "input" string into the spool, never holding it whole."""
        self.pos += 1  # the opening quote
        self.spool.seek(0)
        self.spool.f.truncate()  # a repeated "input" key replaces the earlier one
        sink = Base64File(self.spool)
        while True:
            if self.pos >= len(self.buf):
                self.buf.clear()
                self.pos = 0
                self.fill()
            buf, pos = self.buf, self.pos
            end = buf.find(b'"', pos)
            backslash = buf.find(b"\\", pos, end if end != -1 else len(buf))
            if backslash != -1:
                end = backslash
            elif end == -1:
                end = len(buf)
            if end > pos:
                sink.write(bytes(buf[pos:end]))
                self.pos = end
            if self.pos >= len(buf):
                continue
            if buf[self.pos] == 0x22:
                self.pos += 1
                break
            sink.write(self.take_escape())
        sink.close()

    def take_escape(self):
        while len(self.buf) - self.pos < 6:
            if not self.fill(required=False):
                break
        code = self.buf[self.pos + 1] if self.pos + 1 < len(self.buf) else None
        if code == ord("u"):
            try:
                char = chr(int(self.buf[self.pos + 2: self.pos + 6], 16))
            except ValueError:
                raise BadRequest("invalid JSON: bad \\u escape") from None
            self.pos += 6
            return char.encode("utf-8", "replace")
        if code not in self.ESCAPES:
            raise BadRequest("invalid JSON: bad escape in a string")
        self.pos += 2
        return self.ESCAPES[code]


# ====================================================================================
# HTTP: the job object and the handler
# ====================================================================================

JSON_TYPE = "application/json; charset=utf-8"
COMPACT = (",", ":")


class Headers(dict):
    """Request headers by lower-case name; repeats are joined with ', '."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name):
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


def read_headers(rfile, most=100):
    """Read a request's header section (http.server sends it through the email package,
    which costs a third of the CPU time of a small request)."""
    headers = Headers()
    for _ in range(most):
        line = rfile.readline(64 * KiB + 1)
        if len(line) > 64 * KiB:
            raise HeadersTooLarge("a request header line is too long")
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, colon, value = line.decode("iso-8859-1").partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(f"malformed request header {line[:60]!r}")
        key, value = name.lower(), value.strip()
        if key in headers:
            if key in ("content-length", "transfer-encoding", "host"):
                raise BadRequest(f"repeated {name} header")
            value = headers[key] + ", " + value
        dict.__setitem__(headers, key, value)
    raise HeadersTooLarge(f"more than {most} request headers")


def job_object_parts(job):
    """The Go job object as JSON text, split where the base64 "Output" goes.

    Keys, order and spelling are the Go daemon's; "Path" and "Input" are always ""
    (Go echoed the whole input and leaked a server path); "ExitCode" is ours.
    """
    head = {"LastUpdated": rfc3339(job["updated_at"]), "ID": job["id"],
            "Status": job["status"], "Path": "", "Input": ""}
    tail = {"Message": job["message"], "SlurmID": job["slurm_id"],
            "Slurml": bool(job["slurml"]), "ExitCode": job["exit_code"]}
    return (json.dumps(head, separators=COMPACT)[:-1] + ',"Output":"',
            '",' + json.dumps(tail, separators=COMPACT)[1:])


def status_object(job):
    """The small status of a job for the resource API: the job object without
    "Input"/"Output", plus times and sizes."""
    def moment(value):
        return rfc3339(value) if value else None
    return {"LastUpdated": rfc3339(job["updated_at"]), "ID": job["id"], "Status": job["status"],
            "Path": "", "Message": job["message"], "SlurmID": job["slurm_id"],
            "Slurml": bool(job["slurml"]), "ExitCode": job["exit_code"],
            "CreatedAt": moment(job["created_at"]), "StartedAt": moment(job["started_at"]),
            "FinishedAt": moment(job["finished_at"]), "InputBytes": job["input_bytes"],
            "OutputBytes": job["output_bytes"]}


def parse_range(header, size):
    """(first, last) byte of a single 'bytes=' range; None to send the whole file."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not match or match.group(1) == match.group(2) == "":
        return None  # absent, several ranges or malformed: ignored, as RFC 9110 allows
    first, last = match.groups()
    if first == "":
        first, last = max(0, size - int(last)), size - 1
        if int(match.group(2)) == 0:
            first = size
    else:
        first, last = int(first), min(int(last), size - 1) if last else size - 1
        if match.group(2) and int(match.group(2)) < first:
            return None
    if first >= size:
        raise RangeNotSatisfiable(f"range {header!r} is outside the {size} bytes of the output",
                                  **{"Content-Range": f"bytes */{size}"})
    return first, last


LIST_LIMIT = 1000
ROUTES = [
    # (path pattern, {method: handler method}); HEAD is served wherever GET is.
    (r"/api/upload", {"POST": "upload"}),
    (r"/api/get/(?P<job_id>[^/]+)", {"GET": "get_job"}),
    (r"/api/jobs", {"GET": "list_jobs", "POST": "post_job"}),
    (r"/api/jobs/(?P<job_id>[^/]+)", {"GET": "job_status", "PUT": "put_job",
                                      "DELETE": "delete_job"}),
    (r"/api/jobs/(?P<job_id>[^/]+)/output", {"GET": "job_output"}),
    (r"/api/jobs/(?P<job_id>[^/]+)/logs/(?P<stream>stdout|stderr)", {"GET": "job_log"}),
    (r"/api/jobs/(?P<job_id>[^/]+)/cancel", {"POST": "cancel_job"}),
]
COMPILED_ROUTES = [(re.compile(pattern), methods) for pattern, methods in ROUTES]


class Handler(BaseHTTPRequestHandler):
    """Serves the API; one instance per connection, one call of dispatch() per request.

    Contract: every answer is JSON (or a file) with a Content-Length, so connections are
    kept alive; a JobdError becomes the Go error body with its status; anything else is
    logged with its traceback and answered 500; the daemon itself never stops for a request.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"jobd/{__version__}"
    sys_version = ""

    def setup(self):
        self.app = self.server.app
        self.timeout = self.app.cfg.request_timeout
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def parse_request(self):
        """http.server's request parsing, stricter and leaner: HTTP/1.0 and 1.1 only,
        headers through read_headers(). False (after answering) when the request is bad."""
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        self.status, self.body, self.headers = None, None, Headers()
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) != 3 or not re.fullmatch(r"HTTP/\d\.\d", words[2]):
            self.send_error(400, f"bad request line {self.requestline[:100]!r}")
            return False
        if words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(505, f"HTTP version {words[2]} is not supported")
            return False
        self.command, self.path, self.request_version = words
        try:
            self.headers = read_headers(self.rfile)
        except JobdError as e:
            self.send_failure(e)
            return False
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = ("close" in connection or
                                 (self.request_version == "HTTP/1.0" and "keep-alive" not in connection))
        if (self.headers.get("Expect", "").lower() == "100-continue"
                and self.request_version == "HTTP/1.1"):
            return self.handle_expect_100()
        return True

    def handle_expect_100(self):
        """Refuse a too large body before the client sends it."""
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.app.cfg.max_upload:
            self.send_failure(PayloadTooLarge(f"request body of {length} bytes is larger than "
                                              f"the limit of {self.app.cfg.max_upload} bytes"))
            return False
        return super().handle_expect_100()

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_OPTIONS(self):
        self.dispatch("OPTIONS")

    # -- dispatch ---------------------------------------------------------------------

    def dispatch(self, method):
        started = time.monotonic()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        try:
            name, params = self.route(method, url.path)
            getattr(self, name)(**params)
        except JobdError as e:
            self.send_failure(e)
        except (ConnectionError, TimeoutError, socket.timeout) as e:
            self.close_connection = True
            if isinstance(e, (TimeoutError, socket.timeout)) and self.status is None:
                with contextlib.suppress(OSError):
                    self.send_failure(RequestTimeout("the request body stalled; timed out"))
        except Exception:
            self.app.log("request error", level="error", path=url.path,
                         error=traceback.format_exc())
            if self.status is None:
                self.send_failure(JobdError("internal error; the details are in jobd's log"))
            self.close_connection = True
        finally:
            self.finish_body()
            self.app.log("http", method=method, path=url.path, status=self.status,
                         ms=round((time.monotonic() - started) * 1000, 1),
                         client=self.client_address[0] if self.client_address else None)

    def route(self, method, path):
        for pattern, methods in COMPILED_ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method == "HEAD" and "GET" in methods:
                method = "GET"
            if method not in methods:
                allow = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
                raise MethodNotAllowed(f"method {method} is not allowed on {path}",
                                       Allow=", ".join(allow))
            return methods[method], {k: unquote(v) for k, v in match.groupdict().items()}
        raise NotFound(f"no such endpoint: {path}")

    def request_body(self):
        self.body = RequestBody(self.rfile, self.headers, self.app.cfg.max_upload)
        return self.body

    def body_read(self):
        if self.body is not None:
            return self.body.finished
        return (self.headers.get("Content-Length", "0").strip() in ("", "0")
                and "Transfer-Encoding" not in self.headers)

    def finish_body(self):
        """Keep the connection only if this request's body has been read to its end."""
        try:
            if self.body is None:
                self.body = RequestBody(self.rfile, self.headers, self.app.cfg.max_upload)
            if not self.body.drain(most=64 * KiB):
                self.close_connection = True
        except (JobdError, OSError, ValueError):
            self.close_connection = True

    # -- answers ----------------------------------------------------------------------

    def send_head(self, status, content_type, length, headers=()):
        """Status line and headers (not yet sent); a length of None means chunked."""
        self.status = status
        self.send_response(status)
        if status not in (204, 304):
            self.send_header("Content-Type", content_type)
            if length is None:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(length))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")

    def send_bytes(self, status, body, content_type=JSON_TYPE, headers=()):
        """A whole answer in one write (status line, headers and a small body)."""
        self.send_head(status, content_type, len(body), headers)
        self._headers_buffer.append(b"\r\n")  # end_headers() would flush before the body
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()

    def send_json(self, status, obj, headers=()):
        self.send_bytes(status, json.dumps(obj, separators=COMPACT).encode(), headers=headers)

    def send_failure(self, error):
        if error.status >= 400 and not self.body_read():
            self.close_connection = True  # the unread body would be taken as the next request
        body = {"error": error.code, "message": error.message, "status": error.status}
        self.send_json(error.status, body, headers=tuple(error.headers.items()))

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, huge headers...) as JSON too."""
        error = JobdError(message or HTTPStatus(code).phrase)
        error.status, error.code = code, HTTPStatus(code).phrase.lower().replace(" ", "_")
        self.close_connection = True
        self.send_failure(error)

    def version_string(self):
        return self.server_version

    def log_request(self, code="-", size="-"):
        pass  # dispatch() logs one line per request, with its duration

    def log_message(self, format, *args):
        self.app.log("http error", level="warning", message=format % args)

    # -- the Go API -------------------------------------------------------------------

    def upload(self):
        """POST /api/upload: {"id", "input" (base64 zip)} -> 201 and the job object."""
        app = self.app
        spool = app.store.spool()
        try:
            fields, input_given = UploadReader(self.request_body(), spool).read()
            job_id, slurml = fields.get("id"), fields.get("slurml")
            if job_id is not None and not isinstance(job_id, str):
                raise BadRequest('invalid JSON: "id" must be a string')
            if slurml is not None and not isinstance(slurml, bool):
                raise BadRequest('invalid JSON: "slurml" must be true or false')
            if not job_id:
                raise BadRequest("error validating job job id is required")
            check_job_id(job_id)
            if not input_given:
                raise BadRequest('"input" is required: the base64 of a zip holding run.sh')
            if slurml:
                raise BadRequest("slurml jobs are not supported by this jobd")
            check_input_zip(spool, app.cfg)
            job = app.store.add(job_id, spool)
        finally:
            spool.discard()
        app.runner.notify()
        head, tail = job_object_parts(job)
        self.send_bytes(201, (head + tail).encode())

    def get_job(self, job_id):
        """GET /api/get/{id}: 404 unknown, 202 not finished, 200 (206 PARTIAL) with Output."""
        job = self.app.store.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise NotFound("job not found")
        if job["status"] not in FINISHED:
            raise NotReady("job not ready")
        self.send_job_with_output(206 if job["status"] == PARTIAL else 200, job)

    def send_job_with_output(self, status, job):
        """The job object with "Output" base64-encoded on the fly from the result file:
        memory stays flat whatever the size of the output."""
        head, tail = (part.encode() for part in job_object_parts(job))
        output, size = self.app.store.open_output(job["id"])
        with output or contextlib.nullcontext():
            encoded = 4 * ((size + 2) // 3)
            self.send_head(status, JSON_TYPE, len(head) + encoded + len(tail))
            self.end_headers()
            if self.command == "HEAD":
                return
            self.wfile.write(head)
            while output:
                block = output.read(3 * 256 * KiB)  # a multiple of 3: no padding inside
                if not block:
                    break
                self.wfile.write(base64.b64encode(block))
            self.wfile.write(tail)


    # -- the resource API -------------------------------------------------------------

    def known_job(self, job_id):
        job = self.app.store.get(job_id) if is_job_id(job_id) else None
        if job is None:
            raise NotFound("job not found")
        return job

    def put_job(self, job_id):
        """PUT /api/jobs/{id} with the zip as the body -> 201, Location, status object."""
        check_job_id(job_id)
        if self.app.store.get(job_id) is not None:
            raise Conflict("job already exists")  # answered before the body is read
        self.accept_zip(job_id)

    def post_job(self):
        """POST /api/jobs with the zip as the body: like PUT, with an id jobd picks."""
        self.accept_zip(uuid.uuid4().hex)

    def accept_zip(self, job_id):
        """Stream the body to the store's spool, validate it like /api/upload, store it."""
        app = self.app
        spool = app.store.spool()
        try:
            body = self.request_body()
            while True:
                chunk = body.read()
                if not chunk:
                    break
                spool.write(chunk)
            check_input_zip(spool, app.cfg)
            job = app.store.add(job_id, spool)
        finally:
            spool.discard()
        app.runner.notify()
        self.send_json(201, status_object(job), headers=[("Location", f"/api/jobs/{job_id}")])

    def job_status(self, job_id):
        """GET /api/jobs/{id}: the status object (never the output)."""
        self.send_json(200, status_object(self.known_job(job_id)))

    def list_jobs(self):
        """GET /api/jobs?status=S&limit=N&cursor=C: newest first, paged by an opaque cursor."""
        statuses = [part.strip().upper() for value in self.query.get("status", [])
                    for part in value.split(",") if part.strip()]
        unknown = [status for status in statuses if status not in STATES]
        if unknown:
            raise BadRequest(f"unknown status {unknown[0]!r}; one of {', '.join(STATES)}")
        try:
            limit = int(self.query.get("limit", ["50"])[-1])
            assert 1 <= limit <= LIST_LIMIT
        except (ValueError, AssertionError):
            raise BadRequest(f"limit must be a number from 1 to {LIST_LIMIT}") from None
        before = 2 ** 63 - 1
        if self.query.get("cursor", [""])[-1]:
            try:
                cursor = self.query["cursor"][-1]
                before = int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
                             .decode().removeprefix("before:"))
            except (ValueError, UnicodeDecodeError, binascii.Error):
                raise BadRequest("invalid cursor") from None
        rows = self.app.store.list_jobs(statuses, before, limit + 1)
        following = None
        if len(rows) > limit:
            marker = f"before:{rows[limit - 1]['seq']}".encode()
            following = base64.urlsafe_b64encode(marker).decode().rstrip("=")
        self.send_json(200, {"Jobs": [status_object(row) for row in rows[:limit]],
                             "Next": following})

    def job_output(self, job_id):
        """GET|HEAD /api/jobs/{id}/output: the result zip, streamed; Range and ETag honoured."""
        job = self.known_job(job_id)
        if job["status"] not in FINISHED:
            self.send_json(202, status_object(job), headers=[("Retry-After", "1")])
            return
        output, size = self.app.store.open_output(job_id)
        if output is None:
            raise NotFound("the job has no output")
        with output:
            etag = f'"{job_id}-{int(job["finished_at"] * 1e6)}-{size}"'
            if etag in self.headers.get("If-None-Match", ""):
                self.send_bytes(304, b"", headers=[("ETag", etag)])
                return
            span = None
            if self.headers.get("If-Range", etag) == etag:
                span = parse_range(self.headers.get("Range"), size)
            first, last = span or (0, size - 1)
            headers = [("ETag", etag), ("Accept-Ranges", "bytes"),
                       ("Content-Disposition", f'attachment; filename="{job_id}.zip"')]
            if span:
                headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
            self.send_head(206 if span else 200, "application/zip", last - first + 1, headers)
            self.end_headers()
            if self.command != "HEAD" and size:
                self.connection.sendfile(output, first, last - first + 1)

    def open_log(self, job, name):
        """(file, size) of a job's stdout/stderr so far: from the job directory while it
        runs, from the result zip once it has ended; (None, 0) when there is none yet."""
        if job["status"] == RUNNING:
            with contextlib.suppress(FileNotFoundError):
                f = open(os.path.join(self.app.store.job_dir(job["id"]), name), "rb")
                return f, os.fstat(f.fileno()).st_size
            job = self.app.store.get(job["id"]) or job  # it may have just ended
        output, _ = self.app.store.open_output(job["id"])
        if job["status"] not in FINISHED or output is None:
            return None, 0
        try:
            archive = zipfile.ZipFile(output)
            entry = archive.getinfo(name)
            return archive.open(entry), entry.file_size
        except (zipfile.BadZipFile, KeyError):
            return None, 0

    def job_log(self, job_id, stream):
        """GET /api/jobs/{id}/logs/stdout|stderr: the text so far; ?follow=1 streams it
        (chunked) until the job ends."""
        job = self.known_job(job_id)
        name = STDOUT_FILE if stream == "stdout" else STDERR_FILE
        follow = self.query.get("follow", ["0"])[-1].lower() in ("1", "true", "yes")
        f, size = self.open_log(job, name) if job["status"] != QUEUED else (None, 0)
        with f or contextlib.nullcontext():
            self.send_head(200, "text/plain; charset=utf-8", None if follow else size,
                           [("Cache-Control", "no-cache")])
            self.end_headers()
            if self.command == "HEAD":
                return
            if not follow:
                if f is not None and size:
                    self.connection.sendfile(f, 0, size)
                return
            self.follow_log(job, name, f)

    def follow_log(self, job, name, f):
        """Send the log as chunks as it grows, until the job has ended and all is sent."""
        try:
            while True:
                if f is None and job["status"] != QUEUED:
                    f, _ = self.open_log(job, name)
                data = f.read(64 * KiB) if f is not None else b""
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    continue
                if job["status"] in FINISHED or self.client_gone(0.1):
                    break
                job = self.app.store.get(job["id"])
                if job is None:
                    break  # deleted meanwhile
            self.wfile.write(b"0\r\n\r\n")
        finally:
            if f is not None:
                f.close()

    def client_gone(self, wait):
        """Wait up to `wait` seconds; True if the client has closed its connection."""
        readable, _, _ = select.select([self.connection], [], [], wait)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def cancel_job(self, job_id):
        """POST /api/jobs/{id}/cancel: a queued job never starts, a running one is stopped."""
        job = self.known_job(job_id)
        if job["status"] in FINISHED and job["status"] != CANCELLED:
            raise Conflict(f"job already finished ({job['status']})")
        self.app.runner.cancel(job_id, wait=self.app.cfg.grace + 2)
        self.send_json(200, status_object(self.known_job(job_id)))

    def delete_job(self, job_id):
        """DELETE /api/jobs/{id}: cancel if needed, then remove the record and every file."""
        self.known_job(job_id)
        self.app.runner.delete(job_id)
        self.send_bytes(204, b"", content_type="text/plain")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # 200 clients connecting at once must not be refused

    def __init__(self, app):
        self.app = app
        if ":" in app.cfg.host:
            self.address_family = socket.AF_INET6
        super().__init__((app.cfg.host, app.cfg.port), Handler)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            self.app.log("connection error", level="error", error=traceback.format_exc())


# ====================================================================================
# Main
# ====================================================================================

class Jobd:
    """What one running daemon holds: its settings, log, store and runner."""

    def __init__(self, cfg, log):
        self.cfg, self.log = cfg, log
        self.started = time.time()
        self.store = Store(cfg.db_file, cfg.data)
        self.runner = Runner(self.store, cfg, log)


def serve(cfg):
    """Run the daemon until SIGTERM or SIGINT; then stop gracefully and return 0."""
    log = Log(cfg.log_format)
    try:
        app = Jobd(cfg, log)
        server = Server(app)
    except (OSError, sqlite3.Error) as e:
        print(f"jobd: cannot start: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    received = []

    def on_signal(signum, frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.runner.start()
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    host, port = server.server_address[:2]
    log(f"listening on http://{host}:{port}", version=__version__, workers=cfg.workers,
        data=app.store.data_dir, db=os.path.abspath(cfg.db_file))
    while not stop.wait(3600):
        pass
    log("stopping", signal=received[0] if received else None, grace=cfg.grace)
    server.shutdown()
    server.server_close()
    app.runner.stop(cfg.grace)
    app.store.close()
    log("stopped")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="jobd", description="Serve jobs (a zip holding run.sh) over HTTP.",
        epilog="Flags win over environment variables, shown in [brackets].")
    parser.add_argument("--version", action="version", version=f"jobd {__version__}")
    server_arguments(parser)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    cfg = load_config(parser.parse_args(argv), os.environ)
    return serve(cfg)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""jobd: a small job daemon for research software.

It accepts a job -- a zip holding `run.sh` plus its inputs -- over HTTP, runs it, and
hands back a zip of the job directory. It is a drop-in replacement for the Go jobd
(rvhonorato/jobd): the same `/api/upload` and `/api/get/{id}` on the wire, without its
crashes, races and memory blow-ups. One module, standard library only.

The module reads top to bottom the way an upload flows:
configuration -> errors -> job ids and zips -> store (SQLite + files) -> runner
(worker threads, subprocesses) -> HTTP -> client CLI -> main.
"""

import argparse
import array
import base64
import binascii
import contextlib
import errno
import functools
import hashlib
import hmac
import http.client
import io
import itertools
import math
import json
import os
import queue
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import socketserver
import sqlite3
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zipfile
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

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


def parse_seconds(text):
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be more than 0 seconds: {text!r}")
    return value


def parse_log_format(text):
    if text not in ("text", "json"):
        raise ValueError(f"must be text or json, not {text!r}")
    return text


def parse_executor(text):
    if text not in ("local", "slurm"):
        raise ValueError(f"must be local or slurm, not {text!r}")
    return text


def parse_http_url(text):
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {text!r}")
    return text


# sbatch options jobd sets itself, or that would break how it follows a job (one job id,
# its output in the job directory, found again by its name) or whose user it runs as:
# neither --slurm-option nor a job may give them. Long name -> short form.
SBATCH_RESERVED = {"chdir": "D", "output": "o", "error": "e", "input": "i", "job-name": "J",
                   "array": "a", "wait": "W", "wrap": None, "parsable": None, "test-only": None,
                   "uid": None, "gid": None, "get-user-env": None, "help": "h", "usage": None,
                   "version": "V"}


def parse_sbatch_option(text):
    """One server-wide sbatch argument as sbatch takes it: --partition=short, --exclusive."""
    if not text.startswith("-") or text in ("-", "--"):
        raise ValueError(f"{text!r} is not an sbatch option (give one argument, e.g. "
                         "--partition=short)")
    if text.startswith("--"):
        name = text[2:].split("=", 1)[0]
    else:
        name = next((long for long, short in SBATCH_RESERVED.items() if short == text[1:2]),
                    None)
    if name in SBATCH_RESERVED:
        raise ValueError(f"{text!r}: jobd sets or forbids --{name} itself")
    return text


def parse_sbatch_names(text):
    """The sbatch options a job may set, by long name: 'partition,time,mem'."""
    names = tuple(name.lstrip("-") for name in re.split(r"[\s,]+", text.strip()) if name)
    for name in names:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ValueError(f"{name!r} is not the long name of an sbatch option")
        if name in SBATCH_RESERVED:
            raise ValueError(f"jobs may not set --{name}: jobd sets or forbids it itself")
    return names


class Setting:
    """One setting: a flag, an environment variable, a default and a parser. `kind` is
    "value", "switch" (a flag without argument) or "list" (a repeatable flag; in the
    environment, separated by spaces or commas, or by `split`)."""

    def __init__(self, name, env, default, parse, help, kind="value", split=None):
        self.name, self.env, self.default, self.parse, self.help = name, env, default, parse, help
        self.kind = kind
        self.split = split or (lambda raw: re.split(r"[\s,]+", raw.strip()))

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")


SETTINGS = [
    Setting("host", "JOBD_HOST", "", str,
            "address to listen on (default: every interface, IPv6 and IPv4)"),
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
    Setting("debug", "DEBUG", False, parse_bool, "keep job directories after the run",
            kind="switch"),
    Setting("max_upload", "JOBD_MAX_UPLOAD", 2 * GiB, parse_size, "largest request body"),
    Setting("max_unpacked", "JOBD_MAX_UNPACKED", 16 * GiB, parse_size,
            "largest total unpacked size of an input zip"),
    Setting("max_entries", "JOBD_MAX_ENTRIES", 100_000, parse_count,
            "most entries in an input zip"),
    Setting("request_timeout", "JOBD_REQUEST_TIMEOUT", 60.0, parse_duration,
            "idle time after which a connection or a stalled upload is dropped"),
    Setting("log_format", "JOBD_LOG_FORMAT", "text", parse_log_format,
            "text (readable) or json (one object a line)"),
    Setting("token_file", "JOBD_TOKEN_FILE", None, str,
            "file holding the API token (instead of JOBD_TOKEN in the environment)"),
    Setting("metrics_public", "JOBD_METRICS_PUBLIC", False, parse_bool,
            "serve /metrics without the token", kind="switch"),
    Setting("timeout", "JOBD_TIMEOUT", None, parse_seconds,
            "time limit of a job that sets none (default: none)"),
    Setting("max_timeout", "JOBD_MAX_TIMEOUT", None, parse_seconds,
            "the longest time limit a job may have"),
    Setting("max_queued", "JOBD_MAX_QUEUED", None, parse_count,
            "most jobs waiting; beyond it uploads get 429"),
    Setting("callback_allow", "JOBD_CALLBACK_ALLOW", (), str,
            "URL prefix completion callbacks may go to (repeatable)", kind="list"),
    Setting("callback_retry", "JOBD_CALLBACK_RETRY", 3600.0, parse_seconds,
            "how long a failing callback is retried"),
    Setting("executor", "JOBD_EXECUTOR", "local", parse_executor,
            "where jobs run: local (here) or slurm (sbatch; DATAPATH must be shared)"),
    Setting("slurm_option", "JOBD_SLURM_OPTIONS", (), parse_sbatch_option,
            "sbatch option for every job, as one argument: --slurm-option=--partition=short "
            "(repeatable; in the environment, split like a shell line)", kind="list",
            split=shlex.split),
    Setting("slurm_job_options", "JOBD_SLURM_JOB_OPTIONS", (), parse_sbatch_names,
            "sbatch options a job may set itself, by name: partition,time,mem (default: none)"),
    Setting("slurm_poll", "JOBD_SLURM_POLL", 1.0, parse_seconds,
            "time between two looks at Slurm (one squeue call for all jobs)"),
    Setting("slurml_url", "SLURML_API_URL", None, parse_http_url,
            "slurml service that \"slurml\": true uploads are forwarded to, as by the Go jobd "
            "(with the token in SLURML_API_TOKEN)"),
    Setting("slurml_poll", "JOBD_SLURML_POLL", 30.0, parse_seconds,
            "time between two questions to the slurml service about a job"),
]


class Config:
    """The validated settings, read once in main() and passed down; never changed after.
    Besides SETTINGS it holds `token`, read from JOBD_TOKEN or --token-file, and
    `slurml_token`, from SLURML_API_TOKEN (secrets are never flags)."""

    def __init__(self, token=None, slurml_token=None, **values):
        object.__setattr__(self, "token", token)
        object.__setattr__(self, "slurml_token", slurml_token)
        for setting in SETTINGS:
            object.__setattr__(self, setting.name, values.get(setting.name, setting.default))

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only")

    @property
    def db_file(self):
        return os.path.join(self.db, "jobd.sqlite3") if os.path.isdir(self.db) else self.db

    def replace(self, **changes):
        """A copy with some settings changed."""
        values = {setting.name: getattr(self, setting.name) for setting in SETTINGS}
        return Config(self.token, self.slurml_token, **dict(values, **changes))


def server_arguments(parser):
    """Add one flag per setting, with the environment variable named in its help."""
    for setting in SETTINGS:
        metavar = {parse_duration: "TIME", parse_seconds: "TIME", parse_size: "SIZE",
                   parse_count: "N", parse_port: "PORT"}.get(setting.parse)
        kind = {"switch": dict(action="store_const", const="true"),
                "list": dict(action="append", metavar="OPTION" if setting.name == "slurm_option"
                             else "PREFIX")}.get(
                    setting.kind, dict(metavar=metavar or setting.name.split("_")[-1].upper()))
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
            if setting.kind == "list":
                items = raw if isinstance(raw, list) else setting.split(raw)
                values[setting.name] = tuple(setting.parse(item) for item in items if item)
            else:
                values[setting.name] = setting.parse(raw)
        except ValueError as e:
            raise SystemExit(f"jobd: {source}: {e}")
    try:
        token = read_token(values.get("token_file"), environ)
    except ValueError as e:
        raise SystemExit(f"jobd: {e}")
    if values.get("executor") == "slurm":
        missing = [name for name in ("sbatch", "squeue", "scancel", "scontrol")
                   if shutil.which(name, path=environ.get("PATH", os.defpath)) is None]
        if missing:
            raise SystemExit(f"jobd: --executor slurm: {', '.join(missing)} not on PATH")
    elif values.get("slurm_option") or values.get("slurm_job_options"):
        raise SystemExit("jobd: --slurm-option and --slurm-job-options need --executor slurm")
    return Config(token=token, slurml_token=environ.get("SLURML_API_TOKEN") or None, **values)


def read_token(token_file, environ):
    """The API token, read the same way by the server and the client: the token file's
    content when one is given, else JOBD_TOKEN; without the white space around it (a file
    or a mounted secret often ends in a newline). None when neither is set; ValueError
    when the file cannot be read or holds nothing."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the token file {token_file}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
        return token
    token = environ.get("JOBD_TOKEN", "")
    if token and not token.strip():
        raise ValueError("JOBD_TOKEN holds only white space")
    return token.strip() or None


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
        self.write(self.line(event, level, **fields))

    def line(self, event, level="info", **fields):
        now = time.time()
        if self.json:
            line = json.dumps({"time": rfc3339(now), "level": level, "event": event, **fields})
        else:
            parts = [rfc3339(now, 3), event if level == "info" else f"{level.upper()} {event}"]
            parts += [f"{k}={format_log_value(v)}" for k, v in fields.items() if v is not None]
            line = " ".join(parts)
        return line + "\n"

    def write(self, lines):
        with self.lock:
            try:
                self.stream.write(lines)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not take the daemon down


NEEDS_QUOTES = re.compile(r'[\s"=]')


def format_log_value(value):
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    return json.dumps(text) if (not text or NEEDS_QUOTES.search(text)) else text


@functools.lru_cache(maxsize=4)
def utc_second(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def rfc3339(timestamp, digits=6):
    """RFC 3339 in UTC with a Z, as Go's time.Time marshals (micro- instead of nanoseconds)."""
    seconds = int(timestamp)
    fraction = int((timestamp - seconds) * 10 ** digits)
    return f"{utc_second(seconds)}.{fraction:0{digits}d}Z"


class Metrics:
    """Counters since start, for GET /metrics (Prometheus text format)."""

    BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}                       # HTTP status code -> count
        self.bytes_in = self.bytes_out = 0
        self.duration_buckets = [0] * len(self.BUCKETS)
        self.duration_sum = 0.0
        self.duration_count = 0

    def request(self, status, received, sent):
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.bytes_in += received
            self.bytes_out += sent

    def job_finished(self, seconds):
        with self.lock:
            for i, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    self.duration_buckets[i] += 1
            self.duration_sum += seconds
            self.duration_count += 1

    def render(self, counts, uptime):
        """The exposition text; `counts` maps each job state to its number of jobs."""
        lines = []

        def metric(name, kind, help, samples):
            lines.extend([f"# HELP jobd_{name} {help}", f"# TYPE jobd_{name} {kind}"])
            lines.extend(f"jobd_{name}{labels} {value}" for labels, value in samples)

        with self.lock:
            metric("info", "gauge", "Version of this jobd.", [(f'{{version="{__version__}"}}', 1)])
            metric("uptime_seconds", "gauge", "Seconds since jobd started.", [("", round(uptime, 3))])
            metric("jobs", "gauge", "Jobs in the store, by state.",
                   [(f'{{state="{state}"}}', counts.get(state, 0)) for state in STATES])
            metric("queue_depth", "gauge", "Jobs waiting to run.", [("", counts.get(QUEUED, 0))])
            metric("running_jobs", "gauge", "Jobs running now (in Slurm too).",
                   [("", counts.get(RUNNING, 0))])
            buckets = [(f'{{le="{bound:g}"}}', n)
                       for bound, n in zip(self.BUCKETS, self.duration_buckets)]
            metric("job_duration_seconds", "histogram", "Run time of finished jobs.",
                   [(labels.replace("{", "_bucket{", 1), n) for labels, n in buckets] +
                   [('_bucket{le="+Inf"}', self.duration_count),
                    ("_sum", round(self.duration_sum, 6)), ("_count", self.duration_count)])
            metric("http_received_bytes_total", "counter", "Bytes of request bodies read.",
                   [("", self.bytes_in)])
            metric("http_sent_bytes_total", "counter", "Bytes of response bodies sent.",
                   [("", self.bytes_out)])
            metric("http_requests_total", "counter", "HTTP requests answered, by status code.",
                   [(f'{{code="{code}"}}', n) for code, n in sorted(self.requests.items())])
        return "\n".join(lines) + "\n"


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


# Words the client reads in jobd's answers to choose its exit code: one definition for both.
JOB_NOT_FOUND = "job not found"             # a 404 about a job (Go's words)
NO_SUCH_ENDPOINT = "no such endpoint"       # a 404 about the path: an older jobd, or not jobd
ALREADY_FINISHED = "job already finished"   # a 409 to a cancel
JOB_TIMED_OUT = "job timed out"             # the start of a timed-out job's Message


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


def zip_entries(zf, max_entries=math.inf, max_unpacked=math.inf):
    """Check a zip's directory against every rule; yield (info, parts) for each entry."""
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise BadRequest(f"the zip has {len(infos)} entries; at most {max_entries} are allowed")
    unpacked, files, folders = 0, set(), set()
    for info in infos:
        if "\0" in info.orig_filename:  # zipfile cuts .filename at a NUL, hiding it
            raise BadRequest(f"unsafe path in zip: {info.orig_filename!r}")
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
        if unpacked > max_unpacked:
            raise BadRequest(f"the zip unpacks to more than {max_unpacked} bytes "
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
            entries = list(zip_entries(zf, cfg.max_entries, cfg.max_unpacked))
            if not any(parts == [RUN_SH] and not info.is_dir() for info, parts in entries):
                raise BadRequest("the zip has no run.sh at its top level")
            for info, _ in entries:
                if not info.is_dir():
                    with zf.open(info) as data:
                        size = sum(len(block) for block in iter(lambda: data.read(CHUNK), b""))
                    if size != info.file_size:  # zipfile does not check this itself
                        raise BadRequest(f"zip entry {info.filename!r} holds {size} bytes, "
                                         f"not the {info.file_size} it declares")
            return sum(info.file_size for info, _ in entries)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError,
            NotImplementedError, RuntimeError, ValueError, OSError) as e:
        raise BadRequest(f"input is not a readable zip file: {e}")


def extract_input_zip(source, job_dir, cfg):
    """Unpack a checked input zip into job_dir; never writes outside it, never follows links."""
    made = {job_dir}
    with zipfile.ZipFile(source) as zf:
        for info, parts in zip_entries(zf, cfg.max_entries, cfg.max_unpacked):
            target = os.path.join(job_dir, *parts)
            folder = target if info.is_dir() else os.path.dirname(target)
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            if info.is_dir():
                continue
            mode = ((info.external_attr >> 16) & 0o777) | 0o600
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with zf.open(info) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    os.chmod(os.path.join(job_dir, RUN_SH), 0o775)


def compression_for(f, size):
    """Deflate like Go, but store data that does not compress (deflating it only costs
    time); f is the file, open."""
    if size < MiB:
        return zipfile.ZIP_DEFLATED, 6
    samples = [os.pread(f.fileno(), 128 * KiB, offset)  # at its start, middle and end
               for offset in (0, size // 2, max(0, size - 128 * KiB))]
    if all(len(zlib.compress(sample, 1)) > 0.95 * len(sample) for sample in samples):
        return zipfile.ZIP_STORED, None
    return zipfile.ZIP_DEFLATED, 6 if size <= 16 * MiB else 1


def write_result_zip(job_dir, dest, leave_out=()):
    """Zip the whole job directory into dest (a Spool), streaming file by file.

    Symbolic links are left out: following them could pack files from outside the job;
    so are the top-level files named in `leave_out` (jobd's own). A result of a few small
    files, like most jobs', is built in one piece instead (small_zip).
    """
    entries = result_entries(job_dir, leave_out)
    first = list(itertools.islice(entries, SMALL_ZIP_ENTRIES + 1))
    size = sum(st.st_size for _, _, st in first if stat.S_ISREG(st.st_mode))
    if len(first) <= SMALL_ZIP_ENTRIES and size <= SMALL_ZIP:
        dest.write(small_zip(first))
        return
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, allowZip64=True,
                         strict_timestamps=False) as zf:
        for path, name, st in itertools.chain(first, entries):
            try:
                if stat.S_ISDIR(st.st_mode):
                    zf.write(path, name)
                else:
                    with open(open_job_file(path), "rb") as src:
                        add_file(zf, src, path, name, st.st_size)
            except (OSError, OverflowError):  # unreadable, vanished, or a time out of range
                continue  # the rest of the results still count


def result_entries(job_dir, leave_out):
    """(path, name in the zip, lstat) of each folder and regular file in job_dir, in order."""
    for root, folders, files in os.walk(job_dir):
        folders[:] = sorted(d for d in folders if not os.path.islink(os.path.join(root, d)))
        relative = zip_name(os.path.relpath(root, job_dir))
        if relative != ".":
            try:
                st = os.lstat(root)
            except OSError:
                pass
            else:
                yield root, relative + "/", st
        for name in sorted(files):
            if relative == "." and name in leave_out:
                continue
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield path, zip_name(name if relative == "." else f"{relative}/{name}"), st


# At most this much, in this many files and folders, is zipped in one piece: well below
# the 1 MiB under which compression_for() always deflates.
SMALL_ZIP, SMALL_ZIP_ENTRIES = 64 * KiB, 64
LOCAL_HEADER, CENTRAL_HEADER, END_RECORD = "<4s2B4HL2L2H", "<4s4B4HL2L5H2L", "<4s4H2LH"
ZIP_VERSION, MADE_ON_UNIX, UTF8_NAME = 20, 3, 0x800  # version 2.0 is deflate's


def small_zip(entries):
    """The zip of a few small files and folders, built in memory: byte for byte what
    zipfile writes, without its costly machinery per entry (see README, Performance)."""
    body, central, count = bytearray(), bytearray(), 0
    for path, name, st in entries:
        folder = stat.S_ISDIR(st.st_mode)
        try:
            dos_time, dos_date = dos_timestamp(st.st_mtime)
            data = b""
            if st.st_size and not folder:
                with open(open_job_file(path), "rb", buffering=0) as f:
                    data = f.read(st.st_size)
        except (OSError, OverflowError):  # as in write_result_zip: the rest still counts
            continue
        attr = (st.st_mode & 0xFFFF) << 16 | (0x10 if folder else 0)  # 0x10: MS-DOS folder
        if folder:
            method, packed = zipfile.ZIP_STORED, b""
        else:
            deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
            method, packed = zipfile.ZIP_DEFLATED, deflate.compress(data) + deflate.flush()
        try:
            encoded, flags = name.encode("ascii"), 0
        except UnicodeEncodeError:
            encoded, flags = name.encode("utf-8"), UTF8_NAME
        crc = zlib.crc32(data)
        central += struct.pack(CENTRAL_HEADER, b"PK\1\2", ZIP_VERSION, MADE_ON_UNIX, ZIP_VERSION,
                               0, flags, method, dos_time, dos_date, crc, len(packed), len(data),
                               len(encoded), 0, 0, 0, 0, attr, len(body))
        central += encoded
        body += struct.pack(LOCAL_HEADER, b"PK\3\4", ZIP_VERSION, 0, flags, method, dos_time,
                            dos_date, crc, len(packed), len(data), len(encoded), 0)
        body += encoded
        body += packed
        count += 1
    end = struct.pack(END_RECORD, b"PK\5\6", 0, 0, count, count, len(central), len(body), 0)
    return bytes(body + central + end)


def dos_timestamp(mtime):
    """A file time as a zip holds it (local time, 2 s steps, 1980 to 2107), as zipfile
    writes it with strict_timestamps=False."""
    year, month, day, hour, minute, second = time.localtime(mtime)[:6]
    if year < 1980:
        year, month, day, hour, minute, second = 1980, 1, 1, 0, 0, 0
    elif year > 2107:
        year, month, day, hour, minute, second = 2107, 12, 31, 23, 59, 59
    return hour << 11 | minute << 5 | second // 2, (year - 1980) << 9 | month << 5 | day


def open_job_file(path):
    """Open a file of a job's to read it into the result. Should it have been replaced
    since it was listed (a process of the job's may outlive it by a second), neither
    follow a link nor wait for a writer of a pipe."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)


def add_file(zf, src, path, arcname, size):
    """Add one file, open as src, to a zip being written, compressed as compression_for()
    says, in steps of up to CHUNK (zf.write() copies 8 KiB at a time: a third of the CPU
    time)."""
    info = zipfile.ZipInfo.from_file(path, arcname, strict_timestamps=False)
    info.compress_type, level = compression_for(src, size)
    # the level travels in the ZipInfo; its attribute is public since 3.13
    setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel",
            level)
    with zf.open(info, "w") as dst:
        shutil.copyfileobj(src, dst, min(CHUNK, size + 1))


def zip_name(name):
    """A file name as a zip can hold it: bytes that are not UTF-8 (Linux names are
    bytes) become U+FFFD; zipfile would raise on them."""
    return os.fsencode(name).decode("utf-8", "replace")


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
        self.in_memory = True

    def write(self, data):
        if self.in_memory and self.f.tell() + len(data) > self.limit:
            spilled = open(self.path, "w+b")
            spilled.write(self.f.getbuffer())
            spilled.seek(self.f.tell())
            self.f, self.in_memory = spilled, False
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

    @property
    def file(self):
        """The file underneath, for a reader that seeks and reads often: zipfile checking
        a small zip through Spool's own read/seek/tell takes half as long again."""
        return self.f

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


# ioctls of ext2/3/4 file attributes (linux/fs.h): _IOR/_IOW('f', n, long), in the layout
# most Linux ports share (x86, ARM, RISC-V; elsewhere the ioctl fails and nothing happens)
FS_IOC_GETFLAGS = 2 << 30 | struct.calcsize("l") << 16 | ord("f") << 8 | 1
FS_IOC_SETFLAGS = 1 << 30 | struct.calcsize("l") << 16 | ord("f") << 8 | 2
FS_TOPDIR_FL = 0x00020000  # chattr +T: "the top of a directory hierarchy"


def spread_folders(path):
    """Give a directory ext2/3/4's T attribute (chattr +T), so that the folders made in
    it are spread over the disk's block groups instead of packed into its own. On file
    systems without such attributes, or a directory jobd does not own, nothing happens.

    jobd makes a folder and three files for every job and deletes them after. Packed
    into one block group, that churn is slow on ext4 without a journal: its inode
    allocator steps over every inode freed there in the last minutes, one at a time.
    Measured on such a disk, bursts of 200 jobs ran at 270 jobs/s with the attribute
    against 195 without (medians of 6, alternated)."""
    try:
        import fcntl  # POSIX only: jobd.py still runs as a client elsewhere
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (ImportError, OSError):
        return
    with contextlib.suppress(OSError):
        flags = array.array("i", [0])  # the kernel reads and writes an int
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & FS_TOPDIR_FL:
            flags[0] |= FS_TOPDIR_FL
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags, True)
    os.close(fd)


def seek_within(f, size, skip):
    """Move a file of `size` bytes `skip` bytes on, but never past its end (a log may be
    followed from beyond what it holds yet); the bytes still to leave out."""
    f.seek(min(skip, size))
    return skip - min(skip, size)


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
    # Completion callbacks still to deliver; written in the same transaction as the end
    # of the job, so a restart never loses one.
    """CREATE TABLE IF NOT EXISTS callbacks (
        job_id TEXT PRIMARY KEY, url TEXT NOT NULL, body BLOB, attempts INTEGER NOT NULL,
        next_at REAL NOT NULL, give_up_at REAL NOT NULL)""",
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
    ("timeout", "REAL"),        # seconds, None for no limit
    ("callback", "TEXT"),       # URL to POST the status object to when the job ends
    # job-orchestrator client protocol: submitted through POST /submit, and refused there
    ("orchestrator", "INTEGER NOT NULL DEFAULT 0"),
    ("refused", "INTEGER NOT NULL DEFAULT 0"),
    ("slurm_options", "TEXT"),  # the job's own sbatch options, a JSON object
    ("submit_tag", "TEXT"),     # Slurm job name, recorded before sbatch runs (see Slurm)
]
INDEXES = ["CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq)",
           # the claim skips jobs waiting in Slurm's queue, however many there are
           "CREATE INDEX IF NOT EXISTS jobs_to_claim ON jobs (status, slurml, slurm_id, seq)"]

SQL_GET = "SELECT * FROM jobs WHERE id = ?"
SQL_GET_MANY = "SELECT * FROM jobs WHERE id IN ({marks})"
SQL_TAKEN = "SELECT id FROM jobs WHERE id IN ({marks})"
SQL_INSERT = """INSERT INTO jobs (id, status, created_at, updated_at, input_bytes, slurml,
                                  timeout, callback, slurm_options)
                VALUES (?, 'QUEUED', ?, ?, ?, ?, ?, ?, ?)"""
SQL_COUNT_QUEUED = "SELECT COUNT(*) FROM jobs WHERE status = 'QUEUED'"
SQL_COUNT_BY_STATUS = "SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"
# A QUEUED job with a slurm_id waits in Slurm's queue, not in jobd's: never claimed again.
SQL_NEXT_QUEUED = """SELECT id FROM jobs WHERE status = 'QUEUED' AND slurml = ? AND slurm_id = 0
                     ORDER BY seq LIMIT 1"""
SQL_CLAIM = """UPDATE jobs SET status = 'RUNNING', started_at = ?, updated_at = ?,
               attempts = attempts + 1, pgid = NULL
               WHERE id = ? AND status = 'QUEUED' AND slurm_id = 0"""
# One statement where SQLite has RETURNING (3.35, 2021): atomic on its own.
SQL_CLAIM_NEXT = """UPDATE jobs SET status = 'RUNNING', started_at = ?, updated_at = ?,
                    attempts = attempts + 1, pgid = NULL
                    WHERE seq = (SELECT seq FROM jobs WHERE status = 'QUEUED' AND slurml = ?
                                 AND slurm_id = 0 ORDER BY seq LIMIT 1)
                    RETURNING *"""
HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
SQL_SET_PGID = "UPDATE jobs SET pgid = ? WHERE id = ?"
SQL_FINISH = """UPDATE jobs SET status = ?, message = ?, exit_code = ?, output_bytes = ?,
                finished_at = ?, updated_at = ?, pgid = NULL
                WHERE id = ? AND status = ? AND slurm_id = ?"""
SQL_REQUEUE = """UPDATE jobs SET status = 'QUEUED', updated_at = ?, pgid = NULL, submit_tag = NULL,
                 attempts = attempts - ? WHERE id = ? AND status = 'RUNNING' AND slurm_id = 0"""
SQL_SET_SUBMIT_TAG = """UPDATE jobs SET submit_tag = ?
                        WHERE id = ? AND status = 'RUNNING' AND slurm_id = 0"""
SQL_TRACK = """UPDATE jobs SET slurm_id = ?, status = ?, message = ?, updated_at = ?,
               started_at = COALESCE(?, started_at)
               WHERE id = ? AND slurm_id = ? AND status IN ('QUEUED', 'RUNNING')"""
SQL_SLURM_JOBS = """SELECT * FROM jobs WHERE slurml = 0 AND status IN ('QUEUED', 'RUNNING')
                    AND (slurm_id > 0 OR submit_tag IS NOT NULL) ORDER BY seq"""
SQL_SLURML_JOBS = """SELECT * FROM jobs WHERE slurml = 1 AND status = 'RUNNING' AND slurm_id > 0
                     ORDER BY seq"""
SQL_RUNNING = "SELECT * FROM jobs WHERE status = 'RUNNING' ORDER BY seq"
SQL_EXPIRED = f"""SELECT id FROM jobs WHERE status IN {FINISHED!r} AND finished_at < ?"""
SQL_DELETE = "DELETE FROM jobs WHERE id = ?"
SQL_LIST = "SELECT * FROM jobs WHERE seq < ? {filter} ORDER BY seq DESC LIMIT ?"
SQL_ALL_IDS = "SELECT id FROM jobs"
SQL_ADD_CALLBACK = """INSERT OR REPLACE INTO callbacks (job_id, url, attempts, next_at, give_up_at)
                      SELECT id, callback, 0, ?, ? FROM jobs
                      WHERE id = ? AND callback IS NOT NULL"""
SQL_DUE_CALLBACKS = "SELECT * FROM callbacks WHERE next_at <= ? ORDER BY next_at LIMIT 50"
SQL_SET_CALLBACK_BODY = "UPDATE callbacks SET body = ? WHERE job_id = ?"
SQL_RETRY_CALLBACK = "UPDATE callbacks SET attempts = attempts + 1, next_at = ? WHERE job_id = ?"
SQL_DELETE_CALLBACK = "DELETE FROM callbacks WHERE job_id = ?"
SQL_PUT_PAYLOAD = "INSERT OR REPLACE INTO payloads (job_id, kind, data) VALUES (?, ?, ?)"
SQL_GET_PAYLOAD = "SELECT data FROM payloads WHERE job_id = ? AND kind = ?"
SQL_DELETE_PAYLOADS = "DELETE FROM payloads WHERE job_id = ?"
SQL_ORPHAN_PAYLOADS = "DELETE FROM payloads WHERE job_id NOT IN (SELECT id FROM jobs)"
SQL_GET_META = "SELECT value FROM meta WHERE key = ?"
SQL_PUT_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
SQL_PIN_META = "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)"
SQL_ID_TAKEN = "SELECT 1 FROM jobs WHERE id = ?"
SQL_MARK_ORCHESTRATOR = "UPDATE jobs SET orchestrator = 1 WHERE id = ?"
SQL_INSERT_REFUSED = """INSERT INTO jobs (id, status, message, created_at, finished_at,
                        updated_at, orchestrator, refused)
                        VALUES (?, 'FAILED', ?, ?, ?, ?, 1, 1)"""

# Ids of the job-orchestrator client protocol: u32 numbers never issued twice, even by a
# store created after the previous one was wiped (the orchestrator still holds its ids).
# All a new store shares with a wiped one is the clock, so no id is issued before its
# second has come (id <= seconds since 2025-01-01) and a new store starts above the second
# it was created in. The ids of the seconds since then stay available, so a burst after
# idle time is answered at once; more than one submission a second for longer waits for
# the clock. Ids run out in 2161. A clock set back by more than ORCH_ID_MAX_WAIT is not
# waited for: ids then stay unique within the store, as ever.
ORCH_ID_EPOCH = 1735689600  # 2025-01-01T00:00:00Z
ORCH_ID_MAX = 2 ** 32 - 1
ORCH_ID_MAX_WAIT = 300
ORCH_LAST_ID = "orchestrator_last_id"  # meta key: the highest id issued so far


def orchestrator_id_clock():
    """Seconds since 2025-01-01: the highest orchestrator id that may be issued now."""
    return int(time.time()) - ORCH_ID_EPOCH


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

    def __init__(self, db_file, data_dir, max_queued=None, callback_retry=3600.0, log=None):
        self.db_file = db_file
        self.max_queued, self.callback_retry = max_queued, callback_retry
        self.data_dir = os.path.abspath(data_dir)
        self.state_dir = os.path.join(self.data_dir, ".jobd")
        self.dirs = {name: os.path.join(self.state_dir, name)
                     for name in ("input", "output", "tmp", "trash")}
        os.makedirs(self.data_dir, exist_ok=True)
        spread_folders(self.data_dir)  # before any folder is made in it
        for path in self.dirs.values():
            os.makedirs(path, exist_ok=True)
        parent = os.path.dirname(os.path.abspath(db_file))
        os.makedirs(parent, exist_ok=True)
        self._idle = []
        self._queue_lock = threading.Lock()   # guards the two fields below
        self._waiting = []                    # groups of uploads waiting for a commit
        self._committing = False              # whether some thread is leading commits
        self._durable = self._connect()       # the leader's connection, synchronous=FULL
        self._durable.execute("PRAGMA synchronous = FULL")
        self._spool_prefix, self._spools = uuid.uuid4().hex[:12], itertools.count()
        self._trash_added = threading.Event()
        self.callback_added = threading.Event()  # set when a finished job queued a callback
        self.log = log or (lambda event, **fields: None)
        threading.Thread(target=self._empty_trash, name="trash", daemon=True).start()
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
            # A new store: orchestrator ids start above any a wiped store issued (ORCH_ID_EPOCH).
            db.execute(SQL_PIN_META, (ORCH_LAST_ID, str(orchestrator_id_clock())))

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
        return Spool(os.path.join(self.dirs["tmp"], f"{self._spool_prefix}-{next(self._spools)}"))

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
        """Remove a file or a whole directory. A directory is renamed into the trash at
        once (so a process still writing by relative path never writes into a new
        directory of that name) and deleted by a background thread, off the job's path."""
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                os.rename(path, os.path.join(self.dirs["trash"], uuid.uuid4().hex))
                self._trash_added.set()
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _empty_trash(self):
        """Delete what discard() moved to the trash; first kill any process still working
        in there: one a job started that left the job's process group (setsid) and so
        outlived its end. A pass every 0.2 s at most, so one /proc scan serves many jobs."""
        while True:
            self._trash_added.wait()
            time.sleep(0.2)
            self._trash_added.clear()
            killed = kill_leftovers(None, self.dirs["trash"])
            if killed:
                self.log("job leftovers killed", processes=killed,
                         reason="still working in a finished job's directory")
            for name in os.listdir(self.dirs["trash"]):
                shutil.rmtree(os.path.join(self.dirs["trash"], name), ignore_errors=True)

    # -- the life of a job ---------------------------------------------------------------

    def add(self, job_id, spool, slurml=False, timeout=None, callback=None, slurm_options=None):
        """Accept a job whose input zip is in `spool`: durable when this returns.

        Raises Conflict when the id exists, TooManyRequests when --max-queued jobs are
        waiting. The checks and the insert are one transaction, so of racing uploads
        exactly one wins.
        """
        upload = self.upload(job_id, spool, slurml, timeout, callback, slurm_options)
        self.add_all([upload])
        if upload["error"] is not None:
            raise upload["error"]
        return upload["job"]

    @staticmethod
    def upload(job_id, spool, slurml=False, timeout=None, callback=None, slurm_options=None):
        """An upload for add_all(), which sets its "job" (the new row) or its "error"."""
        return {"id": job_id, "spool": spool, "error": None,
                "row": (int(slurml), timeout, callback, slurm_options)}

    def add_all(self, uploads):
        """Accept several uploads (from upload()); each gets its "job" or its "error".

        Uploads arriving together share one transaction and its fsync (group commit): the
        first group waiting leads, commits every group waiting, wakes them, and hands the
        lead to the next group that came meanwhile.
        """
        for upload in uploads:
            if not upload["spool"].in_memory:
                upload["spool"].durable_file()  # a large input's fsync happens outside the queue
        group = {"uploads": uploads, "lead": False, "event": threading.Event()}
        with self._queue_lock:
            self._waiting.append(group)
            group["lead"] = not self._committing
            self._committing = True
        if not group["lead"]:
            group["event"].wait()  # set when committed, or when handed the lead
        if group["lead"]:
            with self._queue_lock:  # about 500 uploads: SQLite takes 999 parameters at least
                count = total = 0
                for waiting in self._waiting:
                    total += len(waiting["uploads"])
                    if count and total > 500:
                        break
                    count += 1
                batch, self._waiting = self._waiting[:count], self._waiting[count:]
            self._commit([upload for g in batch for upload in g["uploads"]])
            for g in batch:
                g["lead"] = False
                g["event"].set()
            with self._queue_lock:
                if self._waiting:
                    self._waiting[0]["lead"] = True
                    self._waiting[0]["event"].set()
                else:
                    self._committing = False

    def _commit(self, batch):
        """One durable transaction for a batch of uploads: a handful of statements, however
        many uploads it holds (each statement is a round trip for the GIL)."""
        now = time.time()
        try:
            with self._write(self._durable) as db:
                marks = ",".join("?" * len(batch))
                taken = {row[0] for row in db.execute(SQL_TAKEN.format(marks=marks),
                                                      [entry["id"] for entry in batch])}
                room = (self.max_queued - db.execute(SQL_COUNT_QUEUED).fetchone()[0]
                        if self.max_queued else len(batch))
                accepted, moved = [], False
                for entry in batch:
                    if entry["id"] in taken:
                        entry["error"] = Conflict("job already exists")
                    elif room <= 0:
                        entry["error"] = TooManyRequests(
                            f"the queue is full ({self.max_queued} jobs waiting); try again "
                            "later", **{"Retry-After": "5"})
                    else:
                        taken.add(entry["id"])
                        room -= 1
                        accepted.append(entry)
                        entry["size"] = entry["spool"].size  # before its file is moved
                        if not entry["spool"].in_memory:
                            os.replace(entry["spool"].path, self.input_zip(entry["id"]))
                            moved = True
                db.executemany(SQL_INSERT, [(entry["id"], now, now, entry["size"]) + entry["row"]
                                            for entry in accepted])
                db.executemany(SQL_PUT_PAYLOAD, [(entry["id"], "input", entry["spool"].getvalue())
                                                 for entry in accepted if entry["spool"].in_memory])
                marks = ",".join("?" * len(accepted))
                rows = {row["id"]: row for row in db.execute(
                    SQL_GET_MANY.format(marks=marks), [entry["id"] for entry in accepted])}
                for entry in accepted:
                    entry["job"] = rows[entry["id"]]
                if moved:
                    fsync_path(self.dirs["input"], directory=True)
        except Exception as e:
            for entry in batch:
                entry["error"] = entry["error"] or e

    def get(self, job_id):
        with self._db() as db:
            return db.execute(SQL_GET, (job_id,)).fetchone()

    def claim_next(self, slurml=False):
        """Move the oldest job in jobd's queue (of slurml jobs, or of the others) to
        RUNNING and return it, or None. Atomic."""
        now = time.time()
        with self._db() as db:
            if db.execute(SQL_NEXT_QUEUED, (int(slurml),)).fetchone() is None:
                return None  # the common idle case needs no write lock
            if HAS_RETURNING:
                rows = db.execute(SQL_CLAIM_NEXT, (now, now, int(slurml))).fetchall()
                return rows[0] if rows else None
        with self._write() as db:
            row = db.execute(SQL_NEXT_QUEUED, (int(slurml),)).fetchone()
            if row is None:
                return None
            db.execute(SQL_CLAIM, (now, now, row["id"]))
        return self.get(row["id"])

    def set_pgid(self, job_id, pgid):
        with self._db() as db:  # one statement: its own transaction
            db.execute(SQL_SET_PGID, (pgid, job_id))

    def finish(self, job_id, status, message, exit_code=None, output=None, was=RUNNING,
               slurm_id=0):
        """Record the end of a job that is in state `was` (and has that Slurm id), with its
        result zip (a Spool); False if the job was not in that state."""
        size = output.size if output is not None else None
        self._place(output, job_id, "output")
        now = time.time()
        with self._write() as db:
            cursor = db.execute(SQL_FINISH, (status, message, exit_code, size,
                                             now, now, job_id, was, slurm_id))
            if cursor.rowcount == 1 and output is not None and output.in_memory:
                db.execute(SQL_PUT_PAYLOAD, (job_id, "output", output.getvalue()))
            added = cursor.rowcount == 1 and db.execute(
                SQL_ADD_CALLBACK, (now, now + self.callback_retry, job_id)).rowcount == 1
        if added:
            self.callback_added.set()
        if cursor.rowcount == 0 and output is not None and not output.in_memory:
            self.discard(self.output_zip(job_id))  # the job was deleted meanwhile
        return cursor.rowcount == 1

    def requeue(self, job_id, count_attempt):
        """Put a running job back in the queue (jobd is stopping or restarting, or Slurm
        never got it); never one that Slurm has."""
        with self._write() as db:
            db.execute(SQL_REQUEUE, (time.time(), 0 if count_attempt else 1, job_id))

    def set_submit_tag(self, job_id, tag):
        """Record, before sbatch runs, the name the job will have in Slurm."""
        with self._write() as db:
            db.execute(SQL_SET_SUBMIT_TAG, (tag, job_id))

    def track(self, job_id, slurm_id, status, message, was_slurm_id, started_at=None):
        """Record what Slurm (or slurml) says of a job in flight: its id there, QUEUED or
        RUNNING, a message; False if the job has ended or changed hands meanwhile."""
        now = time.time()
        with self._write() as db:
            cursor = db.execute(SQL_TRACK, (slurm_id, status, message, now, started_at,
                                            job_id, was_slurm_id))
        return cursor.rowcount == 1

    def slurm_jobs(self):
        """Jobs Slurm has, or may have (a submit tag without an id yet)."""
        with self._db() as db:
            return db.execute(SQL_SLURM_JOBS).fetchall()

    def slurml_jobs(self):
        """Jobs forwarded to slurml and not yet ended."""
        with self._db() as db:
            return db.execute(SQL_SLURML_JOBS).fetchall()

    def list_jobs(self, statuses, before, limit):
        """Jobs newest first, older than sequence number `before`, optionally by status."""
        where = f"AND status IN ({','.join('?' * len(statuses))})" if statuses else ""
        with self._db() as db:
            return db.execute(SQL_LIST.format(filter=where),
                              (before, *statuses, limit)).fetchall()

    def counts(self):
        """{status: number of jobs}."""
        with self._db() as db:
            return {row["status"]: row["n"] for row in db.execute(SQL_COUNT_BY_STATUS)}

    def check_database(self):
        """Raise sqlite3.Error if the database cannot be written within 2 seconds."""
        db = sqlite3.connect(self.db_file, timeout=2, isolation_level=None)
        try:
            with self._write(db):
                db.execute("DELETE FROM meta WHERE key = 'health'")
        finally:
            db.close()

    def check_data_dir(self):
        """Raise OSError if the data directory cannot be written: where payloads are
        spooled, and where job directories are made."""
        probe = os.path.join(self.dirs["tmp"], "health-" + uuid.uuid4().hex)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
        folder = os.path.join(self.data_dir, ".health-" + uuid.uuid4().hex)
        os.mkdir(folder)
        os.rmdir(folder)

    def due_callbacks(self, now):
        with self._db() as db:
            return db.execute(SQL_DUE_CALLBACKS, (now,)).fetchall()

    def callback_body(self, job_id, body):
        with self._write() as db:
            db.execute(SQL_SET_CALLBACK_BODY, (body, job_id))

    def callback_done(self, job_id, retry_at=None):
        """Forget a delivered (or abandoned) callback, or schedule its next attempt."""
        with self._write() as db:
            if retry_at is None:
                db.execute(SQL_DELETE_CALLBACK, (job_id,))
            else:
                db.execute(SQL_RETRY_CALLBACK, (retry_at, job_id))

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
            db.execute(SQL_DELETE_CALLBACK, (job_id,))
        for path in (self.input_zip(job_id), self.output_zip(job_id), self.job_dir(job_id)):
            self.discard(path)

    # -- the job-orchestrator client protocol --------------------------------------------

    def last_orchestrator_id(self):
        """The highest orchestrator id issued; those up to its creation count as issued
        by the store a new one replaces (see ORCH_ID_EPOCH)."""
        with self._db() as db:
            row = db.execute(SQL_GET_META, (ORCH_LAST_ID,)).fetchone()
        return int(row["value"]) if row else orchestrator_id_clock()

    def issue_orchestrator_id(self):
        """A new orchestrator id, skipping numbers taken as job ids through another API.
        Waits (up to ORCH_ID_MAX_WAIT) while the next id is ahead of the clock."""
        while True:
            with self._write() as db:
                db.execute(SQL_PIN_META, (ORCH_LAST_ID, str(orchestrator_id_clock())))
                number = int(db.execute(SQL_GET_META, (ORCH_LAST_ID,)).fetchone()["value"]) + 1
                while db.execute(SQL_ID_TAKEN, (str(number),)).fetchone():
                    number += 1
                ahead = number - orchestrator_id_clock()
                if ahead <= 0 or ahead > ORCH_ID_MAX_WAIT:
                    if number > ORCH_ID_MAX:
                        raise JobdError("no job-orchestrator ids are left (u32)")
                    db.execute(SQL_PUT_META, (ORCH_LAST_ID, str(number)))
                    return number
            time.sleep(max(0.001, ORCH_ID_EPOCH + number - time.time()))

    @contextlib.contextmanager
    def _durable_write(self):
        """A write transaction committed with synchronous=FULL, like add()'s."""
        with self._db() as db:
            db.execute("PRAGMA synchronous = FULL")
            try:
                with self._write(db):
                    yield db
            finally:
                db.execute("PRAGMA synchronous = NORMAL")

    def mark_orchestrator(self, job_id):
        """Record, durably, that an accepted job came through the orchestrator protocol."""
        with self._durable_write() as db:
            db.execute(SQL_MARK_ORCHESTRATOR, (job_id,))

    def add_refused(self, job_id, message):
        """Record, durably, an orchestrator submission that was refused (it answers
        Invalid until retention removes it); Conflict when the id exists."""
        now = time.time()
        try:
            with self._durable_write() as db:
                db.execute(SQL_INSERT_REFUSED, (job_id, message, now, now, now))
        except sqlite3.IntegrityError:
            raise Conflict("job already exists") from None

    def check(self):
        """Raise sqlite3.Error unless the database file can be opened and read now."""
        db = sqlite3.connect(f"file:{quote(os.path.abspath(self.db_file))}?mode=rw",
                             uri=True, timeout=5)
        try:
            db.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        finally:
            db.close()

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

SECRETS = ("JOBD_TOKEN", "SLURML_API_TOKEN")  # jobd's own; a job has no use for them


def job_environment():
    """The environment jobs run with: the one jobd was started with, minus its secrets.

    A frozen jobd (PyInstaller) points LD_LIBRARY_PATH into its own unpacked bundle;
    a tool started by run.sh would then load jobd's libraries instead of its image's
    and can crash. Restore the original value, or drop it if there was none.
    """
    env = {name: value for name, value in os.environ.items() if name not in SECRETS}
    if getattr(sys, "frozen", False):
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is None:
            env.pop("LD_LIBRARY_PATH", None)
        else:
            env["LD_LIBRARY_PATH"] = original
        # The bootloaders' own bookkeeping, not part of the environment jobd was started
        # with: PyInstaller's _PYI_* (_MEIPASS2 before 6.0) and staticx's STATICX_*.
        for name in list(env):
            if name.startswith("_PYI_") or name in ("_MEIPASS2", "STATICX_BUNDLE_DIR",
                                                     "STATICX_PROG_PATH"):
                del env[name]
    return env


def runs_by_itself(job_dir):
    """Whether run.sh can be started as it is: a #! script, or a program (ELF). Anything
    else is a shell script without #! and runs through bash (or /bin/sh)."""
    with open(os.path.join(job_dir, RUN_SH), "rb") as f:
        head = f.read(4)
    return head[:2] == b"#!" or head == b"\x7fELF"


def run_command(job_dir, shell):
    """argv for run.sh: itself when it can start by itself, else run by `shell`."""
    return ["./" + RUN_SH] if runs_by_itself(job_dir) else [shell, RUN_SH]


def job_stdin():
    """What a job reads on stdin: /dev/null, or, in a bare root without /dev, a pipe
    that is already at its end (so jobs run there too)."""
    if os.path.exists(os.devnull):
        return open(os.devnull, "rb")
    read_end, write_end = os.pipe()
    os.close(write_end)
    return os.fdopen(read_end, "rb")


def signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def kill_leftovers(pgid, job_dir, started_at=None):
    """Kill what is left of a job: processes working in its directory (or under it: the
    trash), and, when pgid is given, those of the job's session (run.sh led it) started
    since the job was -- pids get reused, and a helper may have moved to another
    directory. The number of processes killed."""
    if not os.path.isdir("/proc"):
        return 0
    job_dir = os.path.realpath(job_dir)  # /proc shows cwd with links resolved
    since = None
    if pgid and started_at:
        with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/stat") as f:
            boot = int(next(line for line in f if line.startswith("btime")).split()[1])
            since = (started_at - boot - 1) * os.sysconf("SC_CLK_TCK")  # in clock ticks
    inside, groups = [], set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            working_here = cwd == job_dir or cwd.startswith(job_dir + "/")
            if not pgid:  # the directory is all there is to go by
                if working_here:
                    inside.append(int(name))
                continue
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            group, session, start = int(fields[2]), int(fields[3]), int(fields[19])
        except (OSError, ValueError, IndexError):
            continue
        if working_here or (since is not None and session == pgid and start >= since):
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


def check_callback_url(url, allowed):
    """Refuse a callback URL unless it lies under one of the --callback-allow prefixes
    (same scheme and host:port, path starting with the prefix's path)."""
    if not allowed:
        raise BadRequest("completion callbacks are not enabled on this jobd (--callback-allow)")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"callback must be an http(s) URL, not {url!r}")
    if re.search(r"[\x00-\x20\x7f]", url):
        raise BadRequest(f"callback URL {url!r} holds spaces or control characters")
    if any(segment in (".", "..") for segment in unquote(parts.path).split("/")):
        raise BadRequest(f"callback URL {url!r} holds a '.' or '..' path segment")
    if parts.scheme == "https" and not hasattr(http.client, "HTTPSConnection"):
        raise BadRequest("this jobd has no TLS support; use an http:// callback")
    for prefix in allowed:
        allowed_parts = urlsplit(prefix)
        if ((parts.scheme, parts.netloc.lower()) ==
                (allowed_parts.scheme, allowed_parts.netloc.lower())
                and parts.path.startswith(allowed_parts.path)):
            return url
    raise BadRequest(f"callback URL {url!r} is not under an allowed prefix (--callback-allow)")


class Callbacks:
    """Delivers completion callbacks: POSTs a finished job's status object to its URL,
    signed with the token when one is set, retried with back-off until --callback-retry
    has passed. It has its own thread, so a slow receiver never holds up a worker, and
    its queue is in the store, so a callback pending at a stop is sent after the restart."""

    def __init__(self, store, cfg, log):
        self.store, self.cfg, self.log = store, cfg, log
        self.wakeup = store.callback_added  # set by the store when a callback is queued

    def run(self, stopping):
        while not stopping.is_set():
            self.wakeup.wait(1.0)
            self.wakeup.clear()
            try:
                for row in self.store.due_callbacks(time.time()):
                    if stopping.is_set():
                        break
                    self.deliver(row)
            except Exception:
                self.log("callback error", level="error", error=traceback.format_exc())

    def deliver(self, row):
        job_id, body = row["job_id"], row["body"]
        if body is None:  # built once, so every attempt sends (and signs) the same bytes
            job = self.store.get(job_id)
            if job is None:
                return self.store.callback_done(job_id)
            body = json.dumps(status_object(job), separators=COMPACT).encode()
            self.store.callback_body(job_id, body)
        headers = {"Content-Type": "application/json", "User-Agent": f"jobd/{__version__}",
                   "X-Jobd-Job": job_id}
        if self.cfg.token:
            digest = hmac.new(self.cfg.token.encode(), body, hashlib.sha256).hexdigest()
            headers["X-Jobd-Signature"] = f"sha256={digest}"
        try:
            status, error = post(row["url"], body, headers), None
        except (OSError, http.client.HTTPException, ValueError) as e:
            status, error = None, str(e) or type(e).__name__
        if status is not None and 200 <= status < 300:
            self.store.callback_done(job_id)
            self.log("callback delivered", job=job_id, status=status, attempt=row["attempts"] + 1)
        elif time.time() >= row["give_up_at"]:
            self.store.callback_done(job_id)
            self.log("callback abandoned", level="warning", job=job_id, status=status,
                     error=error, attempts=row["attempts"] + 1)
        else:
            self.store.callback_done(job_id, retry_at=time.time() + min(300, 2 ** row["attempts"]))
            self.log("callback failed", level="warning", job=job_id, status=status, error=error)


def post(url, body, headers, timeout=10):
    """POST body to url; the response status."""
    parts = urlsplit(url)
    connection = (http.client.HTTPSConnection if parts.scheme == "https"
                  else http.client.HTTPConnection)
    conn = connection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     body, headers)
        response = conn.getresponse()
        response.read(64 * KiB)
        return response.status
    finally:
        conn.close()


class Runner:
    """Runs queued jobs on a fixed pool of worker threads.

    A worker is woken the moment a job is accepted, claims the oldest queued job in one
    atomic store transaction (so each job runs exactly once), runs it in its own process
    group and records the result. A failure in one job never stops a worker. With
    --executor slurm a worker hands the job to sbatch instead (Slurm, below); slurml
    jobs are never claimed by workers (Slurml).
    """

    def __init__(self, store, cfg, log, metrics):
        self.store, self.cfg, self.log, self.metrics = store, cfg, log, metrics
        self.callbacks = Callbacks(store, cfg, log)
        self.env = job_environment()
        # the same, encoded once: Popen would encode every variable again for every job
        self.spawn_env = {os.fsencode(k): os.fsencode(v) for k, v in self.env.items()}
        self.slurm = Slurm(self)  # its poller runs only when there are Slurm jobs to follow
        self.slurml = Slurml(self) if cfg.slurml_url and cfg.slurml_token else None
        # A script without #! runs with /bin/sh, as the kernel's callers run one (the Go
        # jobd refused them). One sent through job-orchestrator's protocol runs with bash
        # when the system has it, because that protocol's own client runs `bash run.sh`.
        self.bash = shutil.which("bash", path=self.env.get("PATH", os.defpath)) or "/bin/sh"
        self.stopping = threading.Event()
        self.wakeup = threading.Condition()
        self.generation = 0              # bumped by notify(), so no wake-up is ever lost
        self.lock = threading.Lock()     # guards self.active and every claim
        self.active = {}                 # job id -> ActiveJob
        self.threads = []
        self.window_start, self.window_count = 0.0, 0  # uploads accepted lately
        self.flood_until = 0.0           # uploads arrive in a flood until then

    FLOOD_RATE = 1000  # uploads a second that make a flood...
    FLOOD = 0.02       # ...counted over this many seconds
    FLOOD_HOLD = 0.05  # a flood has passed when no count reached the rate for this long
    GIVE_WAY = 0.2     # the longest a worker waits for a flood to pass before a claim

    # -- start, notify, stop ----------------------------------------------------------

    def start(self):
        self.recover()
        self.sweep()
        for number in range(self.cfg.workers):
            self._spawn(self.work, f"worker-{number}")
        self._spawn(self.sweep_loop, "janitor")
        self._spawn(lambda: self.callbacks.run(self.stopping), "callbacks")
        if self.cfg.executor == "slurm" or self.store.slurm_jobs():
            self._spawn(lambda: self.slurm.run(self.stopping), "slurm")
        if self.slurml:
            self._spawn(lambda: self.slurml.run(self.stopping), "slurml")

    def _spawn(self, target, name):
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def uploads_accepted(self, count):
        """The front end accepted `count` uploads. While they arrive at FLOOD_RATE a
        second or more, workers give way to them (give_way): accepting a job durably comes
        before starting one, and both take turns for one interpreter lock."""
        now = time.monotonic()
        if now - self.window_start > self.FLOOD:
            self.window_start, self.window_count = now, 0
        self.window_count += count
        if self.window_count >= self.FLOOD_RATE * self.FLOOD:
            # held past the next count (20-40 ms away): a slow pass would otherwise let
            # every waiting worker in; and not much longer, or a burst's jobs would wait
            self.flood_until = now + self.FLOOD_HOLD
        self.notify(count)

    def give_way(self):
        """During a flood of uploads, wait (GIVE_WAY at most) before claiming a job. Jobs
        of real length do not notice; trivial ones start at nearly 1/GIVE_WAY a second per
        worker until the flood has passed, and at full speed after."""
        deadline = time.monotonic() + self.GIVE_WAY
        while True:
            wait = min(self.flood_until, deadline) - time.monotonic()
            if wait <= 0 or self.stopping.wait(wait):
                return

    def notify(self, jobs=1):
        """Wake an idle worker for each of `jobs` new jobs."""
        with self.wakeup:
            self.generation += 1
            self.wakeup.notify(jobs)
        if self.slurml:
            self.slurml.wakeup.set()

    def stop(self, grace):
        """Stop every running job (TERM, then KILL after grace) and queue it again. Jobs
        in Slurm or at slurml are left there: the next start follows them again."""
        self.stopping.set()
        with self.wakeup:
            self.wakeup.notify_all()
        self.slurm.wakeup.set()
        if self.slurml:
            self.slurml.wakeup.set()
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
            self.give_way()
            try:
                with self.lock:
                    if self.stopping.is_set():  # (stop() lists the running jobs under this lock)
                        break
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
                with contextlib.suppress(Exception):  # the job must not stay RUNNING
                    self.finish(job["id"], FAILED,
                                "internal error in jobd while running the job (see its log)")
            finally:
                with self.lock:
                    self.active.pop(job["id"], None).done.set()

    def run(self, job, active):
        job_id = job["id"]
        job_dir = self.store.job_dir(job_id)
        self.log("job", job=job_id, status=RUNNING, attempt=job["attempts"])
        started = time.monotonic()
        try:
            self.store.discard(job_dir)  # what an interrupted attempt left
            os.makedirs(job_dir)
            source = self.store.open_input(job_id)
            if source is None:
                raise FileNotFoundError("the job's input is missing from the store")
            with source:
                extract_input_zip(source, job_dir, self.cfg)
            if self.cfg.executor == "slurm":
                outcome = self.slurm.submit(job, job_dir, active)
            else:
                outcome = self.execute(job_id, job_dir, active, job["timeout"],
                                       job["orchestrator"])
        except (OSError, JobdError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            outcome = FAILED, f"could not prepare the job: {getattr(e, 'message', e)}", None
        if outcome is SUBMITTED:  # Slurm has it now; the Slurm poller follows it
            return
        if outcome is None:  # jobd is stopping: run it again at the next start
            self.store.requeue(job_id, count_attempt=False)
            self.store.discard(job_dir)
            self.log("job", job=job_id, status=QUEUED, reason="jobd stopping")
            return
        status, message, exit_code = outcome
        self.finish(job_id, status, message, exit_code)
        self.metrics.job_finished(time.monotonic() - started)
        self.log("job", job=job_id, status=status, exit_code=exit_code,
                 seconds=round(time.monotonic() - started, 3),
                 message=None if status == SUCCESS else message)

    def execute(self, job_id, job_dir, active, timeout=None, orchestrator=False):
        """Run run.sh to its end (or its time limit); (status, message, exit code), or
        None when jobd stops."""
        argv = run_command(job_dir, self.bash if orchestrator else "/bin/sh")
        with open(os.path.join(job_dir, STDOUT_FILE), "wb") as out, \
                open(os.path.join(job_dir, STDERR_FILE), "wb") as err, job_stdin() as stdin:
            for attempt in range(50):
                try:
                    proc = subprocess.Popen(argv, cwd=job_dir, env=self.spawn_env,
                                            stdin=stdin, stdout=out, stderr=err,
                                            start_new_session=True)
                    break
                except OSError as e:
                    # ETXTBSY: another thread's fork briefly holds run.sh open for writing
                    if e.errno == errno.ETXTBSY and attempt < 49:
                        time.sleep(0.01)
                        continue
                    what = e.filename or argv[0]
                    if what == argv[0] == "./" + RUN_SH and e.errno == errno.ENOENT:
                        what += " (the interpreter on its #! line?)"
                    return FAILED, f"could not start run.sh: {e.strerror}: {what}", None
        self.store.set_pgid(job_id, proc.pid)
        active.attach(proc, self.cfg.grace)
        timer = None
        if timeout:
            timer = threading.Timer(timeout, active.stop, ("timeout", self.cfg.grace))
            timer.daemon = True
            timer.start()
        code = proc.wait()
        if timer is not None:
            timer.cancel()
        self.end_group(proc.pid, active)
        if active.reason == "shutdown":
            return None
        if active.reason == "cancel":
            return CANCELLED, "job cancelled", None
        if active.reason == "timeout":
            return FAILED, f"{JOB_TIMED_OUT} after {timeout:g} s and was killed", None
        return describe_exit(code, os.path.join(job_dir, STDERR_FILE))

    def end_group(self, pgid, active):
        """Once run.sh has exited, make sure nothing it started outlives the job."""
        if active.reason:
            while group_alive(pgid) and time.monotonic() < (active.kill_at or 0):
                time.sleep(0.02)
        signal_group(pgid, signal.SIGKILL)

    def finish(self, job_id, status, message, exit_code=None, was=RUNNING, slurm_id=0,
               leave_out=()):
        """Zip the job directory once into the result, record the end (if the job is
        still in state `was`, with that Slurm id), and remove the directory unless DEBUG."""
        job_dir = self.store.job_dir(job_id)
        output = self.store.spool()
        try:
            if os.path.isdir(job_dir):
                write_result_zip(job_dir, output, leave_out)
            else:
                output.write(EMPTY_ZIP)
            return self.store.finish(job_id, status, message, exit_code, output, was, slurm_id)
        except Exception as e:  # whatever it was, the job must not stay RUNNING forever
            self.log("result zip failed", level="error", job=job_id, error=repr(e))
            return self.store.finish(job_id, status, message, exit_code, None, was, slurm_id)
        finally:
            output.discard()
            if not self.cfg.debug:
                self.store.discard(job_dir)

    # -- cancel -----------------------------------------------------------------------

    def cancel(self, job_id, wait=0.0):
        """Cancel a queued or running job, waiting up to `wait` seconds for a running one
        to end; False if it had already finished (or is not known)."""
        empty = self.store.spool()
        empty.write(EMPTY_ZIP)
        with self.lock:
            if self.store.finish(job_id, CANCELLED, "job cancelled before it started",
                                 output=empty, was=QUEUED):
                self.log("job", job=job_id, status=CANCELLED)
                return True
            active = self.active.get(job_id)
        deadline = time.monotonic() + wait
        if active is not None:  # running here, or being handed to Slurm
            active.stop("cancel", self.cfg.grace)
            active.done.wait(wait)
        job = self.store.get(job_id)
        if job is None or job["status"] in FINISHED:
            return active is not None
        if job["slurml"]:
            return self.slurml is not None and self.slurml.cancel(job)
        if job["slurm_id"] > 0 or job["submit_tag"]:
            return self.slurm.cancel(job, deadline)
        return active is not None

    def delete(self, job_id):
        """Cancel a job if needed, then remove its record and every file."""
        self.cancel(job_id, wait=self.cfg.grace + 5)
        self.store.remove(job_id)
        self.log("job removed", job=job_id, reason="deleted")

    # -- restart and retention ----------------------------------------------------------

    def recover(self):
        """Start-up: clean what a crash left, queue interrupted jobs again (up to a limit)."""
        self.store.sweep_orphans()
        for job in self.store.running_jobs():
            if job["slurm_id"] > 0 or job["submit_tag"]:
                continue  # in Slurm or at slurml (or maybe in Slurm): followed from there
            job_id = job["id"]
            job_dir = self.store.job_dir(job_id)
            killed = kill_leftovers(job["pgid"], job_dir, job["started_at"])
            self.store.discard(job_dir)
            if job["attempts"] >= MAX_ATTEMPTS:
                message = (f"job was interrupted {job['attempts']} times "
                           "(jobd stopped while it ran); not run again")
                self.finish(job_id, FAILED, message)
                self.log("job", job=job_id, status=FAILED, message=message)
            else:
                self.store.requeue(job_id, count_attempt=True)
                self.log("job", job=job_id, status=QUEUED, reason="interrupted by a stop of jobd",
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
            self.log("job removed", job=job_id, reason="retention")


# ------------------------------------------------------------------------------------
# Runner: Slurm (--executor slurm), and the Go daemon's slurml service
# ------------------------------------------------------------------------------------
# With --executor slurm a worker does not run run.sh itself: it unpacks the job into its
# directory as usual (under DATAPATH, which the compute nodes must share), hands it to
# sbatch, and is free again. One poller thread follows every job in Slurm with a single
# squeue call per --slurm-poll, scancels on cancel and time-out, and zips the result with
# Runner.finish once Slurm is done, exactly as for a local job.
#
# States. QUEUED means "waiting to run": in jobd's queue (slurm_id 0), or in Slurm's
# (slurm_id > 0: PENDING, CONFIGURING). The claim takes only the first kind, in one UPDATE
# that requires slurm_id = 0, so a job Slurm has is never claimed, nor submitted, again.
# A claimed job is RUNNING while jobd unpacks and submits it, QUEUED while Slurm keeps it
# pending, RUNNING once it runs (StartedAt is then moved to the real start, and the job's
# time limit counts from there), and ends as Slurm says (SLURM_STATES).
#
# Run once across crashes. Before sbatch runs, the record gets a submit tag: the job's
# name in Slurm, jobd-<id>-<random>. A record with a tag and no Slurm id (jobd died, or
# sbatch failed or hung, in between) may or may not be in Slurm; the poller looks the
# name up, and queues the job again only when Slurm has never seen it.
#
# Nothing lost. A job that has left slurmctld's memory (MinJobAge after it ended, while
# jobd was not looking) is resolved from the exit status the batch script leaves in the
# job directory, else from Slurm's jobcomp/filetxt record; only when neither appears
# within SLURM_LOST_AFTER seconds is it failed, with a message that says so.

SUBMITTED = "submitted"  # Slurm.submit's outcome once Slurm has (or may have) the job
SLURM_STATES = {
    **dict.fromkeys(("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                     "RESV_DEL_HOLD"), QUEUED),
    **dict.fromkeys(("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
                     "STAGE_OUT", "RESIZING"), RUNNING),
    "COMPLETED": SUCCESS,
    "CANCELLED": CANCELLED,
    **dict.fromkeys(("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                     "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"), FAILED),
}
SLURM_CALL_TIMEOUT = 30.0   # squeue, scancel, scontrol: ~7 ms, but they hang with slurmctld
SBATCH_TIMEOUT = 60.0
SLURM_LOST_AFTER = 60.0     # also covers NFS attribute caching of the exit status file
SQUEUE_BATCH = 2000         # job ids per squeue call (far below the argument-length limit)
EXIT_FILE = ".jobd-exit-status"  # "<exit status> <Slurm job id>", written by the batch script
JOBD_FILES = (EXIT_FILE, EXIT_FILE + ".tmp")  # left out of the result zip
# sbatch errors after which the job may have been accepted all the same
SBATCH_UNSURE = re.compile(r"timed out|Unable to contact|Zero Bytes|Connection refused|"
                           r"temporarily|Communication connection failure", re.IGNORECASE)

# The batch script, given to sbatch on stdin: run.sh as a local job runs it, then its exit
# status left in the job directory (atomically) for when Slurm has forgotten the job.
# The explicit cd refuses to run anywhere else: with a --chdir it cannot enter, Slurm
# would run the job in /tmp and call it a success.
BATCH_SCRIPT = """#!/bin/sh
# jobd job {job_id}
cd {job_dir} || {{ echo "jobd: cannot enter {job_dir} on $(hostname)" >&2; exit 97; }}
{command}
status=$?
echo "$status $SLURM_JOB_ID" > {exit_file}.tmp && mv -f {exit_file}.tmp {exit_file}
exit $status
"""
RUN_WITH_SH = "/bin/sh run.sh"
RUN_WITH_BASH = "if command -v bash >/dev/null 2>&1; then bash run.sh; else /bin/sh run.sh; fi"


def check_slurm_options(options, cfg, slurml=False):
    """A job's own sbatch options ({"partition": "short", "exclusive": true}), checked
    against --slurm-job-options; their JSON text for the store, or None."""
    if options is None or options == {}:
        return None
    if not isinstance(options, dict):
        raise BadRequest('"slurm" must be an object of sbatch options, e.g. {"time": "10"}')
    if cfg.executor != "slurm" or slurml:
        raise BadRequest("sbatch options are only for jobs that this jobd runs through Slurm "
                         "(--executor slurm)")
    checked = {}
    for name, value in options.items():
        name = name.lstrip("-")
        if name not in cfg.slurm_job_options:
            allowed = ", ".join(cfg.slurm_job_options) or "none"
            raise BadRequest(f"sbatch option {name!r} may not be set by a job here "
                             f"(allowed: {allowed}; --slurm-job-options)")
        if value is True:
            checked[name] = True
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise BadRequest(f"sbatch option {name!r} needs a string, a number or true")
        value = str(value)
        if not value or len(value) > 256 or not value.isprintable():
            raise BadRequest(f"sbatch option {name!r} has an unusable value {value[:50]!r}")
        checked[name] = value
    return json.dumps(checked)


def parse_slurm_header(text):
    """The X-Jobd-Slurm header, 'partition=short; time=10; exclusive', as a dict."""
    if text is None:
        return None
    options = {}
    for item in text.split(";"):
        name, equals, value = item.strip().partition("=")
        if name.strip():
            options[name.strip()] = value.strip() if equals else True
    return options


def parse_slurm_record(text):
    """Slurm's one-line 'Key=Value Key=Value' (jobcomp, scontrol) as a dict; a value runs
    up to the next ' Key=', so values with spaces survive."""
    text = text.strip()
    keys = [m for m in re.finditer(r"([A-Za-z][\w/:]*)=", text)
            if m.start() == 0 or text[m.start() - 1] == " "]
    return {m.group(1): text[m.end(): following.start() - 1 if following else len(text)]
            for m, following in zip(keys, keys[1:] + [None])}


def read_exit_file(job_dir):
    """(exit status, Slurm job id or None) that the batch script left, or None."""
    try:
        with open(os.path.join(job_dir, EXIT_FILE)) as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[1]) if len(fields) > 1 else None
    except (OSError, ValueError, IndexError):
        return None


class Slurm:
    """Runs jobs through Slurm: submit() from a worker, one poller thread (run) for every
    job in flight, cancel() for cancel, time-out and delete. See the notes above."""

    def __init__(self, runner):
        self.runner, self.store, self.cfg, self.log = runner, runner.store, runner.cfg, runner.log
        # sbatch passes its own environment to the job (--export=ALL): the jobs' one,
        # without jobd's secrets; squeue and scancel defaults from it would change the
        # answers jobd reads.
        self.env = {name: value for name, value in runner.env.items()
                    if not name.startswith(("SQUEUE_", "SCANCEL_"))}
        self.wakeup = threading.Event()
        self.lock = threading.Lock()    # guards the two fields below
        self.stopping = {}              # job id -> [reason, monotonic time to scancel again]
        self.missing = {}               # job id -> when Slurm was first found not to know it
        self.jobcomp_file = None        # JobCompLoc, once `scontrol show config` has said

    def call(self, argv, input="", timeout=SLURM_CALL_TIMEOUT):
        """Run a Slurm command with a time limit: (exit status or None if it hung or could
        not start, stdout, stderr)."""
        try:
            done = subprocess.run(argv, input=input, capture_output=True, text=True,
                                  env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, "", f"{argv[0]} timed out after {timeout:g} s"
        except OSError as e:
            return None, "", f"{argv[0]}: {e.strerror}"
        return done.returncode, done.stdout, done.stderr.strip()

    # -- submit (on a worker thread) -----------------------------------------------------

    def submit(self, job, job_dir, active):
        """Hand a prepared job directory to sbatch: SUBMITTED, an outcome like execute()'s
        when Slurm refuses it, or None when jobd is stopping before it was sent."""
        job_id = job["id"]
        with active.lock:
            reason = active.reason
        if reason == "shutdown":
            return None
        if reason:
            return CANCELLED, "job cancelled", None
        tag = f"jobd-{job_id}-{uuid.uuid4().hex[:8]}"
        self.store.set_submit_tag(job_id, tag)
        command = ("./run.sh" if runs_by_itself(job_dir)
                   else RUN_WITH_BASH if job["orchestrator"] else RUN_WITH_SH)
        script = BATCH_SCRIPT.format(job_id=job_id, job_dir=shlex.quote(job_dir),
                                     command=command, exit_file=EXIT_FILE)
        own = json.loads(job["slurm_options"] or "{}")
        argv = (["sbatch", "--parsable", f"--chdir={job_dir}", f"--job-name={tag}",
                 f"--output={os.path.join(job_dir, STDOUT_FILE)}",
                 f"--error={os.path.join(job_dir, STDERR_FILE)}", *self.cfg.slurm_option]
                + [f"--{name}" if value is True else f"--{name}={value}"
                   for name, value in own.items()])
        code, out, err = self.call(argv, input=script, timeout=SBATCH_TIMEOUT)
        first = out.strip().split(";")[0]
        if code == 0 and first.isdigit():
            slurm_id = int(first)
            self.store.track(job_id, slurm_id, QUEUED, f"Slurm job {slurm_id}: PENDING", 0)
            self.log("job", job=job_id, status=QUEUED, slurm_id=slurm_id)
            with active.lock:
                reason = active.reason
            if reason == "cancel":
                self.stop(job_id, slurm_id, reason)
            return SUBMITTED
        if code is None or SBATCH_UNSURE.search(err):
            self.log("sbatch failed; Slurm may have the job all the same, so the poller will "
                     "look it up before it is submitted again", level="warning", job=job_id,
                     error=err)
            with active.lock:
                reason = active.reason
            if reason == "cancel":
                self.stop(job_id, None, reason)
            return SUBMITTED
        lines = [line for line in err.splitlines() if line.strip()] or [f"sbatch exit {code}"]
        return FAILED, f"Slurm refused the job: {lines[-1]}", None

    # -- the poller --------------------------------------------------------------------

    def run(self, stopping):
        while not stopping.is_set():
            try:
                self.poll()
            except Exception:
                self.log("slurm poller error", level="error", error=traceback.format_exc())
            self.wakeup.wait(self.cfg.slurm_poll)
            self.wakeup.clear()

    def poll(self):
        """One look at Slurm for every job in flight, and what follows from it."""
        jobs = self.store.slurm_jobs()
        in_flight = {job["id"] for job in jobs}
        with self.lock:  # forget jobs that ended otherwise (deleted before Slurm said so)
            for notes in (self.stopping, self.missing):
                for job_id in set(notes) - in_flight:
                    del notes[job_id]
        known = {job["slurm_id"]: job for job in jobs if job["slurm_id"] > 0}
        states = self.squeue(list(known))
        if states is None:
            return  # Slurm did not answer: nothing is concluded from silence
        self.scancel_again(known, states)
        for slurm_id, job in known.items():
            seen = states.get(slurm_id) or self.find_ended(job)
            if seen:
                self.follow(job, *seen)
        with self.runner.lock:
            submitting = set(self.runner.active)
        unsure = [job for job in jobs if job["slurm_id"] <= 0 and job["id"] not in submitting]
        if unsure:
            self.find_submissions(unsure)

    def squeue(self, slurm_ids):
        """{Slurm id: (state, wait status, reason)} for the ids Slurm still knows, in one
        call (per SQUEUE_BATCH ids); None when Slurm did not answer."""
        states = {}
        for start in range(0, len(slurm_ids), SQUEUE_BATCH):
            part = slurm_ids[start: start + SQUEUE_BATCH]
            code, out, err = self.call(["squeue", "-h", "-t", "all", "-j",
                                        ",".join(map(str, part)),
                                        "-O", "JobID:|,State:|,exit_code:|,Reason:"])
            if code != 0:
                if code == 1 and len(part) == 1 and "Invalid job id" in err:
                    continue  # one forgotten id alone is an error; among others, just absent
                self.log("squeue failed", level="warning", error=err)
                return None
            for line in out.splitlines():
                fields = [field.strip() for field in line.split("|")] + ["", "", ""]
                if fields[0].isdigit():
                    wait_status = int(fields[2]) if fields[2].isdigit() else 0
                    states[int(fields[0])] = (fields[1], wait_status, fields[3])
        return states

    def follow(self, job, state, wait_status, reason):
        """Bring a job's record up to date with what Slurm says of it."""
        job_id, slurm_id = job["id"], job["slurm_id"]
        with self.lock:
            self.missing.pop(job_id, None)
        status = SLURM_STATES.get(state, job["status"])  # a state new to jobd changes nothing
        if status in FINISHED:
            return self.end(job, state, wait_status, reason)
        message = f"Slurm job {slurm_id}: {state}"
        if reason and reason != "None":
            message += f" ({reason})"
        started = time.time() if status == RUNNING and job["status"] != RUNNING else None
        if (status, message) != (job["status"], job["message"]):
            self.store.track(job_id, slurm_id, status, message, slurm_id, started)
        if status == RUNNING and job["timeout"]:
            if time.time() >= (started or job["started_at"]) + job["timeout"]:
                self.stop(job_id, slurm_id, "timeout")

    def end(self, job, state, wait_status, reason):
        """Record the end Slurm reported, with the job directory zipped as for a local job."""
        job_id, slurm_id = job["id"], job["slurm_id"]
        job_dir = self.store.job_dir(job_id)
        with self.lock:
            stopped_for = self.stopping.pop(job_id, [None])[0]
            self.missing.pop(job_id, None)
        status = SLURM_STATES[state]
        where = f"Slurm job {slurm_id} {state}"
        if reason not in ("", "None"):
            where += f", {reason}"
        code, signum = wait_status >> 8, wait_status & 0x7F
        exit_code = None
        if status == CANCELLED:
            # after a restart the reason is gone, but a deadline that has passed still says it
            late = (job["timeout"] and job["status"] == RUNNING
                    and time.time() >= job["started_at"] + job["timeout"])
            if stopped_for == "timeout" or (stopped_for is None and late):
                status, message = FAILED, f"{JOB_TIMED_OUT} after {job['timeout']:g} s and was killed"
            else:
                message = "job cancelled" if stopped_for else f"job cancelled in Slurm ({where})"
        elif (state == "FAILED" and (code == 97 or reason == "JobLaunchFailure")
              and read_exit_file(job_dir) is None):
            # the batch script's cd failed, or Slurm could not open the output files there
            message = (f"could not finish the job, error: {where}: the compute node cannot "
                       f"use {job_dir}: is DATAPATH on a file system the compute nodes share?")
            exit_code = 97 if code == 97 else None
        elif status == SUCCESS:
            message, exit_code = "job finished successfully", 0
        elif code or signum:
            _, message, exit_code = describe_exit(code or -signum, os.devnull)
            tail = last_line(os.path.join(job_dir, STDERR_FILE))
            message += f" ({where})" + (f": {tail}" if tail else "")
        else:
            message = f"could not finish the job, error: {where}"
        if self.runner.finish(job_id, status, message, exit_code, was=job["status"],
                              slurm_id=slurm_id, leave_out=JOBD_FILES):
            self.runner.metrics.job_finished(max(0.0, time.time() - (job["started_at"] or 0)))
            self.log("job", job=job_id, status=status, exit_code=exit_code, slurm_id=slurm_id,
                     message=None if status == SUCCESS else message)

    def find_ended(self, job):
        """(state, wait status, reason) of a job Slurm no longer lists: from the exit
        status the batch script left, else from Slurm's jobcomp record. None while
        neither is there; after SLURM_LOST_AFTER seconds the job is failed."""
        exited = read_exit_file(self.store.job_dir(job["id"]))
        if exited and exited[1] in (job["slurm_id"], None):
            state = "COMPLETED" if exited[0] == 0 else "FAILED"
            return state, exited[0] << 8, "exit status file"
        record = self.jobcomp(job, slurm_id=job["slurm_id"])
        if record:
            state = record[0] if SLURM_STATES.get(record[0]) in FINISHED else "FAILED"
            return state, record[1], record[2]
        with self.lock:
            first = self.missing.setdefault(job["id"], time.monotonic())
        if time.monotonic() - first < SLURM_LOST_AFTER:
            return None
        message = (f"Slurm no longer knows job {job['slurm_id']}, and it left neither an exit "
                   "status in the job directory nor a jobcomp record: it was probably "
                   "cancelled, or its node failed, while jobd was not looking")
        if self.runner.finish(job["id"], FAILED, message, None, was=job["status"],
                              slurm_id=job["slurm_id"], leave_out=JOBD_FILES):
            self.log("job", job=job["id"], status=FAILED, level="warning", message=message)
        return None

    def jobcomp(self, job, slurm_id=None, name=None):
        """The last jobcomp/filetxt record of a job (by Slurm id or job name, in the job's
        directory): (state, wait status, reason, Slurm id), or None."""
        if self.jobcomp_file is None:
            code, out, _ = self.call(["scontrol", "show", "config"])
            if code != 0:
                return None
            config = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", out, re.MULTILINE))
            self.jobcomp_file = (config.get("JobCompLoc", "")
                                 if config.get("JobCompType") == "jobcomp/filetxt" else "")
        if not self.jobcomp_file:
            return None
        key = f"JobId={slurm_id} " if slurm_id else f" Name={name} "  # a quick first sieve
        found = None
        try:
            with open(self.jobcomp_file, errors="replace") as f:
                for line in f:
                    if key not in line:
                        continue
                    record = parse_slurm_record(line)
                    if (record.get("JobId") == str(slurm_id) if slurm_id
                            else record.get("Name") == name) \
                            and record.get("WorkDir", "") in ("", self.store.job_dir(job["id"])):
                        found = record
        except OSError:
            return None
        if found is None or not found.get("JobId", "").isdigit():
            return None
        code, _, signum = found.get("ExitCode", "0:0").partition(":")
        wait_status = (int(code) << 8 | int(signum)) if (code + signum).isdigit() else 0
        state = (found.get("JobState") or "FAILED").split()[0]
        return state, wait_status, "jobcomp record", int(found["JobId"])

    def find_submissions(self, jobs):
        """Jobs whose sbatch may or may not have reached Slurm: follow each one Slurm has
        (looked up by name, 500 names per squeue call), queue the others again."""
        for start in range(0, len(jobs), 500):
            tags = {job["submit_tag"]: job for job in jobs[start: start + 500]}
            code, out, _ = self.call(["squeue", "-h", "-t", "all", "--name=" + ",".join(tags),
                                      "-O", "JobID:|,Name:"])
            if code != 0:
                return  # ask again at the next poll
            found = {}
            for line in out.splitlines():
                number, _, name = (part.strip() for part in line.partition("|"))
                if number.isdigit() and name in tags:
                    found[name] = max(found.get(name, 0), int(number))
            for tag, job in tags.items():
                self.found_or_not(job, found.get(tag))

    def found_or_not(self, job, slurm_id):
        """Follow a job found in Slurm (by name, by the exit status it left, or in jobcomp);
        queue one Slurm has never seen again, or end it if it was cancelled meanwhile."""
        job_id = job["id"]
        exited = read_exit_file(self.store.job_dir(job_id))
        if not slurm_id and exited and exited[1]:
            slurm_id = exited[1]
        if not slurm_id:
            record = self.jobcomp(job, name=job["submit_tag"])
            slurm_id = record and record[3]
        with self.lock:
            stopped_for = self.stopping.pop(job_id, [None])[0]
        if slurm_id:
            if self.store.track(job_id, slurm_id, QUEUED, f"Slurm job {slurm_id}: found", 0):
                self.log("job", job=job_id, status=QUEUED, slurm_id=slurm_id,
                         reason="found in Slurm by its name")
                if stopped_for:
                    self.stop(job_id, slurm_id, stopped_for)
        elif stopped_for:
            self.runner.finish(job_id, CANCELLED, "job cancelled")
        else:
            self.store.requeue(job_id, count_attempt=False)
            self.log("job", job=job_id, status=QUEUED, reason="Slurm never got it; queued again")
            self.runner.notify()

    # -- cancel and time-out -------------------------------------------------------------

    def stop(self, job_id, slurm_id, reason):
        """scancel a job (once; see scancel_again); the poller records its end when Slurm
        reports it, that is once Slurm has killed every process of the job."""
        with self.lock:
            if job_id in self.stopping:
                return
            self.stopping[job_id] = [reason, time.monotonic()]
        if slurm_id:
            self.scancel({job_id: slurm_id})
        self.wakeup.set()

    def scancel(self, slurm_ids):
        """scancel {job id: Slurm id} in one call; asked again after 10 s while Slurm still
        lists them as not ended (after one poll if the call failed)."""
        code, _, err = self.call(["scancel", *map(str, slurm_ids.values())])
        again = time.monotonic() + (10.0 if code == 0 else self.cfg.slurm_poll)
        with self.lock:
            for job_id in slurm_ids:
                if job_id in self.stopping:
                    self.stopping[job_id][1] = again
        if code != 0:
            self.log("scancel failed", level="warning", error=err)

    def scancel_again(self, known, states):
        now = time.monotonic()
        with self.lock:
            due = {job["id"]: slurm_id for slurm_id, job in known.items()
                   if job["id"] in self.stopping and self.stopping[job["id"]][1] <= now
                   and SLURM_STATES.get(states.get(slurm_id, ("",))[0]) in (QUEUED, RUNNING)}
        if due:
            self.scancel(due)

    def cancel(self, job, deadline):
        """Cancel a job in Slurm; wait until it has ended (or `deadline`). True."""
        self.stop(job["id"], job["slurm_id"], "cancel")
        while time.monotonic() < deadline:
            job = self.store.get(job["id"])
            if job is None or job["status"] in FINISHED:
                break
            time.sleep(0.05)
        return True


class Slurml:
    """Forwards "slurml": true jobs to the slurml service as the Go daemon does
    (domain/jobs/jobs_dto.go: PostToSlurml, GetFromSlurml): POST <url>/api/submit with
    {"payload": <the input zip, base64>} and the raw token in Authorization -> 201
    {"jobid": N}; then GET <url>/api/download/N every --slurml-poll -> 204 not ready,
    206 {"output"} PARTIAL, 200 {"output"} SUCCESS, anything else FAILED. Unlike Go, a
    service that cannot be reached is asked again at the next poll instead of failing
    the job, and a job past its time limit is failed here (slurml has no cancel)."""

    TIMEOUT = 60.0  # one request

    def __init__(self, runner):
        self.runner, self.store, self.cfg, self.log = runner, runner.store, runner.cfg, runner.log
        self.wakeup = threading.Event()

    def run(self, stopping):
        next_poll = time.monotonic()
        while not stopping.is_set():
            try:
                while not stopping.is_set():
                    job = self.store.claim_next(slurml=True)
                    if job is None:
                        break
                    self.forward(job)
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.cfg.slurml_poll
                    for job in self.store.slurml_jobs():
                        if stopping.is_set():
                            break
                        self.check(job)
            except Exception:
                self.log("slurml error", level="error", error=traceback.format_exc())
            self.wakeup.wait(max(0.0, next_poll - time.monotonic()))
            self.wakeup.clear()

    def request(self, method, path, payload=None):
        """One request to the service, as Go sends it: (status, body)."""
        parts = urlsplit(self.cfg.slurml_url + path)  # Go appends the path to the URL as is
        connection = (http.client.HTTPSConnection if parts.scheme == "https"
                      else http.client.HTTPConnection)
        conn = connection(parts.hostname, parts.port, timeout=self.TIMEOUT)
        headers = {"Authorization": self.cfg.slurml_token, "User-Agent": f"jobd/{__version__}"}
        body = None
        if payload is not None:
            # Go's body, byte for byte; the base64 is made as it is sent.
            head, tail = b'{\n\t\t\t"payload": "', b'"\n\t\t}'
            size = payload.seek(0, io.SEEK_END)
            payload.seek(0)
            headers["Content-Length"] = str(len(head) + 4 * ((size + 2) // 3) + len(tail))
            body = itertools.chain(
                [head], iter(lambda: base64.b64encode(payload.read(3 * 256 * KiB)), b""), [tail])
        try:
            conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                         body, headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def forward(self, job):
        job_id = job["id"]
        source = self.store.open_input(job_id)
        if source is None:
            return self.end(job, FAILED, "could not forward the job: its input is missing")
        try:
            with source:
                status, body = self.request("POST", "/api/submit", source)
        except (OSError, http.client.HTTPException) as e:
            return self.end(job, FAILED, f"could not forward the job to slurml: {e}")
        if status != 201:
            return self.end(job, FAILED, f"slurml refused the job: HTTP {status}")
        try:
            jobid = json.loads(body)["jobid"]
            assert isinstance(jobid, int) and not isinstance(jobid, bool) and jobid > 0
        except (ValueError, TypeError, KeyError, AssertionError):
            return self.end(job, FAILED, f"slurml accepted the job without a job id: "
                                         f"{body[:100]!r}")
        if self.store.track(job_id, jobid, RUNNING, f"forwarded to slurml as job {jobid}", 0):
            self.log("job", job=job_id, status=RUNNING, slurml_jobid=jobid)

    def check(self, job):
        """Ask the service about one job; record its end if it has one."""
        jobid = job["slurm_id"]
        if job["timeout"] and time.time() >= job["started_at"] + job["timeout"]:
            return self.end(job, FAILED, f"{JOB_TIMED_OUT} after {job['timeout']:g} s (slurml "
                                         f"cannot cancel: its job {jobid} may still run there)")
        try:
            status, body = self.request("GET", f"/api/download/{jobid}")
        except (OSError, http.client.HTTPException) as e:
            self.log("slurml not reachable", level="warning", job=job["id"], error=str(e))
            return
        if status == 204:
            return
        if status in (200, 206):
            try:
                output = base64.b64decode(json.loads(body)["output"], validate=True)
            except (ValueError, TypeError, KeyError, binascii.Error):
                return self.end(job, FAILED, f"slurml job {jobid} answered an unreadable output")
            if status == 200:
                return self.end(job, SUCCESS, f"slurml job {jobid} finished", output)
            return self.end(job, PARTIAL, f"slurml job {jobid} finished (partial output)", output)
        self.end(job, FAILED, f"slurml job {jobid} failed (HTTP {status})")

    def end(self, job, status, message, output=None):
        """Record a forwarded job's end with its output (slurml's zip, or an empty one)."""
        spool = self.store.spool()
        spool.write(EMPTY_ZIP if output is None else output)
        try:
            finished = self.store.finish(job["id"], status, message, None, spool, was=RUNNING,
                                         slurm_id=job["slurm_id"])
        finally:
            spool.discard()
        if finished:
            self.runner.metrics.job_finished(max(0.0, time.time() - (job["started_at"] or 0)))
            self.log("job", job=job["id"], status=status,
                     message=None if status == SUCCESS else message)
        return finished

    def cancel(self, job):
        """End a forwarded job here (slurml has no cancel). True if it was still running."""
        for _ in range(2):  # once more if it was being forwarded at that very moment
            if self.end(job, CANCELLED, "job cancelled (slurml has no cancel: it may still "
                        f"run there as job {job['slurm_id']})"):
                return True
            job = self.store.get(job["id"])
            if job is None or job["status"] != RUNNING:
                return False
        return False


# ====================================================================================
# HTTP: request bodies
# ====================================================================================

class RequestBody:
    """One request's body as a stream (Content-Length or chunked), capped at `limit`.

    read() returns b"" at the end. A body that ends early, is malformed or grows past
    the cap raises a JobdError; the handler then closes the connection.
    """

    MIN_RATE = 1 * KiB  # bytes a second, on average, once `timeout` seconds have passed

    def __init__(self, rfile, headers, limit, timeout=60.0):
        self.rfile, self.limit, self.timeout = rfile, limit, timeout
        self.started = time.monotonic()
        self.received = 0
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self.left = 0       # bytes left in the body (or in the current chunk)
        self.done = False
        if headers.get("Transfer-Encoding") and not self.chunked:
            raise BadRequest("unsupported Transfer-Encoding")
        if not self.chunked:
            length = headers.get("Content-Length", "0").strip()
            if not (length.isascii() and length.isdigit()):
                raise BadRequest(f"invalid Content-Length {length[:40]!r}")
            self.left = int(length) if len(length) <= 18 else math.inf  # (int() refuses 4,300)
            if self.left > limit:
                raise PayloadTooLarge(f"request body of {length[:40]} bytes is larger than the "
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
        data = self.rfile.read1(min(size, self.left))  # what has come, so the rate is checked
        if not data:
            raise BadRequest("request body ended early")
        self.left -= len(data)
        self.received += len(data)
        elapsed = time.monotonic() - self.started
        if elapsed > self.timeout and self.received < self.MIN_RATE * elapsed:
            raise RequestTimeout("the request body is arriving too slowly")
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
        size = line.split(b";")[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size):  # int() takes "-2", "0x1", "1_0"
            raise BadRequest("malformed chunked body")
        self.left = int(size, 16)
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

    KNOWN = ("id", "slurml", "timeout", "callback", "slurm")
    SMALL, LARGE = 64 * KiB, 16 * MiB
    SMALL_BODY = 1 * MiB
    STRUCTURE = re.compile(rb'["\[\]{}]')
    VALUE_END = re.compile(rb"[,}\]\s]")
    ESCAPES = {ord("/"): b"/", ord("\\"): b"\\", ord('"'): b'"', ord("n"): b"\n",
               ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("f"): b"\f"}

    def __init__(self, body, spool):
        self.body, self.spool = body, spool
        self.buf = bytearray()
        self.pos = 0

    def read(self):
        """(fields, input_given): the known keys' values, and whether "input" was a string.
        A small body is parsed whole by json.loads, with the same rules (much faster)."""
        if not self.body.chunked and self.body.left <= self.SMALL_BODY:
            return self.read_whole()
        fields, input_given, input_error = {}, False, None
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
                    input_error = self.stream_input()  # raised below, unless replaced
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
                if input_given and input_error is not None:
                    raise input_error
                return fields, input_given

    def read_whole(self):
        data = b"".join(iter(self.body.read, b""))
        try:
            document = json.loads(data, strict=False)  # a raw newline in "input" passes
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"invalid JSON: {e}") from None
        if not isinstance(document, dict):
            raise BadRequest("the body must be a JSON object")
        fields, given = {}, None
        for key, value in document.items():  # in order: the last of duplicates wins
            key = key.lower()
            if key == "input":
                given = value
            elif key in self.KNOWN:
                fields[key] = value
        if given is not None and not isinstance(given, str):
            raise BadRequest('invalid JSON: "input" must be a base64 string')
        if given is not None:
            sink = Base64File(self.spool)
            sink.write(given.encode("utf-8", "replace"))
            sink.close()
        return fields, given is not None

    @staticmethod
    def loads(raw):
        try:
            return json.loads(raw, strict=False)  # as read_whole: control characters pass
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
        """Decode the "input" string into the spool, never holding it whole; the error if
        it is not base64 (raised only if no later "input" key replaces it, as in Go)."""
        self.pos += 1  # the opening quote
        self.spool.seek(0)
        self.spool.f.truncate()  # a repeated "input" key replaces the earlier one
        sink, error = Base64File(self.spool), None

        def write(data):
            nonlocal error
            if error is None:
                try:
                    sink.write(data)
                except BadRequest as e:
                    error = e

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
                write(bytes(buf[pos:end]))
                self.pos = end
            if self.pos >= len(buf):
                continue
            if buf[self.pos] == 0x22:
                self.pos += 1
                break
            write(self.take_escape())
        if error is None:
            try:
                sink.close()
            except BadRequest as e:
                error = e
        return error

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


# -- multipart/form-data (for the job-orchestrator's POST /submit) --------------------
# A small, strict, streaming reader (RFC 7578, RFC 2046): part data is scanned with
# bytes.find and written out as it arrives, so memory holds at most one read plus one
# boundary, whatever the size of the parts. (The standard library's cgi module is gone.)
# What it accepts is what job-orchestrator's server sends through reqwest's multipart
# Form, read strictly:
# - the body starts with "--boundary" (a preamble of at most max_header_bytes is skipped,
#   as RFC 2046 allows); CRLF line endings only; a boundary line may end in spaces/tabs;
# - a delimiter inside part data that is not followed by "--" or CRLF is an error, not
#   data: RFC 2046 forbids the boundary inside parts, so such a body is corrupt or forged;
# - each part has `Content-Disposition: form-data` with a name; values are quoted strings
#   (backslash escapes, as reqwest writes filename="a\"b") or unquoted up to the next
#   `; param=` (reqwest leaves ( ) ; = @ [ \ ] raw in `name*=utf-8''...`); name*= and
#   filename*= are read only as utf-8''percent-encoded, and win over name= and filename=;
# - folded lines, bare CR or LF, control characters, repeated headers or parameters are
#   errors; a completely empty body is a form with no parts (what reqwest sends for an
#   empty folder); the closing "--boundary--" is required, the epilogue is discarded.

class MultipartError(BadRequest):
    """The request body is not a well-formed multipart/form-data body."""


class MissingBoundary(MultipartError):
    """No usable boundary parameter, or the body does not start with the boundary."""


class TruncatedBody(MultipartError):
    """The body ended before the closing boundary."""


class PartHeadersTooLarge(MultipartError):
    """A part's header section (or the preamble) is larger than allowed."""


class MalformedPart(MultipartError):
    """A part's headers or a boundary line do not follow the grammar."""


class TooManyParts(MultipartError):
    """The body holds more parts than allowed."""


HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
OPTIONAL_SPACE = re.compile(r"[ \t]*")
QUOTED_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
PARAM_START = re.compile(r";[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+[ \t]*=")
LAST_SEMICOLON = re.compile(r";[ \t]*\Z")
UNQUOTED_VALUE = re.compile(r'[^\x00-\x20"\x7f]+')
# RFC 2046 bchars; a space is allowed inside but not at the end.
BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def parse_params(text, what):
    """`; name=value` pairs (value quoted or not) as a dict with lower-case names."""
    params = {}
    i, end = 0, len(text)
    while i < end:  # each turn consumes at least the ';'
        i = OPTIONAL_SPACE.match(text, i).end()
        if i == end:
            break
        if text[i] != ";":
            raise MalformedPart(f"{what}: expected ';' at {text[i:i + 20]!r}")
        i = OPTIONAL_SPACE.match(text, i + 1).end()
        if i == end:
            break  # a trailing ';' is harmless
        match = HTTP_TOKEN.match(text, i)
        if not match:
            raise MalformedPart(f"{what}: bad parameter name at {text[i:i + 20]!r}")
        name = match.group().lower()
        i = OPTIONAL_SPACE.match(text, match.end()).end()
        if i == end or text[i] != "=":
            raise MalformedPart(f"{what}: parameter {name!r} has no value")
        i = OPTIONAL_SPACE.match(text, i + 1).end()
        if i < end and text[i] == '"':
            match = QUOTED_STRING.match(text, i)
            if not match:
                raise MalformedPart(f"{what}: unterminated quoted value for {name!r}")
            value, next_i = QUOTED_PAIR.sub(r"\1", match.group(1)), match.end()
        else:
            next_i = i  # unquoted: up to the next ';' that starts a parameter
            while True:  # bounded: next_i grows
                next_i = text.find(";", next_i)
                if (next_i < 0 or PARAM_START.match(text, next_i)
                        or LAST_SEMICOLON.match(text, next_i)):
                    next_i = end if next_i < 0 else next_i
                    break
                next_i += 1
            value = text[i:next_i].rstrip(" \t")
            if not UNQUOTED_VALUE.fullmatch(value):
                raise MalformedPart(f"{what}: bad value for {name!r} at {text[i:i + 20]!r}")
        if name in params:
            raise MalformedPart(f"{what}: parameter {name!r} given twice")
        params[name] = value
        i = next_i
    return params


def parse_boundary(content_type):
    """The boundary (bytes) of a `multipart/form-data; boundary=...` Content-Type."""
    if not content_type:
        raise MissingBoundary("no Content-Type: expected multipart/form-data; boundary=...")
    media_type, sep, rest = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        raise MissingBoundary(f"Content-Type is {media_type.strip()!r}, "
                              "not multipart/form-data")
    try:
        params = parse_params(sep + rest, "Content-Type")
    except MalformedPart as e:
        raise MissingBoundary(e.message) from None
    boundary = params.get("boundary")
    if boundary is None:
        raise MissingBoundary("Content-Type multipart/form-data has no boundary parameter")
    if not BOUNDARY.fullmatch(boundary):
        raise MissingBoundary(f"invalid boundary {boundary[:80]!r}: "
                              "1 to 70 of the characters RFC 2046 allows")
    return boundary.encode("ascii")


def ext_value(value, what):
    """Decode an RFC 8187 ext-value; only UTF-8 (reqwest sends utf-8''...)."""
    charset, quote1, rest = value.partition("'")
    _language, quote2, encoded = rest.partition("'")
    if not (quote1 and quote2):
        raise MalformedPart(f"{what}: expected charset'language'value, got {value[:80]!r}")
    if charset.lower() != "utf-8":
        raise MalformedPart(f"{what}: charset {charset!r} is not supported, only UTF-8")
    try:
        return unquote(encoded, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise MalformedPart(f"{what}: percent-encoded value is not UTF-8") from None


def parse_disposition(value):
    """(name, filename) of a `form-data` Content-Disposition; filename None when absent."""
    kind, sep, rest = value.partition(";")
    if kind.strip().lower() != "form-data":
        raise MalformedPart(f"Content-Disposition is {kind.strip()!r}, not form-data")
    params = parse_params(sep + rest, "Content-Disposition")
    found = {}
    for key in ("name", "filename"):
        if key + "*" in params:  # the extended form wins (RFC 6266 section 4.3)
            found[key] = ext_value(params[key + "*"], f"Content-Disposition {key}*")
        else:
            found[key] = params.get(key)
    if found["name"] is None:
        raise MalformedPart("Content-Disposition form-data has no name (RFC 7578 section 4.2)")
    return found["name"], found["filename"]


def parse_part_headers(raw):
    """A part's header block (without the blank line) as {lower-case name: value}."""
    headers = {}
    for line in raw.split(b"\r\n"):
        if b"\r" in line or b"\n" in line:
            raise MalformedPart("bare CR or LF in part headers")
        if line[:1] in (b" ", b"\t"):
            raise MalformedPart("folded header lines are not allowed")
        name, colon, value = line.partition(b":")
        if not colon or not HTTP_TOKEN.fullmatch(name.decode("latin-1")):
            raise MalformedPart(f"malformed part header line {line[:80]!r}")
        try:
            text = value.strip(b" \t").decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPart(f"part header {name[:40]!r} is not UTF-8") from None
        if CONTROL_CHARS.search(text):
            raise MalformedPart(f"control character in part header {name[:40]!r}")
        key = name.decode("ascii").lower()
        if key in headers:
            raise MalformedPart(f"part header {key!r} given twice")
        headers[key] = text
    if "content-disposition" not in headers:
        raise MalformedPart("part without a Content-Disposition header")
    return headers


class BodyBuffer:
    """The body read so far: `buf[pos:]` are the bytes read but not consumed yet."""

    def __init__(self, body, chunk_size):
        self.body, self.chunk_size = body, chunk_size
        self.buf, self.pos, self.total, self.eof = b"", 0, 0, False

    def more(self):
        """Read one more chunk onto the buffer; False at the end of the body."""
        if self.eof:
            return False
        data = self.body.read(self.chunk_size)
        if not data:
            self.eof = True
            return False
        self.total += len(data)
        # Only the unconsumed tail is copied: at most a boundary, or a header block.
        self.buf = self.buf[self.pos:] + data
        self.pos = 0
        return True

    def available(self):
        return len(self.buf) - self.pos


def after_delimiter(src, cap):
    """Consume what follows a boundary: True for the closing '--', False when a part follows."""
    while src.available() < 2:
        if not src.more():
            raise TruncatedBody("the body ends right after a boundary, before the closing '--'")
    if src.buf.startswith(b"--", src.pos):
        src.pos += 2
        return True
    while True:  # transport padding (spaces, tabs) then CRLF; bounded by cap
        i = src.buf.find(b"\r\n", src.pos)
        padding = src.buf[src.pos:i if i >= 0 else len(src.buf)]
        if i < 0 and padding.endswith(b"\r"):
            padding = padding[:-1]
        if padding.strip(b" \t"):
            raise MalformedPart(f"a boundary is followed by {padding[:40]!r}, not CRLF or '--'"
                                " (the boundary string must not occur inside part data)")
        if i >= 0:
            src.pos = i + 2
            return False
        if src.available() > cap:
            raise PartHeadersTooLarge(f"more than {cap} bytes of padding after a boundary")
        if not src.more():
            raise TruncatedBody("the body ends inside a boundary line")


def read_part_headers(src, cap):
    """Consume a part's header section; return it without the final blank line."""
    scanned = 0  # bytes after src.pos known to hold no start of CRLFCRLF
    while True:
        if src.available() >= 2 and src.buf.startswith(b"\r\n", src.pos):
            src.pos += 2
            return b""
        i = src.buf.find(b"\r\n\r\n", src.pos + scanned)
        if i >= 0:
            raw = src.buf[src.pos:i]
            if len(raw) > cap:
                break
            src.pos = i + 4
            return raw
        if src.available() > cap:
            break
        scanned = max(0, src.available() - 3)
        if not src.more():
            raise TruncatedBody("the body ends inside a part's headers")
    raise PartHeadersTooLarge(f"a part's header section is larger than {cap} bytes")


def copy_part_data(src, delimiter, out):
    """Write part data to `out` (or drop it when None) up to and past the next delimiter."""
    keep = len(delimiter) - 1  # a delimiter may straddle two reads
    while True:
        i = src.buf.find(delimiter, src.pos)
        if i >= 0:
            if out is not None and i > src.pos:
                out.write(memoryview(src.buf)[src.pos:i])
            src.pos = i + len(delimiter)
            return
        safe = len(src.buf) - keep
        if safe > src.pos:
            if out is not None:
                out.write(memoryview(src.buf)[src.pos:safe])
            src.pos = safe
        if not src.more():
            raise TruncatedBody("the body ends inside a part: no closing boundary")


def read_multipart(body, boundary, open_part, *, max_header_bytes=16 * KiB, max_parts=10000,
                   chunk_size=64 * KiB):
    """Stream a multipart/form-data body part by part; return the number of parts.

    `body.read(n)` returns up to n bytes and b"" where the request body ends (a
    RequestBody); the body is read to its end. For each part, `open_part(headers, name,
    filename)` gets its headers (lower-case names), field name and filename (None when
    absent; not yet made safe: see safe_basename) and returns a binary file, or None to
    skip the part. The data is written to it as it arrives; it is closed when the part
    ends or the body turns out malformed. Raises a MultipartError for a malformed body.
    """
    if not isinstance(boundary, bytes) or not BOUNDARY.fullmatch(boundary.decode("latin-1")):
        raise MissingBoundary(f"invalid boundary {boundary!r}")
    if chunk_size < 1 or max_header_bytes < 1 or max_parts < 0:
        raise ValueError("chunk_size and max_header_bytes must be positive, max_parts >= 0")
    src = BodyBuffer(body, chunk_size)
    dash_boundary = b"--" + boundary
    delimiter = b"\r\n" + dash_boundary

    while True:  # the opening boundary, after an optional (small) preamble
        if src.available() >= len(dash_boundary) and src.buf.startswith(dash_boundary):
            src.pos = len(dash_boundary)
            break
        i = src.buf.find(delimiter)
        if i >= 0:
            src.pos = i + len(delimiter)
            break
        if src.available() > max_header_bytes + len(delimiter):
            raise MissingBoundary(f"no opening boundary in the first {max_header_bytes} bytes")
        if not src.more():
            if src.total == 0:
                return 0  # an empty form
            if dash_boundary.startswith(src.buf):
                raise TruncatedBody("the body ends inside the opening boundary")
            raise MissingBoundary("the body does not start with the boundary")

    parts = 0
    while not after_delimiter(src, max_header_bytes):  # bounded: each part consumes input
        parts += 1
        if parts > max_parts:
            raise TooManyParts(f"more than {max_parts} parts")
        headers = parse_part_headers(read_part_headers(src, max_header_bytes))
        name, filename = parse_disposition(headers["content-disposition"])
        out = open_part(headers, name, filename)
        try:
            copy_part_data(src, delimiter, out)
        finally:
            if out is not None:
                out.close()
    src.buf, src.pos = b"", 0
    while src.more():  # the epilogue; bounded by the body's length
        src.buf, src.pos = b"", 0
    return parts


def safe_basename(filename):
    """The last path component of an uploaded file name, or ValueError.

    The orchestrator sends each file with its basename as filename (the relative path is
    the field name) and its own client saves it as <job dir>/<basename>; so a name is cut
    after its last '/', and after its last '\\' too (Windows clients send C:\\dir\\run.sh,
    and a '\\' kept in a name becomes a separator when a Windows tool unpacks the result).
    Refused: '', '.', '..', control characters, invalid Unicode, more than 255 bytes.
    """
    if not isinstance(filename, str):
        raise ValueError("file name must be a string")
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise ValueError(f"file name {filename[:80]!r} has no usable last component")
    if CONTROL_CHARS.search(name) or "\t" in name:
        raise ValueError(f"file name {filename[:80]!r} contains a control character")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"file name {filename[:80]!r} is not valid Unicode") from None
    if size > 255:
        raise ValueError(f"file name is {size} bytes long; at most 255 are allowed")
    return name


# ====================================================================================
# HTTP: the job-orchestrator client protocol
# ====================================================================================
# rvhonorato/job-orchestrator's server mode dispatches jobs to a "client" in each
# container: POST /submit (multipart, one part per file), GET /retrieve/{id} every
# 500 ms, GET /retrieve_partial/{id}, POST /kill/{id}. jobd speaks that protocol beside
# its own APIs, on the same store. The mapping of our states follows from what the
# server does with the answers (../shared/spec/job-orchestrator-client.md; README:
# "Using jobd with job-orchestrator"):
# - only exactly 200 with application/zip counts as done, so success is answered only
#   as the zip of the job folder (a JSON "Completed" would make its download fail);
# - any other 2xx must be a Payload whose status it copies: waiting and running jobs are
#   "Running" ("Queued" makes it send the job again; "Prepared" is not counted against
#   its run limits, and older servers stop polling it);
# - errors, 404 included, are polled again forever: so an id that jobd issued and no
#   longer holds (retention, a wiped store) is "Cleaned", and only an id never issued
#   is 404.
# The orchestrator's id for a job is a number jobd issues (Store.issue_orchestrator_id);
# the same job is the jobd job whose id is that number in decimal, for the other APIs.

ZIP_TYPE = "application/zip"
ORCH_STATUS = {QUEUED: "Running", RUNNING: "Running", FAILED: "Failed", CANCELLED: "Killed"}
ORCH_STATUSES = ("Prepared", "Running", "Completed", "Failed", "Invalid", "Killed", "Cleaned",
                 "Unknown")
# The routes that touch jobs; with a token set they need it (Handler.authorize).
ORCH_GUARDED = re.compile(r"/(submit|retrieve|retrieve_partial|kill)(/.*)?")


def orchestrator_payload(number, status, loc="", pid=0, killed=False):
    """The orchestrator's Payload: every key is required by its server."""
    return {"id": number, "input": {}, "status": status, "loc": loc, "pid": pid,
            "killed": killed}


def orchestrator_status(job):
    """The Payload status of a job submitted through the protocol (success is the zip)."""
    if job["refused"]:
        return "Invalid"
    return ORCH_STATUS.get(job["status"], "Failed" if job["status"] in FINISHED else "Running")


def basic_credentials(value):
    """The user and the password of a Basic Authorization value; () if it is malformed."""
    try:
        text = base64.b64decode(value.strip(), validate=True).decode()
        user, colon, password = text.partition(":")
    except (binascii.Error, ValueError):
        return ()
    return (user, password) if colon else (user,)


def parse_orchestrator_id(text):
    if not re.fullmatch(r"[0-9]{1,10}", text) or not 1 <= int(text) <= ORCH_ID_MAX:
        raise BadRequest(f"invalid job id {text[:40]!r}: a number from 1 to {ORCH_ID_MAX}")
    return int(text)


def create_orchestrator_job(store, create):
    """Issue an orchestrator id and create its job with create(job id); the number."""
    for _ in range(100):
        number = store.issue_orchestrator_id()
        try:
            create(str(number))
            return number
        except Conflict:
            continue  # an upload through another API took that id meanwhile
    raise JobdError("could not find a free job id")


class Submission:
    """The files of one POST /submit, written into a staging folder as they arrive.

    As the orchestrator's own client does, parts without a filename are skipped and a
    file is saved under the basename of its filename (sub-folders flattened); the last
    of files with the same name wins. An unsafe name refuses the whole submission (it
    is answered Invalid, like one without run.sh).
    """

    def __init__(self, folder, log):
        self.folder, self.log = folder, log
        self.names = []
        self.refusal = None

    def open_part(self, headers, field, filename):
        if filename is None or self.refusal:
            return None
        try:
            name = safe_basename(filename)
        except ValueError as e:
            self.refusal = f"unsafe file name in the submission: {e}"
            return None
        if name in self.names:
            self.log("submission duplicate file", name=name, field=field, kept="last")
            self.names.remove(name)
        self.names.append(name)
        fd = os.open(os.path.join(self.folder, name),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        return open(fd, "wb")

    def problem(self):
        """Why the submission is refused, or None."""
        if self.refusal:
            return self.refusal
        if not self.names:
            return "the submission holds no files"
        if RUN_SH not in self.names:
            return "the submission has no run.sh"
        return None


class CpuMeter:
    """The machine's CPU use in percent (for GET /load), from /proc/stat: over the time
    since the previous reading when that is recent, else over a new 0.1 s window."""

    def __init__(self):
        self.lock = threading.Lock()
        self.last = None   # (monotonic time, busy ticks, all ticks) of the previous reading
        self.value = 0.0

    @staticmethod
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(field) for field in f.readline().split()[1:9]]
        idle = ticks[3] + ticks[4]  # idle and iowait
        return time.monotonic(), sum(ticks) - idle, sum(ticks)

    def percent(self):
        try:
            with self.lock:
                now = self.sample()
                if self.last is None or now[0] - self.last[0] > 10:
                    self.last = now
                    time.sleep(0.1)
                    now = self.sample()
                busy, total = now[1] - self.last[1], now[2] - self.last[2]
                if total > 0:  # else too soon after the previous reading: repeat it
                    self.value = round(100.0 * busy / total, 1)
                    self.last = now
                return self.value
        except (OSError, ValueError, IndexError):  # no /proc: the load average instead
            try:
                return min(100.0, round(100.0 * os.getloadavg()[0] / (os.cpu_count() or 1), 1))
            except OSError:
                return 0.0


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


def read_line(rfile, limit, sock=None, deadline=None):
    """One line (up to limit+1 bytes), by at most one recv() at a time, so a deadline
    holds even against a client that sends one byte at a time."""
    line = b""
    while len(line) <= limit:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request headers took too long")
            sock.settimeout(left)
        data = rfile.peek(1)[: limit + 1 - len(line)]
        if not data:
            break
        end = data.find(b"\n")
        line += rfile.read(end + 1 if end >= 0 else len(data))
        if end >= 0:
            break
    return line


def read_headers(rfile, sock=None, timeout=None, most=100):
    """Read a request's header section (http.server sends it through the email package,
    which costs a third of the CPU time of a small request). The whole section must come
    within `timeout` seconds, so a client trickling it in cannot hold a thread forever."""
    headers = Headers()
    deadline = time.monotonic() + timeout if timeout else None
    arrived = rfile.peek(1)  # within the socket's own time-out (the request timeout)
    end = arrived.find(b"\r\n\r\n")
    if arrived.startswith(b"\r\n"):
        rfile.read(2)
        return headers
    if 0 <= end and arrived.count(b"\r\n", 0, end) < most:  # the usual case: all there
        for line in rfile.read(end + 4)[:end].split(b"\r\n"):
            add_header(headers, line)
        return headers
    try:
        for _ in range(most):
            line = read_line(rfile, 64 * KiB, sock, deadline)
            if len(line) > 64 * KiB:
                raise HeadersTooLarge("a request header line is too long")
            if line in (b"\r\n", b"\n", b""):
                return headers
            add_header(headers, line.rstrip(b"\r\n"))
        raise HeadersTooLarge(f"more than {most} request headers")
    finally:
        if deadline is not None:
            sock.settimeout(timeout)


def add_header(headers, line):
    name, colon, value = line.decode("iso-8859-1").partition(":")
    if not colon or not name or name != name.strip():
        raise BadRequest(f"malformed request header {line[:60]!r}")
    key, value = name.lower(), value.strip()
    if key in headers:
        if key in ("content-length", "transfer-encoding", "host"):
            raise BadRequest(f"repeated {name} header")
        value = headers[key] + ", " + value
    dict.__setitem__(headers, key, value)


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
    (r"/api/openapi\.json", {"GET": "openapi"}),
    (r"/healthz", {"GET": "healthz"}),
    (r"/metrics", {"GET": "metrics"}),
    # the job-orchestrator client protocol
    (r"/submit", {"POST": "orch_submit"}),
    (r"/retrieve/(?P<number>[^/]+)", {"GET": "orch_retrieve"}),
    (r"/retrieve_partial/(?P<number>[^/]+)", {"GET": "orch_retrieve_partial"}),
    (r"/kill/(?P<number>[^/]+)", {"POST": "orch_kill"}),
    (r"/load", {"GET": "orch_load"}),
    (r"/health", {"GET": "orch_health"}),
    (r"/", {"GET": "orch_ping"}),
]
COMPILED_ROUTES = [(re.compile(pattern), methods) for pattern, methods in ROUTES]


def openapi_document():
    """The OpenAPI 3 description of the API: every route above, with its bodies."""
    def ref(name):
        return {"$ref": f"#/components/schemas/{name}"}

    def json_body(schema):
        return {"content": {"application/json": {"schema": schema}}}

    def answers(**codes):
        """{"200": ...}: each code maps to a schema name, a full response, or a description."""
        result = {}
        for code, what in codes.items():
            code = code.lstrip("_")
            if isinstance(what, dict):
                result[code] = what
            elif what in SCHEMAS:
                result[code] = {"description": what, **json_body(ref(what))}
            else:
                result[code] = {"description": what}
        return result

    def errors(*codes):
        return {f"_{code}": {"description": HTTPStatus(code).phrase, **json_body(ref("Error"))}
                for code in (401,) + codes}

    def operation(name, summary, responses, body=None, parameters=()):
        op = {"operationId": name, "summary": summary, "responses": responses,
              "parameters": list(parameters)}
        if body:
            op["requestBody"] = {"required": True, "content": body}
        return op

    def created(schema):
        """A 201 answer, linked to the operations that take the new job's id."""
        targets = ["getJob", "getStatus", "getOutput", "getLog", "cancelJob", "deleteJob"]
        return {"description": "accepted", **json_body(ref(schema)),
                "links": {target: {"operationId": target,
                                   "parameters": {"id": "$response.body#/ID"}}
                          for target in targets}}

    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
              "description": "job id: [A-Za-z0-9][A-Za-z0-9._-]*, at most 128 characters"}
    zip_body = {kind: {"schema": {"type": "string", "format": "binary"}}
                for kind in ("application/zip", "application/octet-stream")}
    zip_answer = {"description": "the result zip",
                  "content": {"application/zip": {"schema": {"type": "string",
                                                             "format": "binary"}}}}
    text_answer = {"description": "text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    number = {"name": "number", "in": "path", "required": True,
              "schema": {"type": "integer", "minimum": 1, "maximum": ORCH_ID_MAX},
              "description": "the job's number, as jobd answered it to POST /submit"}
    orchestrator_security = [{"token": []}, {"basic": []}, {}]
    job_options = [
        {"name": "X-Jobd-Timeout", "in": "header", "required": False,
         "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
         "description": "time limit in seconds (capped by --max-timeout)"},
        {"name": "X-Jobd-Callback", "in": "header", "required": False,
         "schema": {"type": "string"}, "description": "URL to POST the status to at the end"},
        {"name": "X-Jobd-Slurm", "in": "header", "required": False,
         "schema": {"type": "string"}, "example": "partition=short; time=10",
         "description": "the job's own sbatch options, 'name=value; name' (only those the "
                        "server allows: --slurm-job-options)"}]
    paths = {
        "/api/upload": {"post": operation(
            "upload", "Submit a job, Go style: the zip as base64 inside JSON",
            answers(_201=created("Job"), **errors(400, 409, 413, 429)),
            {"application/json": {"schema": ref("Upload"), "example": {
                "id": "example", "input": base64.b64encode(EXAMPLE_ZIP).decode()}}})},
        "/api/get/{id}": {"get": operation(
            "getJob", "A job with its output (base64 zip), Go style",
            answers(_200="Job", _206="Job", _202="Error", **errors(404)), None, [job_id])},
        "/api/jobs": {
            "get": operation("listJobs", "List jobs, newest first",
                             answers(_200="JobList", **errors(400)),
                             None, [
                                 {"name": "status", "in": "query", "required": False,
                                  "schema": {"type": "string"},
                                  "description": "state(s), comma-separated"},
                                 {"name": "limit", "in": "query", "required": False,
                                  "schema": {"type": "integer", "minimum": 1,
                                             "maximum": LIST_LIMIT}},
                                 {"name": "cursor", "in": "query", "required": False,
                                  "schema": {"type": "string"}}]),
            "post": operation("postJob", "Submit a zip; jobd picks the id",
                              answers(_201=created("Status"), **errors(400, 413, 429)),
                              zip_body, job_options)},
        "/api/jobs/{id}": {
            "get": operation("getStatus", "A job's status", answers(_200="Status", **errors(404)),
                             None, [job_id]),
            "put": operation("putJob", "Submit a zip under this id",
                             answers(_201=created("Status"), **errors(400, 409, 413, 429)),
                             zip_body, [job_id] + job_options),
            "delete": operation("deleteJob", "Cancel if needed, then remove the job and its files",
                                answers(_204="removed", **errors(404)), None, [job_id])},
        "/api/jobs/{id}/output": {"get": operation(
            "getOutput", "The result zip (Range, If-Range, If-None-Match honoured)",
            answers(_200=zip_answer, _206=zip_answer, _202="Status", _304="not modified",
                    **errors(404, 416)), None, [job_id])},
        "/api/jobs/{id}/logs/{stream}": {"get": operation(
            "getLog", "The job's stdout or stderr so far; follow=1 streams it until the job "
            "ends; offset=N leaves out the first N bytes (header Jobd-Log-Offset: N)",
            answers(_200=text_answer, **errors(400, 404)), None, [
                job_id, {"name": "stream", "in": "path", "required": True,
                         "schema": {"type": "string", "enum": ["stdout", "stderr"]}},
                {"name": "follow", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": ["0", "1"]}},
                {"name": "offset", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}}])},
        "/api/jobs/{id}/cancel": {"post": operation(
            "cancelJob", "Cancel a queued or running job", answers(_200="Status", **errors(404, 409)), None,
            [job_id])},
        "/api/openapi.json": {"get": operation("openapi", "This document", answers(
            _200={"description": "OpenAPI 3", **json_body({"type": "object"})}, **errors()))},
        "/healthz": {"get": operation("health", "Health (never behind the token)",
                                      answers(_200="Health", _503="Health"))},
        "/metrics": {"get": operation("metrics", "Prometheus metrics", answers(
            _200={"description": "text exposition format",
                  "content": {"text/plain": {"schema": {"type": "string"}}}}, **errors()))},
        # The job-orchestrator client protocol: see its section for why it answers so.
        "/submit": {"post": dict(operation(
            "orchestratorSubmit", "job-orchestrator: a job's files, one part per file",
            answers(_200="Payload", **errors(400, 413, 429)),
            {"multipart/form-data": {"schema": {
                "type": "object", "additionalProperties": dict(_STRING, format="binary")}}}),
            security=orchestrator_security)},
        "/retrieve/{number}": {"get": dict(operation(
            "orchestratorRetrieve", "job-orchestrator: the result zip, else the job's state",
            answers(_200={"description": "the zip once the job succeeded, else its Payload",
                          "content": {**zip_answer["content"],
                                      **json_body(ref("Payload"))["content"]}},
                    _404="Payload", **errors(400)), None, [number]),
            security=orchestrator_security)},
        "/retrieve_partial/{number}": {"get": dict(operation(
            "orchestratorPartial", "job-orchestrator: a zip of the job folder as it is now",
            answers(_200=zip_answer, _404="Payload", **errors(400)), None, [number]),
            security=orchestrator_security)},
        "/kill/{number}": {"post": dict(operation(
            "orchestratorKill", "job-orchestrator: cancel a job (empty answer)",
            answers(_200={"description": "stopped, or nothing left to stop",
                          "content": {"text/plain": {"schema": dict(_STRING, maxLength=0)}}},
                    _404="Payload", **errors(400)), None, [number]),
            security=orchestrator_security)},
        "/load": {"get": operation("orchestratorLoad", "CPU use of the machine in percent",
                                   answers(_200={"description": "percent", **json_body(
                                       {"type": "number", "minimum": 0, "maximum": 100})}))},
        "/health": {"get": operation("orchestratorHealth", "Health, as job-orchestrator's",
                                     answers(_200="OrchestratorHealth",
                                             _503="OrchestratorHealth"))},
        "/": {"get": operation("orchestratorPing", "pong", answers(_200={
            "description": "pong", **json_body(_object({"message": _STRING}))}))},
    }
    return {"openapi": "3.0.3",
            "info": {"title": "jobd", "version": __version__,
                     "description": "A job daemon: submit a zip holding run.sh, get a zip back."},
            "paths": paths,
            "components": {"schemas": SCHEMAS,
                           "securitySchemes": {"token": {"type": "http", "scheme": "bearer"},
                                               "basic": {"type": "http", "scheme": "basic"}}},
            "security": [{"token": []}, {}]}


def _example_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("run.sh", "echo hello from jobd\n")
    return buf.getvalue()


EXAMPLE_ZIP = _example_zip()


def _object(properties, required=None):
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required}


_STRING, _BOOL = {"type": "string"}, {"type": "boolean"}
_INT, _TIME = {"type": "integer"}, {"type": "string", "format": "date-time"}
_NULL_INT, _NULL_TIME = dict(_INT, nullable=True), dict(_TIME, nullable=True)
_STATE = {"type": "string", "enum": list(STATES)}
SCHEMAS = {
    "Upload": _object({"id": _STRING, "input": dict(_STRING, format="byte"), "slurml": _BOOL,
                       "timeout": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
                       "callback": _STRING,
                       "slurm": {"type": "object", "description": "the job's own sbatch "
                                 "options, e.g. {\"time\": \"10\"} (only those the server "
                                 "allows: --slurm-job-options)",
                                 "additionalProperties": {"oneOf": [
                                     _STRING, _INT, {"type": "boolean", "enum": [True]}]}}},
                      required=["id", "input"]),
    "Job": _object({"LastUpdated": _TIME, "ID": _STRING, "Status": _STATE, "Path": _STRING,
                    "Input": _STRING, "Output": _STRING, "Message": _STRING, "SlurmID": _INT,
                    "Slurml": _BOOL, "ExitCode": _NULL_INT}),
    "Status": _object({"LastUpdated": _TIME, "ID": _STRING, "Status": _STATE, "Path": _STRING,
                       "Message": _STRING, "SlurmID": _INT, "Slurml": _BOOL,
                       "ExitCode": _NULL_INT, "CreatedAt": _NULL_TIME, "StartedAt": _NULL_TIME,
                       "FinishedAt": _NULL_TIME, "InputBytes": _INT,
                       "OutputBytes": _NULL_INT}),
    "JobList": _object({"Jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Status"}},
                        "Next": dict(_STRING, nullable=True)}),
    "Error": _object({"error": _STRING, "message": _STRING, "status": _INT}),
    "Health": _object({"status": {"type": "string", "enum": ["ok", "error"]},
                       "version": _STRING, "uptime_seconds": {"type": "number"},
                       "queued": _INT, "running": _INT, "data_free_bytes": _NULL_INT,
                       "database": _STRING, "data_dir": _STRING}),
    "Payload": _object({"id": {"type": "integer", "minimum": 0, "maximum": ORCH_ID_MAX},
                        "input": {"type": "object"}, "status": {"type": "string",
                                                                "enum": list(ORCH_STATUSES)},
                        "loc": _STRING, "pid": {"type": "integer", "minimum": 0},
                        "killed": _BOOL}),
    "OrchestratorHealth": _object({"status": {"type": "string", "enum": ["ok", "error"]},
                                   "database": _STRING}),
}


@functools.lru_cache(maxsize=4)
def http_date(seconds):
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(seconds))


def check_token(cfg, path, headers):
    """With a token configured, /api/ (and /metrics unless public) need the bearer
    token, and so do the job-orchestrator routes that touch jobs; those also take it as
    the user or password of Basic auth, which the orchestrator sends for a URL such as
    http://jobd:TOKEN@host/submit (it cannot send other headers). Compared in constant
    time."""
    token = cfg.token
    orchestrator = ORCH_GUARDED.fullmatch(path) is not None
    if not token or not (path.startswith("/api/") or path == "/api" or orchestrator or
                         (path == "/metrics" and not cfg.metrics_public)):
        return
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    offered = [given.strip()] if scheme.lower() == "bearer" else []
    if orchestrator and scheme.lower() == "basic":
        offered = [part for part in basic_credentials(given) if part]
    if not any(hmac.compare_digest(value.encode(), token.encode()) for value in offered):
        raise Unauthorized("missing or wrong token: send Authorization: Bearer <token>",
                           **{"WWW-Authenticate": "Bearer"})


def read_upload(body, spool, cfg):
    """Read and check a POST /api/upload body, its input going to `spool`:
    (job id, options for Store.add), or a JobdError saying what is wrong."""
    fields, input_given = UploadReader(body, spool).read()
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
    if slurml and not (cfg.slurml_url and cfg.slurml_token):
        raise BadRequest("slurml jobs are forwarded to a slurml service, and this jobd "
                         "has none: set SLURML_API_URL and SLURML_API_TOKEN")
    options = job_options(cfg, fields.get("timeout"), fields.get("callback"),
                          fields.get("slurm"), slurml=bool(slurml))
    check_input_zip(spool.file, cfg)
    return job_id, dict(options, slurml=bool(slurml))


def job_options(cfg, timeout, callback, slurm=None, slurml=False):
    """A job's validated options: its time limit (its own, else the server's default,
    capped by --max-timeout), its callback URL and its own sbatch options."""
    if timeout is not None:
        if isinstance(timeout, str):
            try:
                timeout = float(timeout)
            except ValueError:
                raise BadRequest(f"timeout must be a number of seconds, not {timeout!r}")
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not 0 < timeout < float("inf")):
            raise BadRequest(f"timeout must be a positive number of seconds, not {timeout!r}")
    timeout = timeout or cfg.timeout
    if cfg.max_timeout:
        timeout = min(timeout or cfg.max_timeout, cfg.max_timeout)
    if callback is not None:
        check_callback_url(callback, cfg.callback_allow)
    return {"timeout": timeout, "callback": callback,
            "slurm_options": check_slurm_options(slurm, cfg, slurml)}


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
        """Frontend may hand over a connection with an answer it could not send at once,
        and the bytes it has read of the next request."""
        self.app = self.server.app
        self.timeout = self.app.cfg.request_timeout
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        unsent, read = self.server.handed.pop(self.request, (b"", b""))
        if unsent:
            self.request.sendall(unsent)
        if read:
            self.rfile = io.BufferedReader(Prefixed(read, self.rfile.detach()))

    def parse_request(self):
        """http.server's request parsing, stricter and leaner: HTTP/1.0 and 1.1 only,
        headers through read_headers(). False (after answering) when the request is bad."""
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        self.status, self.body, self.headers, self.sent = None, None, Headers(), 0
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
            self.headers = read_headers(self.rfile, self.connection, self.timeout)
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
        if (length.isascii() and length.isdigit()
                and (len(length) > 18 or int(length) > self.app.cfg.max_upload)):
            self.send_failure(PayloadTooLarge(f"request body of {length[:40]} bytes is larger than "
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

    def __getattr__(self, name):
        """Any other method (TRACE, PROPFIND...) is routed too: 405 on a known path."""
        if name.startswith("do_") and name[3:].isalpha():
            return lambda: self.dispatch(name[3:])
        raise AttributeError(name)

    # -- dispatch ---------------------------------------------------------------------

    def dispatch(self, method):
        started = time.monotonic()
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        try:
            self.authorize(url.path)
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
            self.app.metrics.request(self.status, self.body.received if self.body else 0,
                                     self.sent)
            self.app.log("http", method=method, path=url.path, status=self.status,
                         ms=round((time.monotonic() - started) * 1000, 1),
                         client=self.client_address[0].removeprefix("::ffff:")
                         if self.client_address else None)

    def authorize(self, path):
        check_token(self.app.cfg, path, self.headers)

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
        raise NotFound(f"{NO_SUCH_ENDPOINT}: {path}")

    def request_body(self):
        self.body = RequestBody(self.rfile, self.headers, self.app.cfg.max_upload,
                                self.app.cfg.request_timeout)
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
                self.body = RequestBody(self.rfile, self.headers, self.app.cfg.max_upload,
                                        self.app.cfg.request_timeout)
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
                self.sent = length
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

    def send_file(self, f, first, count):
        """Copy `count` bytes of f from `first` to the client: by sendfile(2) for a real
        file (no copy through Python), else in blocks."""
        try:
            f.fileno()
        except (AttributeError, OSError, ValueError):
            f.seek(first)
            while count > 0:
                block = f.read(min(CHUNK, count))
                if not block:
                    raise ConnectionError("the file ended early")
                self.wfile.write(block)
                count -= len(block)
            return
        self.connection.sendfile(f, first, count)

    def send_failure(self, error):
        # (http.server's own refusals come before self.body exists, and close anyway)
        if error.status >= 400 and not self.close_connection and not self.body_read():
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

    def date_time_string(self, timestamp=None):
        """The Date header, formatted once a second (http.server's way goes through the
        email package for every answer)."""
        return http_date(int(time.time() if timestamp is None else timestamp))

    def log_request(self, code="-", size="-"):
        pass  # dispatch() logs one line per request, with its duration

    def log_message(self, format, *args):
        self.app.log("http error", level="warning", message=format % args)

    # -- the Go API -------------------------------------------------------------------

    def upload(self):
        """POST /api/upload: {"id", "input" (base64 zip)} -> 201 and the job object.
        (Frontend answers most uploads itself; this is the way for the rest.)"""
        app = self.app
        spool = app.store.spool()
        try:
            job_id, options = read_upload(self.request_body(), spool, app.cfg)
            job = app.store.add(job_id, spool, **options)
        finally:
            spool.discard()
        app.runner.notify()
        head, tail = job_object_parts(job)
        self.send_bytes(201, (head + tail).encode())

    def get_job(self, job_id):
        """GET /api/get/{id}: 404 unknown, 202 not finished, 200 (206 PARTIAL) with Output."""
        job = self.known_job(job_id)
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
            raise NotFound(JOB_NOT_FOUND)
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
        options = job_options(app.cfg, self.headers.get("X-Jobd-Timeout"),
                              self.headers.get("X-Jobd-Callback"),
                              parse_slurm_header(self.headers.get("X-Jobd-Slurm")))
        spool = app.store.spool()
        try:
            body = self.request_body()
            while True:
                chunk = body.read()
                if not chunk:
                    break
                spool.write(chunk)
            check_input_zip(spool.file, app.cfg)
            job = app.store.add(job_id, spool, **options)
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
                self.send_file(output, first, last - first + 1)

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
        (chunked) until the job ends. ?offset=N leaves out the first N bytes, for a client
        that lost a stream and resumes it; the Jobd-Log-Offset header says where the
        text starts."""
        job = self.known_job(job_id)
        name = STDOUT_FILE if stream == "stdout" else STDERR_FILE
        follow = self.query.get("follow", ["0"])[-1].lower() in ("1", "true", "yes")
        offset = self.query.get("offset", ["0"])[-1]
        if not (offset.isdigit() and offset.isascii() and len(offset) <= 18):
            raise BadRequest(f"offset must be a number of bytes, not {offset[:40]!r}")
        offset = int(offset)
        f, size = self.open_log(job, name) if job["status"] != QUEUED else (None, 0)
        with f or contextlib.nullcontext():
            self.send_head(200, "text/plain; charset=utf-8",
                           None if follow else max(0, size - offset),
                           [("Cache-Control", "no-cache"), ("Jobd-Log-Offset", str(offset))])
            self.end_headers()
            if self.command == "HEAD":
                return
            if not follow:
                if f is not None and size > offset:
                    self.send_file(f, offset, size - offset)
                return
            self.follow_log(job, name, f, seek_within(f, size, offset) if f else offset)

    def follow_log(self, job, name, f, skip):
        """Send the log as chunks as it grows, until the job has ended and all is sent,
        leaving out the next `skip` bytes."""
        try:
            while True:
                if f is None and job["status"] != QUEUED:
                    f, size = self.open_log(job, name)
                    if f is not None:
                        skip = seek_within(f, size, skip)
                data = f.read(64 * KiB) if f is not None else b""
                if data and skip:
                    data, skip = data[skip:], max(0, skip - len(data))
                if data:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.sent += len(data)
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
            raise Conflict(f"{ALREADY_FINISHED} ({job['status']})")
        self.app.runner.cancel(job_id, wait=self.app.cfg.grace + 2)
        self.send_json(200, status_object(self.known_job(job_id)))

    def delete_job(self, job_id):
        """DELETE /api/jobs/{id}: cancel if needed, then remove the record and every file."""
        self.known_job(job_id)
        self.app.runner.delete(job_id)
        self.send_bytes(204, b"", content_type="text/plain")

    # -- the job-orchestrator client protocol (its section above says why) -----------------

    def orch_submit(self):
        """POST /submit: one multipart part per file -> 200 and a Payload "Prepared", or
        "Invalid" for refused content; 400 (no job) for a body that is not multipart."""
        app = self.app
        staging = tempfile.mkdtemp(dir=app.store.dirs["tmp"])
        spool = app.store.spool()
        try:
            submission = Submission(staging, app.log)
            try:
                boundary = parse_boundary(self.headers.get("Content-Type"))
                read_multipart(self.request_body(), boundary, submission.open_part,
                               max_parts=app.cfg.max_entries)
            except JobdError:
                self.close_connection = True  # what follows in the stream is not trusted
                raise
            problem = submission.problem()
            if problem is None:
                write_result_zip(staging, spool)
                try:
                    check_input_zip(spool.file, app.cfg)
                except BadRequest as e:
                    problem = e.message
            if problem is None:
                options = job_options(app.cfg, None, None)  # the server's time limit, if any
                number = create_orchestrator_job(
                    app.store, lambda job_id: app.store.add(job_id, spool, **options))
                app.store.mark_orchestrator(str(number))
                app.runner.notify()
                status = "Prepared"
            else:
                number = create_orchestrator_job(
                    app.store, lambda job_id: app.store.add_refused(job_id, problem))
                status = "Invalid"
        finally:
            spool.discard()
            shutil.rmtree(staging, ignore_errors=True)
        app.log("submission", job=str(number), status=status, files=len(submission.names),
                message=problem)
        loc = app.store.job_dir(str(number))
        self.send_json(200, orchestrator_payload(number, status, loc))

    def orchestrator_job(self, number):
        """The job submitted through the protocol under this number, or None."""
        job = self.app.store.get(str(number))
        return job if job is not None and job["orchestrator"] else None

    def send_not_held(self, number):
        """For a number with no job: 200 "Cleaned" if jobd issued it, else 404."""
        if number <= self.app.store.last_orchestrator_id():
            self.send_json(200, orchestrator_payload(number, "Cleaned"))
        else:
            self.send_json(404, orchestrator_payload(0, "Unknown"))

    def send_zip(self, f, size):
        self.send_head(200, ZIP_TYPE, size)
        self.end_headers()
        if self.command != "HEAD":
            shutil.copyfileobj(f, self.wfile, CHUNK)

    def orch_retrieve(self, number):
        """GET /retrieve/{id}: the zip of the job folder once it succeeded, else a Payload."""
        number = parse_orchestrator_id(number)
        job = self.orchestrator_job(number)
        if job is None:
            return self.send_not_held(number)
        if job["status"] == SUCCESS:
            output, size = self.app.store.open_output(job["id"])
            if output is None:  # a 500 is polled again; a JSON status would end the job
                raise JobdError("the result zip of this job is missing")
            with output:
                return self.send_zip(output, size)
        pid = (job["pgid"] or 0) if job["status"] == RUNNING else 0
        self.send_json(200, orchestrator_payload(
            number, orchestrator_status(job), self.app.store.job_dir(job["id"]), pid,
            killed=job["status"] == CANCELLED))

    def orch_retrieve_partial(self, number):
        """GET /retrieve_partial/{id}: a zip of the job folder as it is now (the input
        while it waits, the result once it has ended)."""
        store = self.app.store
        job = self.orchestrator_job(parse_orchestrator_id(number))
        if job is not None and job["status"] == RUNNING:
            snapshot = store.spool()
            try:
                write_result_zip(store.job_dir(job["id"]), snapshot)
                job = store.get(job["id"])  # it may have ended, and its folder gone, meanwhile
                if job is not None and job["status"] == RUNNING:
                    snapshot.seek(0)
                    return self.send_zip(snapshot, snapshot.size)
            finally:
                snapshot.discard()
        if job is None:
            return self.send_json(404, orchestrator_payload(0, "Unknown"))
        if job["status"] == QUEUED:
            f = store.open_input(job["id"])
            size = f.seek(0, os.SEEK_END) if f else 0
        else:
            f, size = store.open_output(job["id"])
        if f is None:
            f, size = io.BytesIO(EMPTY_ZIP), len(EMPTY_ZIP)
        with f:
            f.seek(0)
            self.send_zip(f, size)

    def orch_kill(self, number):
        """POST /kill/{id}: a waiting job never starts, a running one is stopped (its whole
        process group); 200 with no body at once, also when there is nothing to stop."""
        number = parse_orchestrator_id(number)
        job = self.orchestrator_job(number)
        if job is None and number > self.app.store.last_orchestrator_id():
            return self.send_json(404, orchestrator_payload(0, "Unknown"))
        if job is not None and job["status"] in (QUEUED, RUNNING):
            self.app.runner.cancel(job["id"])
        self.send_bytes(200, b"", content_type="text/plain; charset=utf-8")

    def orch_load(self):
        """GET /load: CPU use in percent, as a bare JSON number."""
        self.send_json(200, self.app.cpu.percent())

    def orch_health(self):
        """GET /health: 200 when the database answers, else 503."""
        try:
            self.app.store.check()
        except sqlite3.Error as e:
            self.app.log("health check failed", level="error", error=str(e))
            return self.send_json(503, {"status": "error", "database": str(e)})
        self.send_json(200, {"status": "ok", "database": "ok"})

    def orch_ping(self):
        self.send_json(200, {"message": "pong"})


    # -- operations ---------------------------------------------------------------------

    def healthz(self):
        """GET /healthz (never behind the token): 200 when the database and the data
        directory work, else 503; with version, uptime, queue depth and free disk."""
        app, counts, problems = self.app, {}, {}
        try:
            counts = app.store.counts()
            app.store.check_database()
        except sqlite3.Error as e:
            problems["database"] = str(e)
        try:
            app.store.check_data_dir()
            free = shutil.disk_usage(app.store.data_dir).free
        except OSError as e:
            problems["data_dir"], free = f"{e.strerror}: {e.filename}", None
        self.send_json(503 if problems else 200, {
            "status": "error" if problems else "ok", "version": __version__,
            "uptime_seconds": round(time.time() - app.started, 3),
            "queued": counts.get(QUEUED, 0), "running": counts.get(RUNNING, 0),
            "data_free_bytes": free, "database": problems.get("database", "ok"),
            "data_dir": problems.get("data_dir", "ok")})

    def metrics(self):
        """GET /metrics: Prometheus text exposition."""
        app = self.app
        text = app.metrics.render(app.store.counts(), time.time() - app.started)
        self.send_bytes(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def openapi(self):
        """GET /api/openapi.json: the OpenAPI 3 description of every endpoint."""
        self.send_json(200, openapi_document())


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # 200 clients connecting at once must not be refused

    def __init__(self, app):
        """Listen on cfg.host; "" means every interface, IPv6 and IPv4 (like Go's ":8080"),
        falling back to IPv4 alone where the system has no IPv6."""
        self.app = app
        self.handed = {}  # socket -> (answer not yet sent, request bytes read): Frontend's
        host = app.cfg.host
        if host == "" and socket.has_ipv6:
            try:
                self.address_family, self.dual_stack = socket.AF_INET6, True
                super().__init__(("::", app.cfg.port), Handler)
                return
            except OSError:
                pass
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.dual_stack = False
        super().__init__((host or "0.0.0.0", app.cfg.port), Handler)

    def server_bind(self):
        # HTTPServer.server_bind would look up the host's FQDN, which can hang for seconds
        # in a container without DNS; jobd never uses it.
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def shutdown_request(self, request):
        """Close gently: read on (briefly) what the client is still sending, so that a
        client refused early -- a 413, say -- reads our answer instead of a reset."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            request.settimeout(1.0)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and request.recv(64 * KiB):
                pass
        self.close_request(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            self.app.log("connection error", level="error", error=traceback.format_exc())


class Prefixed(io.RawIOBase):
    """A socket's byte stream, with bytes already read from it put back in front."""

    def __init__(self, read, raw):
        self.read_ahead, self.raw = memoryview(read), raw

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.read_ahead:
            return self.raw.readinto(buffer)
        n = min(len(buffer), len(self.read_ahead))
        buffer[:n] = self.read_ahead[:n]
        self.read_ahead = self.read_ahead[n:] if n < len(self.read_ahead) else b""
        return n

    def close(self):
        self.raw.close()
        super().close()


class Connection:
    """A connection the front end holds: what it has read of the next requests, since
    when it has waited (idle, or for the rest of a request), and whether it has let go
    of it (handed to a Handler, or closed)."""

    __slots__ = ("sock", "address", "read", "since", "gone")

    def __init__(self, sock, address):
        self.sock, self.address = sock, address
        self.read, self.since, self.gone = bytearray(), time.monotonic(), False


class Frontend:
    """The thread that accepts connections and holds the idle ones: one selectors loop.

    It answers the most frequent request, a small POST /api/upload, by itself. In one
    pass it reads every ready connection, checks each complete upload with the handler's
    own code (read_upload), commits them all in one transaction (Store.add_all) and
    answers each 201. Anything else -- another request, an upload that is large, unusual,
    refused or slow to arrive, an answer the socket will not take at once -- goes with
    the bytes read so far to a Handler thread, which replays it and keeps the connection.
    So every answer but a plain 201 comes from Handler.

    Rules that keep one client from holding up the others: sockets never block; a pass
    takes one request per connection, and stops taking after PASS seconds; a connection
    is read no further while READ bytes of it wait; the loop checks only zips that unpack
    to UNPACKED bytes at most (a Handler thread checks bigger ones).

    Why: many threads that each handle one small request take turns for the interpreter
    lock at every system call; one loop does not (8 clients uploading, no jobs running:
    1,100 -> 2,300 a second).
    """

    HEAD = (b"HTTP/1.1 201 Created\r\nServer: " + Handler.server_version.encode() +
            b"\r\nDate: %s\r\nContent-Type: " + JSON_TYPE.encode() +
            b"\r\nContent-Length: %d\r\n\r\n")  # the Handler's 201, byte for byte
    FAST = 64 * KiB         # the largest upload request the loop answers itself
    READ = 2 * FAST         # the most it reads ahead of one connection
    UNPACKED = 256 * KiB    # the largest unpacked input it checks itself
    PATIENCE = 1.0          # seconds a request may take to arrive before a Handler takes it
    PASS = 0.025            # seconds of checking uploads per pass, at most
    MOST = 256              # uploads per pass, so per commit

    def __init__(self, server):
        self.server, self.app = server, server.app
        cfg = self.app.cfg
        self.cfg = cfg.replace(max_unpacked=min(cfg.max_unpacked, self.UNPACKED))
        self.selector = selectors.DefaultSelector()
        self.stopping = threading.Event()
        self.again = []         # connections with the next request already read
        self.checked = time.monotonic()
        self.paused_until = 0.0  # accepting stops for a moment when accept() fails
        self.complained = 0.0    # when accept()'s failure was last logged

    def run(self):
        listener = self.server.socket
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                try:
                    self.serve(listener)
                except Exception:  # a bug of ours: logged, and the loop goes on
                    self.app.log("front end error", level="error", error=traceback.format_exc())
                    time.sleep(0.01)
        finally:
            for key in list(self.selector.get_map().values()):
                if key.data is not None:
                    self.close(key.data)
            self.selector.close()

    def serve(self, listener):
        """One pass: accept, read, take the complete requests, answer the uploads."""
        events = self.selector.select(0 if self.again else 0.1)
        ready, self.again = self.again, []
        for key, _ in events:
            if key.fileobj is listener:
                self.accept(listener)
            elif self.receive(key.data):
                ready.append(key.data)
        uploads = []
        deadline = time.monotonic() + self.PASS
        for conn in dict.fromkeys(ready):
            if conn.gone:
                continue
            if len(uploads) >= self.MOST or time.monotonic() > deadline:
                self.again.append(conn)  # the next pass
                continue
            try:
                self.take(conn, uploads)
            except Exception:
                self.app.log("connection error", level="error", error=traceback.format_exc())
                self.close(conn)
        if uploads:
            self.answer(uploads)
        now = time.monotonic()
        if self.paused_until and now > self.paused_until:
            self.paused_until = 0.0
            self.selector.register(listener, selectors.EVENT_READ)
        if now - self.checked > 0.25:
            self.expire()

    def accept(self, listener):
        for _ in range(self.MOST):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, say: wait a little
                self.selector.unregister(listener)
                self.paused_until = time.monotonic() + 0.1
                if time.monotonic() - self.complained > 10:
                    self.complained = time.monotonic()
                    self.app.log("cannot accept connections", level="error", error=str(e))
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, Connection(sock, address))

    def receive(self, conn):
        """Read what has come; False when there is nothing new to look at. At the end of
        the stream, requests already read still get their answers (from a Handler)."""
        if len(conn.read) >= self.READ:
            return True  # the requests already read come first
        try:
            data = conn.sock.recv(self.READ - len(conn.read))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            if conn.read:
                self.hand_off(conn)
            else:
                self.close(conn)
            return False
        if not conn.read:
            conn.since = time.monotonic()
        conn.read += data
        return True

    def take(self, conn, uploads):
        """Check the next request of a connection: an upload joins `uploads`; anything
        else goes to a Handler; a request still arriving waits."""
        read = conn.read
        line = read.find(b"\n", 0, 64)
        if line < 0 and len(read) < 64:
            return  # the request line is still arriving
        if line < 0 or read[:line + 1] != b"POST /api/upload HTTP/1.1\r\n":
            return self.hand_off(conn)
        end = read.find(b"\r\n\r\n", line - 1, 16 * KiB)
        if end < 0:
            if len(read) >= 16 * KiB:
                self.hand_off(conn)
            return
        lines = bytes(read[line + 1:end]).split(b"\r\n") if end > line - 1 else []
        if any(b"\n" in header or b"\r" in header for header in lines):
            return self.hand_off(conn)  # a bare line feed: the Handler's reading decides
        headers = Headers()
        try:
            for header in lines[:100]:
                add_header(headers, header)
        except BadRequest:
            return self.hand_off(conn)
        length = headers.get("Content-Length", "")
        if (len(lines) >= 100 or not (length.isascii() and length.isdigit())
                or len(length) > 6 or int(length) > self.FAST
                or "transfer-encoding" in headers or "expect" in headers
                or headers.get("Connection", "keep-alive") != "keep-alive"):
            return self.hand_off(conn)
        size = end + 4 + int(length)
        if len(read) < size:
            return
        request = bytes(read[:size])
        spool = self.app.store.spool()
        try:
            check_token(self.cfg, "/api/upload", headers)
            body = RequestBody(io.BytesIO(request[end + 4:]), headers, self.cfg.max_upload)
            job_id, options = read_upload(body, spool, self.cfg)
        except Exception:  # the Handler answers it: with its error, or with its traceback
            spool.discard()
            return self.hand_off(conn)
        del read[:size]
        uploads.append((conn, request, Store.upload(job_id, spool, **options), body.received))

    def answer(self, uploads):
        """Commit the uploads in one transaction, answer each; one refused goes back to
        a Handler, whose answer (409, 429, 500...) then says why."""
        try:
            self.app.store.add_all([upload for _, _, upload, _ in uploads])
        except Exception as e:  # then each is answered by a Handler
            for _, _, upload, _ in uploads:
                upload["error"] = e
        finally:
            for _, _, upload, _ in uploads:
                upload["spool"].discard()
        accepted = sum(upload["error"] is None for _, _, upload, _ in uploads)
        if accepted:
            self.app.runner.uploads_accepted(accepted)
        log, lines, date = self.app.log, [], http_date(int(time.time())).encode()
        for conn, request, upload, received in uploads:
            if conn.gone:
                continue  # accepted all the same, like an upload whose client left early
            try:
                if upload["error"] is not None:
                    conn.read[:0] = request
                    self.hand_off(conn)
                    continue
                head, tail = job_object_parts(upload["job"])
                body = (head + tail).encode()
                self.send(conn, self.HEAD % (date, len(body)) + body)
                self.app.metrics.request(201, received, len(body))
                lines.append(log.line("http", method="POST", path="/api/upload", status=201,
                                      ms=round((time.monotonic() - conn.since) * 1000, 1),
                                      client=conn.address[0].removeprefix("::ffff:")))
                conn.since = time.monotonic()
                if conn.read and not conn.gone:
                    self.again.append(conn)
            except Exception:
                log("connection error", level="error", error=traceback.format_exc())
                self.close(conn)
        log.write("".join(lines))  # one write for the pass

    def send(self, conn, data):
        """Send without waiting; what the socket does not take, a Handler sends."""
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return self.close(conn)
        if sent < len(data):
            self.hand_off(conn, unsent=data[sent:])

    def hand_off(self, conn, unsent=b""):
        """Give a connection to a Handler thread, with what it has read and not sent."""
        if conn.gone:
            return
        self.let_go(conn)  # (Handler.setup gives the socket its time-out, so it blocks again)
        self.server.handed[conn.sock] = (unsent, bytes(conn.read))
        try:
            self.server.process_request(conn.sock, conn.address)
        except Exception:  # no thread to be had: the client is told by a reset
            self.server.handed.pop(conn.sock, None)
            self.app.log("connection error", level="error", error=traceback.format_exc())
            conn.sock.close()

    def expire(self):
        """Hand over a request that is slow to arrive (the Handler's time-outs then
        apply); close a connection idle for longer than the request timeout."""
        now = self.checked = time.monotonic()
        for key in list(self.selector.get_map().values()):
            conn = key.data
            if conn is None:
                continue
            if conn.read and now - conn.since > self.PATIENCE:
                self.hand_off(conn)
            elif not conn.read and now - conn.since > self.cfg.request_timeout:
                self.app.log("http error", level="warning",
                             message="Request timed out: an idle connection was closed")
                self.close(conn)

    def close(self, conn):
        if not conn.gone:  # a connection handed over is the Handler's to close
            self.let_go(conn)
            conn.sock.close()

    def let_go(self, conn):
        conn.gone = True
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)


# ====================================================================================
# Client CLI: jobd submit | status | wait | fetch | logs | cancel | rm | ls
# ====================================================================================
# The executable that serves jobs is also their client. It speaks the resource API
# (/api/jobs) and falls back to the Go API (/api/upload, /api/get) for submit, wait and
# fetch when the server has only that. Payloads stream both ways: a folder is zipped on
# the fly into a chunked request body, results go to disk as they arrive, so memory
# stays flat whatever their size. stdout carries only results (ids, status, logs);
# messages go to stderr, and the progress line only to a terminal.

CLIENT_COMMANDS = ("submit", "status", "wait", "fetch", "logs", "cancel", "rm", "ls", "health")
DEFAULT_URL = "http://127.0.0.1:8080"

EXIT_ERROR = 110         # refused: bad input, a 4xx/5xx answer, unsafe or existing files
EXIT_UNREACHABLE = 111   # no answer from jobd, or the connection was lost
EXIT_UNAUTHORIZED = 112  # 401: missing or wrong token
EXIT_NOT_FOUND = 113     # 404: no such job
EXIT_FAILED = 114        # the job failed and has no exit code of its own
EXIT_CANCELLED = 115
EXIT_TIMED_OUT = 116
EXIT_NOT_FINISHED = 117  # fetch of a job that is still queued or running
EXIT_INTERRUPTED = 130   # Ctrl-C, as shells report it

EXIT_CODES_HELP = """\
exit codes:
  0        success (waiting: the job succeeded)
  1-255    waiting: the job's own exit code (128+N: killed by signal N)
  2        usage error
  110      refused: bad folder or zip, an error answer, unsafe or existing files
  111      jobd unreachable, or the connection was lost
  112      unauthorized (401): set JOBD_TOKEN or --token-file
  113      no such job (404)
  114      the job failed without an exit code
  115      the job was cancelled
  116      the job timed out
  117      fetch: the job has not finished yet
  130      interrupted (Ctrl-C); the job keeps running"""

CLIENT_SUMMARY = """\
client commands (jobd COMMAND --help for each):
  submit PATH   upload a job folder (run.sh at its top) or a .zip;
                --wait -o DIR waits and unpacks the results into DIR
  status ID     a job's status
  wait ID       wait for a job to end and exit with its exit code
  fetch ID      download and unpack a finished job's results (-o DIR)
  logs ID       a job's stdout (--stderr; -f follows it live)
  cancel ID     stop a queued or running job
  rm ID         delete a job and its files
  ls            list jobs, newest first (--status S)
  health        check that a jobd answers and is healthy (for HEALTHCHECK)
The client finds jobd at JOBD_URL (default http://127.0.0.1:8080), token in JOBD_TOKEN."""


class ClientError(JobdError):
    """A client command failed: a one-line message and the exit status to end with."""

    def __init__(self, message, exit_code=EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class NoEndpoint(ClientError):
    """404 from something that is not a job: the server lacks the endpoint (a Go jobd)."""


def say(message):
    """A message on stderr (clearing a progress line first)."""
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    print(f"{clear}jobd: {message}", file=sys.stderr, flush=True)


def note(message):
    """A message for people only: shown when stderr is a terminal."""
    if sys.stderr.isatty():
        say(message)


def human_bytes(count):
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000


def human_seconds(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """One line on stderr, redrawn in place at most 5 times a second; only on a terminal."""

    def __init__(self, enabled=True):
        self.on = enabled and sys.stderr.isatty()
        self.shown = False
        self.last = 0.0
        self.started = time.monotonic()

    def show(self, text):
        now = time.monotonic()
        if not self.on or now - self.last < 0.2:
            return
        self.last = now
        width = shutil.get_terminal_size().columns - 1
        sys.stderr.write("\r\x1b[K" + text[:width])
        sys.stderr.flush()
        self.shown = True

    def transfer(self, label, done, total=None):
        rate = done / max(1e-3, time.monotonic() - self.started)
        size = f"{human_bytes(done)} of {human_bytes(total)}" if total else human_bytes(done)
        share = f"{100 * done // total}%  " if total else ""
        self.show(f"{label}: {share}{size}  {human_bytes(rate)}/s")

    def pause(self, seconds, text):
        """Sleep, showing `text` and the time since the start (waiting for a job)."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.show(f"{text}  {human_seconds(time.monotonic() - self.started)}")
            time.sleep(min(0.25, max(0.0, until - time.monotonic())))

    def clear(self):
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


# -- talking to jobd ------------------------------------------------------------------

class Api:
    """A jobd server as the client sees it. One connection per request (Connection:
    close), so a dropped connection never poisons the next request."""

    def __init__(self, url, token=None, timeout=60.0):
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"invalid jobd URL {url!r}: use http://HOST:PORT")
        self.url = url.rstrip("/")
        self.scheme, self.host, self.prefix = parts.scheme, parts.hostname, parts.path.rstrip("/")
        try:
            self.port = parts.port
        except ValueError:
            raise ClientError(f"invalid port in jobd URL {url!r}") from None
        self.token, self.timeout = token, timeout

    def request(self, method, path, body=None, headers=None, ok=(200,), job_id=None,
                timeout=None):
        """Send a request; the response, body unread, when its status is in `ok`, else
        ClientError (NoEndpoint for a 404 that is not about a job)."""
        if self.scheme == "https":
            connection = getattr(http.client, "HTTPSConnection", None)
            if connection is None:
                raise ClientError("https is not available in this build of jobd; use http://")
        else:
            connection = http.client.HTTPConnection
        conn = connection(self.host, self.port, timeout=timeout or self.timeout)
        sent = {"User-Agent": f"jobd/{__version__}", "Connection": "close", **(headers or {})}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        try:
            try:
                conn.request(method, self.prefix + path, body=body, headers=sent)
            except (BrokenPipeError, ConnectionResetError):
                pass  # jobd answered before reading the whole body (409, 413...): read it
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise self.lost(e, "sending" if body is not None else None) from None
        except BaseException:
            conn.close()
            raise
        if resp.status in ok:
            return resp
        with resp:
            try:
                text = resp.read(64 * KiB)
            except (OSError, http.client.HTTPException):
                text = b""
        raise self.refusal(resp.status, text, job_id)

    def json(self, method, path, ok=(200,), **kwargs):
        """The JSON answer to a request (small bodies only)."""
        with self.request(method, path, ok=ok, **kwargs) as resp:
            try:
                return json.loads(resp.read(64 * MiB))
            except (OSError, http.client.HTTPException) as e:
                raise self.lost(e) from None
            except ValueError:
                raise ClientError(f"{self.url} did not answer with JSON; is it jobd?") from None

    def refusal(self, status, text, job_id):
        """The ClientError for an error answer (jobd's JSON error body, or any text)."""
        try:
            message, from_jobd = str(json.loads(text)["message"]), True
        except (ValueError, TypeError, KeyError):
            lines = text.decode("utf-8", "replace").strip().splitlines()
            message, from_jobd = lines[0][:200] if lines else "no message", False
        if status == 401:
            return ClientError(f"unauthorized ({message}): set JOBD_TOKEN or --token-file",
                               EXIT_UNAUTHORIZED)
        if status == 404 and job_id is not None and JOB_NOT_FOUND in message:
            return ClientError(f"no job {job_id!r} on {self.url}", EXIT_NOT_FOUND)
        if status == 404 and (not from_jobd or NO_SUCH_ENDPOINT in message):
            return NoEndpoint(f"{self.url} has no such endpoint ({message})", EXIT_NOT_FOUND)
        return ClientError(f"{message} (HTTP {status})",
                           EXIT_NOT_FOUND if status == 404 else EXIT_ERROR)

    def lost(self, error, doing=None):
        """ClientError for a failed connection, connect or transfer."""
        if isinstance(error, ClientError):
            return error
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        if isinstance(error, (socket.timeout, TimeoutError)):
            reason = "timed out"
        elif isinstance(error, (http.client.RemoteDisconnected, http.client.IncompleteRead)):
            reason = "the connection was closed"
        if doing == "sending":
            reason += " (if the upload was large, check jobd's upload limit)"
        return ClientError(f"cannot reach jobd at {self.url}: {reason}", EXIT_UNREACHABLE)

    def has_jobs_api(self):
        """True when jobd has the resource API (/api/jobs), False when only the Go one."""
        try:
            self.json("GET", "/api/jobs?limit=1")
            return True
        except NoEndpoint:
            return False

    def job_status(self, job_id):
        """A job's status object; None when jobd has only the Go API. No such job: 113."""
        try:
            return self.json("GET", job_path(job_id), job_id=job_id)
        except NoEndpoint:
            return None


def job_path(job_id, *rest):
    return "/".join(["/api/jobs", quote(job_id, safe="")] + list(rest))


# -- what is uploaded: a folder zipped on the fly, or a zip ----------------------------

def folder_entries(folder):
    """(path, name in the zip, size or None for a folder) of everything in a job folder,
    sorted. Links are followed (as zip does), loops skipped; run.sh must be at the top."""
    if not os.path.isfile(os.path.join(folder, RUN_SH)):
        raise ClientError(f"{folder}: no {RUN_SH} at its top level; a job folder needs one")

    def unreadable(error):
        raise ClientError(f"cannot read {error.filename}: {error.strerror}")

    entries, seen = [], set()
    for root, folders, files in os.walk(folder, onerror=unreadable, followlinks=True):
        info = os.stat(root)
        if (info.st_dev, info.st_ino) in seen:
            say(f"warning: skipping {root}: a link back to a folder already included")
            folders[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        folders.sort()
        relative = os.path.relpath(root, folder)
        prefix = "" if relative == "." else zip_name(relative.replace(os.sep, "/")) + "/"
        if prefix:
            entries.append((root, prefix, None))
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                info = os.stat(path)
            except OSError as e:
                say(f"warning: skipping {path}: {e.strerror}")
                continue
            if not stat.S_ISREG(info.st_mode):
                say(f"warning: skipping {path}: not a regular file")
                continue
            entries.append((path, prefix + zip_name(name), info.st_size))
    return entries


class ZipPipe:
    """A job folder zipped by a thread and read as a stream of chunks (a chunked request
    body): only a few chunks are ever in memory, whatever the size of the folder."""

    class ReaderGone(Exception):
        pass

    def __init__(self, entries):
        self.entries = entries
        self.chunks = queue.Queue(maxsize=2)  # 4 cost 2 MB more, and no speed
        self.pending = bytearray()
        self.closed = threading.Event()
        threading.Thread(target=self.produce, name="zip", daemon=True).start()

    def write(self, data):
        """zipfile writes the archive here (in the zip thread)."""
        if not self.pending and len(data) >= CHUNK:
            self.put(bytes(data))
            return len(data)
        self.pending += data
        if len(self.pending) >= CHUNK:
            self.put(bytes(self.pending))
            self.pending.clear()
        return len(data)

    def flush(self):
        pass

    def put(self, item):
        while not self.closed.is_set():
            with contextlib.suppress(queue.Full):
                self.chunks.put(item, timeout=0.5)
                return
        raise self.ReaderGone()

    def produce(self):
        try:
            # No seek or tell: zipfile writes sizes after each entry (data descriptors).
            with zipfile.ZipFile(self, "w", zipfile.ZIP_DEFLATED, allowZip64=True,
                                 strict_timestamps=False) as zf:
                for path, name, size in self.entries:
                    if size is None:
                        zf.write(path, name)
                    else:
                        with open(path, "rb") as src:  # links followed: see folder_entries
                            add_file(zf, src, path, name, size)
            self.put(bytes(self.pending))
            self.put(None)
        except Exception as e:
            with contextlib.suppress(self.ReaderGone):
                self.put(e)

    def __iter__(self):
        while True:
            try:
                item = self.chunks.get(timeout=600)
            except queue.Empty:
                raise ClientError("zipping the job folder stalled for 10 minutes") from None
            if item is None:
                return
            if isinstance(item, Exception):
                detail = getattr(item, "strerror", None) or item
                where = getattr(item, "filename", None)
                raise ClientError(f"cannot zip the job folder: {detail}"
                                  + (f": {where}" if where else ""))
            yield item

    def close(self):
        self.closed.set()


class Payload:
    """A job to upload: `chunks` (the zip, streamed) and `size` (None when unknown)."""

    def __init__(self, path):
        self.path, self.pipe = path, None
        if os.path.isdir(path):
            self.pipe = ZipPipe(folder_entries(path))
            self.chunks, self.size = iter(self.pipe), None
            return
        try:
            with zipfile.ZipFile(path) as zf:  # the server's rules, before uploading
                has_run_sh = any(parts == [RUN_SH] and not info.is_dir()
                                 for info, parts in zip_entries(zf))
        except FileNotFoundError:
            raise ClientError(f"{path}: no such file or folder") from None
        except (zipfile.BadZipFile, OSError) as e:
            raise ClientError(f"{path}: not a folder, nor a readable zip ({e})") from None
        except BadRequest as e:
            raise ClientError(f"{path}: {e.message}") from None
        if not has_run_sh:
            raise ClientError(f"{path}: the zip has no {RUN_SH} at its top level")
        self.size = os.path.getsize(path)
        self.chunks = self.read_file(path)

    @staticmethod
    def read_file(path):
        try:
            with open(path, "rb") as f:
                while True:
                    block = f.read(CHUNK)
                    if not block:
                        return
                    yield block
        except OSError as e:
            raise ClientError(f"cannot read {path}: {e.strerror}") from None

    def body(self, chunks, progress, total, headers):
        """The request body, counted for the progress line as it is sent. When its length
        is not known, it goes as HTTP chunks framed here: http.client's own framing copies
        every chunk once more (2 MB of the client's peak memory)."""
        if total is None:
            headers["Transfer-Encoding"] = "chunked"
        else:
            headers["Content-Length"] = str(total)
        return self.counted(chunks, progress, total)

    def counted(self, chunks, progress, total):
        sent = 0
        for chunk in chunks:
            if not chunk:
                continue  # (an empty HTTP chunk would end the body)
            if total is None:
                yield b"%X\r\n" % len(chunk)
            yield chunk
            if total is None:
                yield b"\r\n"
            sent += len(chunk)
            progress.transfer("uploading", sent, total)
        if total is None:
            yield b"0\r\n\r\n"

    def close(self):
        if self.pipe is not None:
            self.pipe.close()


def go_upload_body(job_id, chunks, timeout):
    """The Go API's upload JSON, built on the fly around the base64 of the zip's chunks."""
    fields = {"id": job_id, "slurml": False, **({"timeout": timeout} if timeout else {})}
    yield (json.dumps(fields)[:-1] + ', "input": "').encode()
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        cut = len(data) - len(data) % 3  # whole groups of 3: no padding inside the text
        carry = data[cut:]
        yield base64.b64encode(data[:cut])
    yield base64.b64encode(carry) + b'"}'


def submit_job(api, payload, job_id, timeout, progress):
    """Upload a job; its status object (resource API) or job object (Go API)."""
    if job_id and not is_job_id(job_id):
        raise ClientError(f"invalid job id {job_id!r}: 1 to 128 of A-Z a-z 0-9 . _ -, "
                          "starting with a letter or digit")
    if not job_id:
        resource_api = api.has_jobs_api()
    else:  # asked first: a 409 would only come once the whole body is sent
        try:
            resource_api = api.job_status(job_id) is not None
        except ClientError as e:
            if e.exit_code != EXIT_NOT_FOUND:
                raise
            resource_api = True
        else:
            if resource_api:
                raise ClientError(f"job {job_id!r} already exists on {api.url}")
    headers = {"X-Jobd-Timeout": format(timeout, "g")} if timeout else {}
    if resource_api:
        headers["Content-Type"] = "application/zip"
        body = payload.body(payload.chunks, progress, payload.size, headers)
        method, path = ("PUT", job_path(job_id)) if job_id else ("POST", "/api/jobs")
        # jobd checks the whole zip before it answers: a long wait for a big one
        job = api.json(method, path, body=body, headers=headers, ok=(201,), timeout=900)
    else:
        if timeout:
            say("warning: this server has only the Go API; --timeout may be ignored")
        job_id = job_id or uuid.uuid4().hex
        headers["Content-Type"] = JSON_TYPE
        total = None
        if payload.size is not None:
            prefix = next(go_upload_body(job_id, [], timeout))
            total = len(prefix) + 4 * ((payload.size + 2) // 3) + 2
        body = payload.body(go_upload_body(job_id, payload.chunks, timeout), progress, total,
                            headers)
        resp = api.request("POST", "/api/upload", body=body, headers=headers, ok=(201,),
                           timeout=900)
        with resp:
            job = read_job_object(api, resp)  # Go echoes the whole input back: drop it
    progress.clear()
    return job, resource_api


# -- waiting ----------------------------------------------------------------------------

def job_exit_code(job):
    """The exit status `wait` ends with for a finished job (see EXIT_CODES_HELP)."""
    status, code, message = job.get("Status"), job.get("ExitCode"), job.get("Message") or ""
    if status == SUCCESS:
        return 0
    if status == CANCELLED:
        return EXIT_CANCELLED
    # jobd's own words come first; what follows "exit status N: " is the job's stderr
    own_words = re.split(r"(?:exit status \d+|signal: [\w ]+): ", message)[0]
    if JOB_TIMED_OUT in own_words:
        return EXIT_TIMED_OUT
    if code is None:  # the Go daemon has no ExitCode: read it from its message
        match = re.search(r"exit status (\d+)", message)
        code = int(match.group(1)) if match else None
    return code if isinstance(code, int) and 0 < code < 256 else EXIT_FAILED


def poll_job(api, job_id, progress, deadline_unreachable=60.0):
    """Poll the status until the job has finished; its status object. A jobd that stops
    answering (a restart) is waited for up to `deadline_unreachable` seconds."""
    delay, lost_since, status = 0.1, None, "?"
    while True:
        try:
            job = api.json("GET", job_path(job_id), job_id=job_id)
            lost_since, status = None, job["Status"]
            if status in FINISHED:
                progress.clear()
                return job
        except ClientError as e:
            if e.exit_code != EXIT_UNREACHABLE:
                raise
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > deadline_unreachable:
                raise
            status = "jobd not answering"
        progress.pause(delay, f"job {job_id}: {status}")
        delay = min(delay * 1.5, 2.0)


def follow_log(api, job_id, stream, out, reconnects=10):
    """Copy a job's log to `out` as it grows, until the job ends. A dropped connection is
    opened again from the first byte not yet copied (a log only grows); a jobd too old to
    know ?offset sends the log from its start, and what was copied is skipped."""
    copied, failures = 0, 0
    while True:
        try:
            resp = api.request("GET", job_path(job_id, "logs", stream)
                               + f"?follow=1&offset={copied}", job_id=job_id, timeout=300)
            with resp:
                start = resp.getheader("Jobd-Log-Offset") or "0"
                position = int(start) if start.isdigit() and start.isascii() else 0
                while True:
                    data = resp.read1(64 * KiB)
                    if not data:
                        return
                    fresh = data[max(0, copied - position):]
                    position += len(data)
                    if fresh:
                        out.write(fresh)
                        out.flush()
                        copied += len(fresh)
        except BrokenPipeError:
            raise  # our own stdout was closed
        except (ClientError, OSError, http.client.HTTPException) as e:
            error = api.lost(e)
            timed_out = isinstance(e, (socket.timeout, TimeoutError))
            if error.exit_code != EXIT_UNREACHABLE or (not timed_out and failures >= reconnects):
                raise error from None
            failures += 0 if timed_out else 1  # a quiet job is no failure: only ask again
            time.sleep(0 if timed_out else 1)


def wait_go(api, job_id, progress, part=None):
    """Go API: poll /api/get until the job has finished; its job object, with the result
    zip decoded into the file `part` on the way (or dropped)."""
    delay = 0.2
    while True:
        resp = api.request("GET", "/api/get/" + quote(job_id, safe=""), ok=(200, 202, 206),
                           job_id=job_id)
        with resp:
            if resp.status != 202:
                progress.started = time.monotonic()
                with open_part(part) if part else contextlib.nullcontext() as output:
                    return read_job_object(api, resp, output, progress)
        progress.pause(delay, f"job {job_id}: not finished")
        delay = min(delay * 1.5, 2.0)


BIG_VALUE = re.compile(rb'"(Input|Output)"\s{0,16}:\s{0,16}"')


def read_job_object(api, resp, output=None, progress=None):
    """The Go job object from a response, streamed: "Output" (base64) is decoded into the
    file `output` (or dropped) and "Input" dropped, so neither is ever held in memory."""
    decoder = Base64File(output) if output else None
    kept, buf, inside, sink, received = bytearray(), b"", False, None, 0
    while True:
        try:
            chunk = resp.read(CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise api.lost(e) from None
        if not chunk and resp.length:
            raise ClientError(f"lost the connection to {api.url} during a download",
                              EXIT_UNREACHABLE)
        received += len(chunk)
        if progress is not None:
            progress.transfer("downloading", received, resp.length and received + resp.length)
        buf += chunk
        try:
            while buf:
                if inside:
                    end = buf.find(b'"')
                    if sink is not None:
                        sink.write(buf if end < 0 else buf[:end])
                    buf, inside = (b"", True) if end < 0 else (buf[end:], False)
                    continue
                match = BIG_VALUE.search(buf)
                if match is None:  # keep the end: a key may be cut between two reads
                    keep = max(0, len(buf) - 48) if chunk else len(buf)
                    kept += buf[:keep]
                    buf = buf[keep:]
                    break
                kept += buf[:match.end()]
                buf, inside = buf[match.end():], True
                sink = decoder if match.group(1) == b"Output" else None
            if len(kept) > 16 * MiB:
                raise ClientError(f"unexpected answer from {api.url}: a job object too large")
            if not chunk:
                if decoder is not None:
                    decoder.close()
                break
        except BadRequest as e:  # from Base64File
            raise ClientError(f"the job's output from {api.url} is not valid: {e.message}")
    try:
        return json.loads(kept)
    except ValueError:
        raise ClientError(f"{api.url} did not answer with a job object; is it jobd?") from None


# -- results: download and safe extraction ------------------------------------------------

def download_output(api, job_id, part, progress, attempts=3):
    """Download a finished job's result zip into the file `part`, resuming what an earlier,
    interrupted download left there (Range + If-Range, the ETag kept in part.etag).
    A download cut after some progress is resumed at once, up to `attempts` times."""
    tag_file = part + ".etag"
    for attempt in range(attempts):
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        tag = ""
        with contextlib.suppress(OSError):
            with open(tag_file, encoding="utf-8") as f:
                tag = f.read().strip()
        headers = {"Range": f"bytes={have}-", "If-Range": tag} if have and tag else {}
        resp = api.request("GET", job_path(job_id, "output"), headers=headers,
                           ok=(200, 202, 206, 416), job_id=job_id)
        with resp:
            if resp.status == 202:
                state = json.loads(resp.read(64 * KiB) or b"{}").get("Status", "not finished")
                raise ClientError(f"job {job_id} has not finished yet ({state}); "
                                  f"jobd wait {job_id} -o DIR waits for it", EXIT_NOT_FINISHED)
            total = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)",
                                 resp.getheader("Content-Range", "") or "")
            total = int(total.group(1)) if total else None
            if resp.status == 416:
                if total == have:
                    return  # the earlier download was complete
                os.unlink(part)
                continue
            start = 0
            if resp.status == 206:
                start = int(re.match(r"bytes (\d+)", resp.getheader("Content-Range")).group(1))
                if start != have:
                    os.unlink(part)
                    continue
            received = start
            progress.started = time.monotonic()
            with open_part(part, "ab" if start else "wb") as f:
                if not start:
                    total = int(resp.getheader("Content-Length", "0"))
                    with open(tag_file, "w", encoding="utf-8") as tag:
                        tag.write(resp.getheader("ETag", ""))
                buf = memoryview(bytearray(CHUNK))
                while received < total:
                    try:
                        count = resp.readinto(buf[:min(CHUNK, total - received)])
                    except (OSError, http.client.HTTPException):
                        break  # cut: what arrived is kept, and resumed below
                    if not count:
                        break
                    f.write(buf[:count])
                    received += count
                    progress.transfer("downloading", received - start, total - start)
            progress.clear()
            if received == total:
                return
            if received == have or attempt == attempts - 1:
                raise ClientError(f"the download of job {job_id}'s results was cut at "
                                  f"{human_bytes(received)} of {human_bytes(total)}; "
                                  "run the same command again to resume it", EXIT_UNREACHABLE)
            time.sleep(0.5)
    raise ClientError(f"jobd kept answering the download of job {job_id}'s results with "
                      f"ranges that do not fit; remove {part} and try again")


def open_beneath(root_fd, parts, where):
    """A descriptor of the folder root/parts (made when missing), never through a link."""
    fd = os.dup(root_fd)
    try:
        for number, part in enumerate(parts):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, dir_fd=fd)
            try:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                path = os.path.join(where, *parts[:number + 1])
                why = "a symbolic link" if os.path.islink(path) else "not a folder"
                raise ClientError(f"refused to extract into {path}: it is {why}") from None
            os.close(fd)
            fd = inner
        return fd
    except BaseException:
        os.close(fd)
        raise


def extract_results(zip_path, folder, force=False):
    """Unpack a result zip into `folder`, safely: every name is checked before anything is
    written (no absolute paths, no '..', no links), nothing is written through a link
    already in the folder, and existing files are kept unless `force`. Files written."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ClientError(f"the job's result is not a readable zip: {e}") from None
    with archive:
        try:  # the rules an upload must meet, so every name is checked first
            plan = [(info, parts) for info, parts in zip_entries(archive) if parts]
        except BadRequest as e:
            raise ClientError(f"refused to extract the results: {e.message} "
                              "(fetch --zip FILE keeps the zip as it is)") from None
        if not force:
            for info, parts in plan:
                path = os.path.join(folder, *parts)
                if not info.is_dir() and os.path.lexists(path):
                    raise ClientError(f"{path} exists; use --force to overwrite")
        root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        written = 0
        try:
            for info, parts in plan:
                if info.is_dir():
                    os.close(open_beneath(root, parts, folder))
                    continue
                parent = open_beneath(root, parts[:-1], folder)
                try:
                    write_entry(archive, info, parts[-1], parent, force,
                                os.path.join(folder, *parts))
                finally:
                    os.close(parent)
                written += 1
        finally:
            os.close(root)
        return written


def write_entry(archive, info, name, parent, force, path):
    """One file of a result zip, created in the folder `parent` (a descriptor)."""
    if force:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                raise ClientError(f"{path} is a folder; it cannot be overwritten")
            os.unlink(name, dir_fd=parent)
    mode = (info.external_attr >> 16) & 0o777 or 0o644
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode,
                     dir_fd=parent)
    except FileExistsError:
        raise ClientError(f"{path} exists; use --force to overwrite") from None
    try:
        with os.fdopen(fd, "wb") as dst, archive.open(info) as src:
            shutil.copyfileobj(src, dst, CHUNK)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ClientError(f"the job's result zip is damaged ({info.filename}: {e})") from None


def part_path(folder, job_id):
    """Where a job's result zip is downloaded to before it is unpacked into `folder`."""
    return os.path.join(folder, f".jobd-{job_id}.zip.part")


def open_part(part, mode="wb"):
    """Open the file a download goes to, making its folder first."""
    folder = os.path.dirname(part)
    try:
        os.makedirs(folder or ".", exist_ok=True)
    except OSError as e:
        raise ClientError(f"cannot create {folder}: {e.strerror}") from None
    return open(part, mode)


def fetch_results(api, job_id, folder, force, progress, resource_api=True, downloaded=False):
    """Download a finished job's results and unpack them into `folder`; the partial
    download is kept in the folder until then, so a later fetch resumes it."""
    part = part_path(folder, job_id)
    if resource_api:
        download_output(api, job_id, part, progress)
    elif not downloaded:
        fetch_go(api, job_id, part, progress)
    try:
        written = extract_results(part, folder, force)
    except ClientError as e:
        e.message += f" (the download is kept: {part})"
        raise
    for path in (part, part + ".etag"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    note(f"{written} files from job {job_id} in {folder}")


def fetch_go(api, job_id, part, progress):
    """Go API: the job object of a finished job, its output decoded into `part`."""
    resp = api.request("GET", "/api/get/" + quote(job_id, safe=""), ok=(200, 202, 206),
                       job_id=job_id)
    with resp:
        if resp.status == 202:
            raise ClientError(f"job {job_id} has not finished yet", EXIT_NOT_FINISHED)
        with open_part(part) as output:
            return read_job_object(api, resp, output, progress)


# -- the commands -------------------------------------------------------------------------

def print_json(obj):
    print(json.dumps(obj, indent=2), flush=True)


def print_status(job):
    """A status object for people, one field a line."""
    code = job.get("ExitCode")
    state = job["Status"] + (f" (exit code {code})" if code not in (None, 0) else "")
    fields = [("ID", job["ID"]), ("Status", state), ("Message", job.get("Message"))]
    for key in ("CreatedAt", "StartedAt", "FinishedAt"):
        if job.get(key):
            fields.append((key[:-2], job[key][:19].replace("T", " ") + " UTC"))
    for key in ("InputBytes", "OutputBytes"):
        if job.get(key) is not None:
            fields.append((key[:-5], human_bytes(job[key])))
    for name, value in fields:
        if value not in (None, ""):
            print(f"{name + ':':<10}{value}")


def await_job(api, args, job_id, resource_api):
    """wait, and submit --wait: wait for the job (following its stdout with --follow),
    unpack its results into args.output, report, and return the job's exit status."""
    progress = Progress(enabled=not args.follow)
    try:
        if resource_api:
            if args.follow:
                follow_log(api, job_id, "stdout", sys.stdout.buffer)
            job = poll_job(api, job_id, progress)
        else:
            if args.follow:
                say("warning: this server has only the Go API; it cannot stream logs")
            # the answer that says the job is done also carries its output: keep it
            part = part_path(args.output, job_id) if args.output else None
            job = wait_go(api, job_id, progress, part)
    except KeyboardInterrupt:
        progress.clear()
        return interrupted(api, args, job_id, resource_api)
    try:
        if args.output:
            fetch_results(api, job_id, args.output, args.force, Progress(), resource_api,
                          downloaded=True)
    except KeyboardInterrupt:
        say(f"interrupted; job {job_id} has finished: get its results with "
            f"jobd fetch {job_id} -o {args.output}{url_hint(args)}")
        return EXIT_INTERRUPTED
    code = job_exit_code(job)
    if args.json:
        print_json(job)
    if code == 0:
        note(f"job {job_id}: {job['Status']}")
    else:
        say(f"job {job_id}: {job['Status']}: {job.get('Message') or 'no message'}")
    return code


def url_hint(args):
    return f" --url {args.url}" if args.url else ""


def interrupted(api, args, job_id, resource_api):
    """Ctrl-C while waiting: leave the job running and say how to get it later; a second
    Ctrl-C within 3 s, or --cancel-on-interrupt, cancels it instead."""
    if not args.cancel_on_interrupt:
        later = f"jobd wait {job_id}" + (f" -o {args.output}" if args.output else "")
        say(f"stopped waiting; job {job_id} keeps running. Later: {later}{url_hint(args)}")
        if not resource_api:
            return EXIT_INTERRUPTED
        say("press Ctrl-C again within 3 s to cancel the job")
        try:
            time.sleep(3)
            return EXIT_INTERRUPTED
        except KeyboardInterrupt:
            pass
    if not resource_api:
        say(f"this server has only the Go API; it cannot cancel job {job_id}")
        return EXIT_INTERRUPTED
    try:
        job = api.json("POST", job_path(job_id, "cancel"), job_id=job_id)
    except ClientError as e:
        if ALREADY_FINISHED not in e.message:
            raise
        job = api.json("GET", job_path(job_id), job_id=job_id)
    say(f"job {job_id}: {job['Status']}")
    return job_exit_code(job)


def cmd_submit(api, args):
    if args.output or args.follow:
        args.wait = True
    payload = Payload(args.path)
    progress = Progress()
    try:
        job, resource_api = submit_job(api, payload, args.id, args.timeout, progress)
    except KeyboardInterrupt:
        progress.clear()
        say("interrupted; the job was not submitted")
        return EXIT_INTERRUPTED
    finally:
        payload.close()
    job_id = job["ID"]
    if args.json and not args.wait:
        print_json(job)
    elif args.follow:
        note(f"job {job_id} submitted")
    elif not args.json:
        print(job_id, flush=True)
    if not args.wait:
        return 0
    return await_job(api, args, job_id, resource_api)


def cmd_wait(api, args):
    return await_job(api, args, args.id, api.job_status(args.id) is not None)


def cmd_fetch(api, args):
    job = api.job_status(args.id)
    if job is not None and job["Status"] not in FINISHED:
        raise ClientError(f"job {args.id} has not finished yet ({job['Status']}); "
                          f"jobd wait {args.id} -o DIR waits for it", EXIT_NOT_FINISHED)
    progress = Progress()
    try:
        if not args.zip:
            fetch_results(api, args.id, args.output or args.id, args.force, progress,
                          resource_api=job is not None)
            return 0
        if os.path.lexists(args.zip) and not args.force:
            raise ClientError(f"{args.zip} exists; use --force to overwrite")
        part = args.zip + ".part"
        if job is not None:
            download_output(api, args.id, part, progress)
        else:
            fetch_go(api, args.id, part, progress)
        os.replace(part, args.zip)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part + ".etag")
        return 0
    except KeyboardInterrupt:
        progress.clear()
        say("interrupted; run the same command again to resume the download")
        return EXIT_INTERRUPTED


def cmd_status(api, args):
    job = api.json("GET", job_path(args.id), job_id=args.id)
    print_json(job) if args.json else print_status(job)
    return 0


def cmd_logs(api, args):
    stream = "stderr" if args.stderr else "stdout"
    if args.follow:
        follow_log(api, args.id, stream, sys.stdout.buffer)
        return 0
    with api.request("GET", job_path(args.id, "logs", stream), job_id=args.id) as resp:
        try:
            shutil.copyfileobj(resp, sys.stdout.buffer, 64 * KiB)
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, BrokenPipeError):
                raise
            raise api.lost(e) from None
    sys.stdout.flush()
    return 0


def cmd_cancel(api, args):
    try:
        job = api.json("POST", job_path(args.id, "cancel"), job_id=args.id)
    except ClientError as e:
        if ALREADY_FINISHED in e.message:
            raise ClientError(f"job {args.id} has already finished; nothing to cancel") from None
        raise
    if args.json:
        print_json(job)
    note(f"job {args.id}: {job['Status']}")
    return 0


def cmd_rm(api, args):
    api.request("DELETE", job_path(args.id), ok=(204,), job_id=args.id).close()
    note(f"job {args.id} deleted")
    return 0


def cmd_ls(api, args):
    statuses = ",".join(part.strip().upper() for value in args.status or []
                        for part in value.split(",") if part.strip())
    jobs, cursor = [], None
    for _ in range(args.limit // LIST_LIMIT + 2):  # pages: bounded by the limit asked for
        query = {"limit": min(LIST_LIMIT, args.limit - len(jobs))}
        query.update({"status": statuses} if statuses else {})
        query.update({"cursor": cursor} if cursor else {})
        page = api.json("GET", "/api/jobs?" + urlencode(query))
        jobs += page["Jobs"]
        cursor = page.get("Next")
        if not cursor or len(jobs) >= args.limit:
            break
    if args.json:
        print_json(jobs)
        return 0
    rows = [(job["ID"], job["Status"], "" if job.get("ExitCode") is None else str(job["ExitCode"]),
             (job.get("CreatedAt") or "")[:19].replace("T", " "), job.get("Message") or "")
            for job in jobs]
    if sys.stdout.isatty():
        rows.insert(0, ("ID", "STATUS", "EXIT", "CREATED (UTC)", "MESSAGE"))
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])
    return 0


def cmd_health(api, args):
    """Exit 0 when jobd answers /healthz with 200 (a container's HEALTHCHECK)."""
    health = api.json("GET", "/healthz", ok=(200, 503))
    print_json(health) if args.json else print(health["status"])
    return 0 if health["status"] == "ok" else EXIT_ERROR


COMMANDS = {"submit": cmd_submit, "status": cmd_status, "wait": cmd_wait, "fetch": cmd_fetch,
            "logs": cmd_logs, "cancel": cmd_cancel, "rm": cmd_rm, "ls": cmd_ls,
            "health": cmd_health}


def positive(parse):
    """An argparse type from a parse_* function, for values above 0 (its message kept)."""
    def convert(text):
        try:
            value = parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
        return value
    return convert


def client_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"jobd's address [JOBD_URL, default {DEFAULT_URL}]")
    common.add_argument("--token-file", metavar="FILE",
                        help="read the API token from FILE [JOBD_TOKEN_FILE, else "
                        "JOBD_TOKEN]")
    parser = argparse.ArgumentParser(prog="jobd", description="jobd's command-line client.",
                                     epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, summary, description, codes=False):
        return commands.add_parser(name, parents=[common], help=summary,
                                   description=description,
                                   epilog=EXIT_CODES_HELP if codes else None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    def waiting(p):
        p.add_argument("-o", "--output", metavar="DIR", help="unpack the results into DIR")
        p.add_argument("--force", action="store_true", help="overwrite existing files in DIR")
        p.add_argument("--follow", action="store_true",
                       help="print the job's stdout live while waiting")
        p.add_argument("--cancel-on-interrupt", action="store_true",
                       help="Ctrl-C cancels the job (else it keeps running)")
        p.add_argument("--json", action="store_true", help="print the final status as JSON")

    p = command("submit", "upload a job folder or zip",
                "Upload a job: a folder with run.sh at its top (zipped on the fly) or a .zip.\n"
                "Prints the job's id. With --wait, waits and exits with the job's exit code.\n"
                "example: jobd submit examples/hello --wait -o out/", codes=True)
    p.add_argument("path", metavar="PATH", help="job folder or .zip")
    p.add_argument("--id", help="the job's id (default: jobd picks one)")
    p.add_argument("--timeout", metavar="SECONDS", type=positive(parse_duration),
                   help="time limit for the job (e.g. 90, 30m, 2h)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end (-o and "
                   "--follow imply it)")
    waiting(p)
    p = command("wait", "wait for a job to end",
                "Wait for a job to end, optionally unpack its results, and exit with its\n"
                "exit code. Ctrl-C stops waiting; the job keeps running.", codes=True)
    p.add_argument("id", metavar="ID")
    waiting(p)
    p = command("fetch", "download a finished job's results",
                "Download a finished job's results and unpack them (default: into ./ID).\n"
                "An interrupted download is resumed by running the same command again.")
    p.add_argument("id", metavar="ID")
    p.add_argument("-o", "--output", metavar="DIR", help="unpack into DIR (default: ./ID)")
    p.add_argument("--zip", metavar="FILE", help="save the result zip as FILE instead")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p = command("status", "show a job's status", "Show a job's status.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print the status object as JSON")
    p = command("logs", "print a job's stdout or stderr",
                "Print a job's stdout (or --stderr) so far; -f follows it until the job ends.")
    p.add_argument("id", metavar="ID")
    p.add_argument("-f", "--follow", action="store_true", help="follow the log live")
    p.add_argument("--stderr", action="store_true", help="the job's stderr instead")
    p = command("cancel", "stop a queued or running job",
                "Cancel a job: a queued job never starts, a running one is stopped.")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print the status object as JSON")
    p = command("rm", "delete a job and its files",
                "Delete a job (cancelling it first if needed) and all its files.")
    p.add_argument("id", metavar="ID")
    p = command("ls", "list jobs", "List jobs, newest first.")
    p.add_argument("--status", action="append", metavar="S",
                   help=f"only jobs in state S (repeatable; {', '.join(STATES)})")
    p.add_argument("--limit", type=positive(parse_count), default=50, metavar="N",
                   help="at most N jobs (default 50)")
    p.add_argument("--json", action="store_true", help="print a JSON array of status objects")
    p = command("health", "check that jobd is healthy",
                "Ask jobd's /healthz; exit 0 when healthy (for a container HEALTHCHECK).")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    return parser


def count_interrupts_once():
    """Make one Ctrl-C one KeyboardInterrupt. A frozen jobd runs under bootloaders that
    forward SIGINT to it while the terminal sends it too: copies within 0.3 s are dropped
    (else one Ctrl-C would count as the second one, which cancels the job)."""
    last = []

    def on_interrupt(signum, frame):
        now = time.monotonic()
        if last and now - last[-1] < 0.3:
            return
        last[:] = [now]
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored by `&`
        signal.signal(signal.SIGINT, on_interrupt)


def client_main(argv):
    """Run one client command; its exit status. Errors are one line, never a traceback."""
    if sys.stdout is None:  # started with stdout closed (>&-): print into nothing
        sys.stdout = io.StringIO()
    args = client_parser().parse_args(argv)
    count_interrupts_once()
    url = args.url or os.environ.get("JOBD_URL") or DEFAULT_URL
    if args.command == "health" and not (args.url or os.environ.get("JOBD_URL")):
        url = f"http://127.0.0.1:{os.environ.get('PORT') or 8080}"  # the jobd beside it
    try:
        try:
            token = read_token(args.token_file or os.environ.get("JOBD_TOKEN_FILE"), os.environ)
        except ValueError as e:
            raise ClientError(str(e)) from None
        api = Api(url, token)
        return COMMANDS[args.command](api, args)
    except NoEndpoint as e:
        if args.command in ("submit", "wait", "fetch"):
            say(f"{e.message}; is {url} a jobd?")
        else:
            say(f"{url} has no /api/jobs (a Go jobd?); `jobd {args.command}` needs it")
        return EXIT_ERROR
    except ClientError as e:
        say(e.message)
        return e.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (| head): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # local files: the network's errors are ClientErrors by now
        say(f"{e.filename or 'error'}: {e.strerror or e}")
        return EXIT_ERROR
    except Exception as e:
        say(f"unexpected error: {type(e).__name__}: {e}")
        return EXIT_ERROR


# ====================================================================================
# Main
# ====================================================================================

class Jobd:
    """What one running daemon holds: its settings, log, metrics, store and runner."""

    def __init__(self, cfg, log):
        self.cfg, self.log = cfg, log
        self.started = time.time()
        self.metrics = Metrics()
        self.store = Store(cfg.db_file, cfg.data, cfg.max_queued, cfg.callback_retry, log)
        self.runner = Runner(self.store, cfg, log, self.metrics)
        self.cpu = CpuMeter()


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")



def serve(cfg):
    """Run the daemon until SIGTERM or SIGINT; then stop gracefully and return 0."""
    log = Log(cfg.log_format)
    try:
        app = Jobd(cfg, log)
        server = Server(app)
    except (OSError, sqlite3.Error) as e:
        print(f"jobd: cannot start: {e}", file=sys.stderr)
        return 1
    received = []

    def on_signal(signum, frame):
        # Nothing that takes a lock: Python runs a handler between two bytecodes of the
        # main thread, which may hold that very lock. (Event.set() here hung 2 of about
        # 300 stops under load: the main thread was inside the same Event's wait().)
        received.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app.runner.start()
    frontend = Frontend(server)
    loop = threading.Thread(target=frontend.run, name="http", daemon=True)
    loop.start()
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    if not cfg.token and not is_loopback(cfg.host):
        log("no token set (JOBD_TOKEN or --token-file): anyone who can reach this port can "
            "run jobs", level="warning")
    log(f"listening on http://{host}:{port}", version=__version__, workers=cfg.workers,
        data=app.store.data_dir, db=os.path.abspath(cfg.db_file))
    # Look often: Python runs the handler only when the main thread next runs bytecode,
    # and a sleep the signal does not interrupt ends first.
    while not received:
        time.sleep(0.2)
    log("stopping", signal=received[0], grace=cfg.grace)
    frontend.stopping.set()
    loop.join()  # within a pass (0.1 s), unless a commit is slow
    server.server_close()
    app.runner.stop(cfg.grace)
    app.store.close()
    log("stopped")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in CLIENT_COMMANDS:
        return client_main(argv)
    parser = argparse.ArgumentParser(
        prog="jobd", usage="jobd [serve] [server flags]\n       jobd COMMAND [options]",
        description="Serve jobs (a zip holding run.sh) over HTTP, or, with a COMMAND, "
                    "talk to a jobd as its client.\n\n" + CLIENT_SUMMARY,
        epilog="Server flags win over environment variables, shown in [brackets].",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jobd {__version__}")
    server_arguments(parser.add_argument_group("server flags"))
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    elif argv[:1] and not argv[0].startswith("-"):
        parser.error(f"unknown command {argv[0]!r} (commands: serve, {', '.join(CLIENT_COMMANDS)})")
    args, unknown = parser.parse_known_args(argv)
    misplaced = [word for word in unknown if word in CLIENT_COMMANDS]
    if misplaced:
        parser.error(f"the command comes first: jobd {misplaced[0]} [options]")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return serve(load_config(args, os.environ))


if __name__ == "__main__":
    sys.exit(main())

"""A small, strict, streaming multipart/form-data reader (RFC 7578, RFC 2046).

Scratch module: its sections are meant to be pasted into jobd.py. Standard library only.

The reader never holds more than one read chunk plus one boundary of a part's data in memory,
whatever the size of the parts: data is scanned with bytes.find and written out as it arrives.

What it accepts, and why (the sender that matters is job-orchestrator's server mode, which uses
reqwest's multipart Form; see reqwest src/async_impl/multipart.rs):
- the body starts with "--boundary" (reqwest sends no preamble); a preamble of at most
  max_header_bytes before "\\r\\n--boundary" is skipped, as RFC 2046 allows;
- CRLF line endings only; a boundary line may carry trailing spaces/tabs (RFC 2046 padding);
- a delimiter inside part data that is not followed by "--" or padding + CRLF is an error, not data:
  RFC 2046 forbids the boundary inside the parts, so such a body is corrupt or forged;
- each part needs `Content-Disposition: form-data` with a `name`; a value is a quoted string (with
  backslash escapes, as reqwest writes `filename="a\\"b"`) or unquoted up to the next `; param=`;
  `name*=`/`filename*=` are read only as `utf-8''percent-encoded` and win over name/filename.
  reqwest sends `name*=utf-8''sub%2Fa(1).txt` for a field name with '/', a space, '%', non-ASCII...
  (the field name is the file's path inside the job folder) and leaves ( ) ; = @ [ \\ ] in it raw;
  it does not escape a '\\' in name="...", so a name ending in '\\' cannot be read and is refused;
- header names are case-insensitive, values UTF-8; folded lines, bare CR or LF, control characters,
  duplicate headers or parameters are errors;
- a completely empty body is a form with no parts: reqwest sends exactly that (Content-Length: 0)
  when the orchestrator's job folder holds no file;
- the closing "--boundary--" is required; the epilogue after it is read and discarded.
"""

import re
import urllib.parse

# --------------------------------------------------------------------------------------------
# Errors: all are ValueError, so a handler can answer 400 for any of them.
# --------------------------------------------------------------------------------------------


class MultipartError(ValueError):
    """The request body is not a well-formed multipart/form-data body."""


class MissingBoundary(MultipartError):
    """No boundary parameter, or the body does not start with the boundary."""


class TruncatedBody(MultipartError):
    """The body ended before the closing boundary."""


class HeaderTooLarge(MultipartError):
    """A part's header section (or the preamble) is larger than allowed."""


class MalformedPart(MultipartError):
    """A part's headers or a boundary line do not follow the grammar."""


class TooManyParts(MultipartError):
    """The body holds more parts than allowed."""


# --------------------------------------------------------------------------------------------
# Content-Type and Content-Disposition parameters
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_OWS = re.compile(r"[ \t]*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_PARAM_START = re.compile(r";[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+[ \t]*=")
_LAST_SEMICOLON = re.compile(r";[ \t]*\Z")
_UNQUOTED = re.compile(r'[^\x00-\x20"\x7f]+')
# RFC 2046 bchars; a space is allowed inside but not at the end.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _parse_params(text, what):
    """Parse `; name=value` pairs (value quoted or not) into a dict with lowercased names."""
    params = {}
    i, end = 0, len(text)
    while i < end:  # each turn consumes at least the ';'
        i = _OWS.match(text, i).end()
        if i == end:
            break
        if text[i] != ";":
            raise MalformedPart(f"{what}: expected ';' at {text[i:i + 20]!r}")
        i = _OWS.match(text, i + 1).end()
        if i == end:
            break  # a trailing ';' is harmless
        m = _TOKEN.match(text, i)
        if not m:
            raise MalformedPart(f"{what}: bad parameter name at {text[i:i + 20]!r}")
        name = m.group().lower()
        i = _OWS.match(text, m.end()).end()
        if i == end or text[i] != "=":
            raise MalformedPart(f"{what}: parameter {name!r} has no value")
        i = _OWS.match(text, i + 1).end()
        if i < end and text[i] == '"':
            m = _QUOTED.match(text, i)
            if not m:
                raise MalformedPart(f"{what}: unterminated quoted value for {name!r}")
            value = _QUOTED_PAIR.sub(r"\1", m.group(1))
            next_i = m.end()
        else:
            # Unquoted: up to the next ';' that starts a parameter. Wider than a token because
            # reqwest leaves ( ) , : ; = @ [ \ ] unencoded in `name*=utf-8''...`.
            next_i = i
            while True:  # bounded: next_i grows
                next_i = text.find(";", next_i)
                if next_i < 0 or _PARAM_START.match(text, next_i) or _LAST_SEMICOLON.match(text, next_i):
                    next_i = end if next_i < 0 else next_i
                    break
                next_i += 1
            value = text[i:next_i].rstrip(" \t")
            if not _UNQUOTED.fullmatch(value):
                raise MalformedPart(f"{what}: bad value for {name!r} at {text[i:i + 20]!r}")
        if name in params:
            raise MalformedPart(f"{what}: parameter {name!r} given twice")
        params[name] = value
        i = next_i
    return params


def parse_boundary(content_type):
    """Return the boundary of a `multipart/form-data` Content-Type header value, as bytes."""
    if not content_type:
        raise MissingBoundary("no Content-Type: expected multipart/form-data; boundary=...")
    media_type, sep, rest = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        raise MissingBoundary(f"Content-Type is {media_type.strip()!r}, not multipart/form-data")
    try:
        params = _parse_params(sep + rest, "Content-Type")
    except MalformedPart as e:
        raise MissingBoundary(str(e)) from None
    boundary = params.get("boundary")
    if boundary is None:
        raise MissingBoundary("Content-Type multipart/form-data has no boundary parameter")
    if not _BOUNDARY.fullmatch(boundary):
        raise MissingBoundary(
            f"invalid boundary {boundary[:80]!r}: 1 to 70 of the characters RFC 2046 allows")
    return boundary.encode("ascii")


def _ext_value(value, what):
    """Decode an RFC 8187 ext-value; only UTF-8 is accepted (reqwest sends `utf-8''...`)."""
    charset, q1, rest = value.partition("'")
    _language, q2, encoded = rest.partition("'")
    if not (q1 and q2):
        raise MalformedPart(f"{what}: expected charset'language'value, got {value[:80]!r}")
    if charset.lower() != "utf-8":
        raise MalformedPart(f"{what}: charset {charset!r} is not supported, only UTF-8")
    try:
        return urllib.parse.unquote(encoded, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise MalformedPart(f"{what}: percent-encoded value is not UTF-8") from None


def _parse_disposition(value):
    """Return (name, filename) from a `form-data` Content-Disposition value."""
    kind, sep, rest = value.partition(";")
    if kind.strip().lower() != "form-data":
        raise MalformedPart(f"Content-Disposition is {kind.strip()!r}, not form-data")
    params = _parse_params(sep + rest, "Content-Disposition")
    found = {}
    for key in ("name", "filename"):
        if key + "*" in params:  # the extended form wins (RFC 6266 section 4.3)
            found[key] = _ext_value(params[key + "*"], f"Content-Disposition {key}*")
        else:
            found[key] = params.get(key)
    if found["name"] is None:
        raise MalformedPart("Content-Disposition form-data has no name (RFC 7578 section 4.2)")
    return found["name"], found["filename"]


def _parse_headers(raw):
    """Parse a part's header block (without the blank line) into {lowercased name: value}."""
    headers = {}
    for line in raw.split(b"\r\n"):
        if b"\r" in line or b"\n" in line:
            raise MalformedPart("bare CR or LF in part headers")
        if line[:1] in (b" ", b"\t"):
            raise MalformedPart("folded header lines are not allowed")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name.decode("latin-1")):
            raise MalformedPart(f"malformed part header line {line[:80]!r}")
        try:
            text = value.strip(b" \t").decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPart(f"part header {name[:40]!r} is not UTF-8") from None
        if _CONTROL.search(text):
            raise MalformedPart(f"control character in part header {name[:40]!r}")
        key = name.decode("ascii").lower()
        if key in headers:
            raise MalformedPart(f"part header {key!r} given twice")
        headers[key] = text
    if "content-disposition" not in headers:
        raise MalformedPart("part without a Content-Disposition header")
    return headers


# --------------------------------------------------------------------------------------------
# The streaming reader
# --------------------------------------------------------------------------------------------


class _Source:
    """Buffered view of the body: `buf[pos:]` are the bytes read but not consumed yet."""

    def __init__(self, body, chunk_size):
        self.body = body
        self.chunk_size = chunk_size
        self.buf = b""
        self.pos = 0
        self.total = 0
        self.eof = False

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


def _after_delimiter(src, cap):
    """Consume what follows a boundary; True for the closing `--`, False when a part follows."""
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
            raise MalformedPart(
                f"a boundary is followed by {padding[:40]!r}, not CRLF or '--'"
                " (the boundary string must not occur inside part data)")
        if i >= 0:
            src.pos = i + 2
            return False
        if src.available() > cap:
            raise HeaderTooLarge(f"more than {cap} bytes of padding after a boundary")
        if not src.more():
            raise TruncatedBody("the body ends inside a boundary line")


def _read_header_block(src, cap):
    """Consume a part's header section and return it without the final blank line."""
    scanned = 0  # bytes after src.pos already known to hold no CRLFCRLF start
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
    raise HeaderTooLarge(f"a part's header section is larger than {cap} bytes")


def _copy_part_data(src, delimiter, out):
    """Write part data to `out` (or drop it when None) up to and including the next delimiter."""
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


def read_multipart(body, boundary, open_part, *, max_header_bytes=16384, max_parts=10000,
                   chunk_size=1 << 16):
    """Stream a multipart/form-data body part by part; return the number of parts.

    `body.read(n)` returns up to n bytes, b"" at the end. It must end where the request body
    ends (see LimitedReader): this function reads to the end, discarding the epilogue.
    For each part, `open_part(headers, name, filename)` gets the part's headers (names
    lowercased), its form field name and its filename (None when absent, unescaped, not yet
    made safe: see safe_basename), and returns a binary file object or None to skip the part.
    The data is written to it chunk by chunk; this function closes it when the part ends or
    when the body turns out to be malformed (the caller then removes what was written).
    Raises a MultipartError (a ValueError) for any malformed body.
    """
    if not isinstance(boundary, bytes) or not _BOUNDARY.fullmatch(boundary.decode("latin-1")):
        raise MissingBoundary(f"invalid boundary {boundary!r}")
    if chunk_size < 1 or max_header_bytes < 1 or max_parts < 0:
        raise ValueError("chunk_size and max_header_bytes must be positive, max_parts >= 0")
    src = _Source(body, chunk_size)
    dash_boundary = b"--" + boundary
    delimiter = b"\r\n" + dash_boundary

    # The opening boundary, after an optional (small) preamble.
    while True:
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
                return 0  # an empty form: what reqwest sends when there are no files
            if dash_boundary.startswith(src.buf):
                raise TruncatedBody("the body ends inside the opening boundary")
            raise MissingBoundary("the body does not start with the boundary")

    parts = 0
    while not _after_delimiter(src, max_header_bytes):  # bounded: each part consumes input
        parts += 1
        if parts > max_parts:
            raise TooManyParts(f"more than {max_parts} parts")
        headers = _parse_headers(_read_header_block(src, max_header_bytes))
        name, filename = _parse_disposition(headers["content-disposition"])
        out = open_part(headers, name, filename)
        try:
            _copy_part_data(src, delimiter, out)
        finally:
            if out is not None:
                out.close()

    src.buf, src.pos = b"", 0
    while src.more():  # the epilogue; bounded by the body's length
        src.buf, src.pos = b"", 0
    return parts


class LimitedReader:
    """Reads exactly `length` bytes of a request body from `raw` (e.g. a handler's rfile).

    Never asks `raw` for more than what is left, so it cannot block on a kept-alive
    connection, and raises TruncatedBody if the peer stops short of Content-Length.
    """

    def __init__(self, raw, length):
        self.raw = raw
        self.remaining = length

    def read(self, n):
        if self.remaining <= 0:
            return b""
        data = self.raw.read(min(n, self.remaining))
        if not data:
            raise TruncatedBody(f"the body ends {self.remaining} bytes short of its Content-Length")
        self.remaining -= len(data)
        return data


# --------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------

MAX_NAME_BYTES = 255  # NAME_MAX on Linux, macOS and most file systems


def safe_basename(filename):
    """Flatten an uploaded file name to its last path component, or raise ValueError.

    job-orchestrator's server sends each file of the job folder with its basename as filename
    (and the relative path as field name), and its client saves it as `<job dir>/<basename>`;
    so a name is cut after its last '/'. A backslash is cut the same way: Windows clients and old
    browsers send `C:\\dir\\run.sh`, and a '\\' kept inside a name becomes a path separator when a
    Windows tool unpacks the results zip. (The orchestrator's own client keeps a backslash as a
    plain character; its server only sends one for a Linux file whose name contains '\\'.)
    Refused: an empty name, '.', '..', control characters (NUL, CR, LF...), names that are not
    valid Unicode, and names longer than MAX_NAME_BYTES bytes in UTF-8.
    """
    if not isinstance(filename, str):
        raise ValueError("file name must be a string")
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise ValueError(f"file name {filename[:80]!r} has no usable last component")
    if _CONTROL.search(name) or "\t" in name:
        raise ValueError(f"file name {filename[:80]!r} contains a control character")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"file name {filename[:80]!r} is not valid Unicode") from None
    if size > MAX_NAME_BYTES:
        raise ValueError(f"file name is {size} bytes long; at most {MAX_NAME_BYTES} are allowed")
    return name

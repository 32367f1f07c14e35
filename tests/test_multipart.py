"""Tests of jobd's streaming multipart reader (for POST /submit): units, then fuzzing."""

import io
import os
import sys
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jobd as mp  # noqa: E402
import orchestrator_sim  # noqa: E402

B = b"0123456789abcdef-fedcba9876543210-0011223344556677-8899aabbccddeeff"  # reqwest's shape


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class Pieces:
    """A body that returns `data` in reads of the given sizes (cycled), and notices misuse."""

    def __init__(self, data, sizes=(1 << 16,)):
        self.data = data
        self.sizes = [max(1, s) for s in sizes] or [1]
        self.pos = 0
        self.calls = 0
        self.reads_after_end = 0

    def read(self, n):
        assert n > 0
        self.calls += 1
        if self.pos >= len(self.data):
            self.reads_after_end += 1
            assert self.reads_after_end <= 2, "the reader keeps reading after the end"
            return b""
        size = min(n, self.sizes[self.calls % len(self.sizes)])
        chunk = self.data[self.pos:self.pos + size]
        self.pos += len(chunk)
        return chunk


class Collector:
    """open_part callback that keeps every part (headers, name, filename, data) in memory."""

    def __init__(self, skip=()):
        self.parts = []
        self.skip = skip
        self.open_files = 0

    def __call__(self, headers, name, filename):
        if name in self.skip:
            self.parts.append((headers, name, filename, None))
            return None
        record = [headers, name, filename, b""]
        self.parts.append(record)
        collector = self
        collector.open_files += 1

        class Sink(io.BytesIO):
            def close(self):
                if not self.closed:
                    record[3] = self.getvalue()
                    collector.open_files -= 1
                super().close()

        return Sink()

    def simple(self):
        return [(name, filename, data) for _, name, filename, data in self.parts]


def form(parts, boundary=B, preamble=b"", epilogue=b"\r\n"):
    """Build a body from (name, filename, data, extra header lines) tuples."""
    out = [preamble + b"--" + boundary]
    for name, filename, data, *extra in parts:
        head = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            head += b'; filename="' + filename + b'"'
        for line in (extra[0] if extra else ()):
            head += b"\r\n" + line
        out.append(b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n--" + boundary)
    return b"".join(out) + b"--" + epilogue


def parse(body, boundary=B, sizes=(1 << 16,), **kw):
    collector = Collector()
    count = mp.read_multipart(Pieces(body, sizes), boundary, collector, **kw)
    assert count == len(collector.parts)
    assert collector.open_files == 0
    return collector.simple()


def sim_body(files, boundary=B.decode()):
    """The exact bytes the orchestrator (reqwest) sends for {relative path: bytes}."""
    length, chunks = orchestrator_sim.encode_form(files, boundary)
    body = b"".join(chunks)
    assert len(body) == length
    return body


# --------------------------------------------------------------------------------------------
# parse_boundary
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("multipart/form-data; boundary=abc", b"abc"),
    ("Multipart/Form-Data;boundary=abc", b"abc"),
    ('multipart/form-data; boundary="a b:c"', b"a b:c"),
    ("multipart/form-data; charset=utf-8; boundary=x-y_z; ", b"x-y_z"),
    ("multipart/form-data; BOUNDARY=" + B.decode(), B),
    ("multipart/form-data; boundary=" + "a" * 70, b"a" * 70),
])
def test_parse_boundary_accepts(value, expected):
    assert mp.parse_boundary(value) == expected


@pytest.mark.parametrize("value, message", [
    ("", "no Content-Type"),
    (None, "no Content-Type"),
    ("application/json", "not multipart/form-data"),
    ("multipart/mixed; boundary=abc", "not multipart/form-data"),
    ("multipart/form-data", "no boundary"),
    ("multipart/form-data; charset=utf-8", "no boundary"),
    ("multipart/form-data; boundary=", "bad value"),
    ('multipart/form-data; boundary=""', "invalid boundary"),
    ("multipart/form-data; boundary=" + "a" * 71, "invalid boundary"),
    ('multipart/form-data; boundary="abc "', "invalid boundary"),
    ('multipart/form-data; boundary="a\\"b"', "invalid boundary"),
    ("multipart/form-data; boundary=a; boundary=b", "given twice"),
    ('multipart/form-data; boundary="abc', "unterminated"),
    ("multipart/form-data; boundary=abc junk", "bad value"),
    ("multipart/form-data; boundary=\"abc\" junk", "expected ';'"),
])
def test_parse_boundary_refuses(value, message):
    with pytest.raises(mp.MissingBoundary, match=message):
        mp.parse_boundary(value)


# --------------------------------------------------------------------------------------------
# Well-formed bodies
# --------------------------------------------------------------------------------------------


def test_reads_what_the_orchestrator_sends():
    files = {
        "run.sh": b"#!/bin/bash\necho hi\n",
        "data/in put.txt": b"x" * 100_000,
        'we"ird\\name.txt': b"\r\n--" + B[:-1] + b"\r\n--",
        "empty": b"",
        "sub/dir/\u00fcn\u00efcode.dat": bytes(range(256)) * 3,
    }
    body = sim_body(files)
    assert b"name*=utf-8''data%2Fin%20put.txt" in body
    assert b'filename="we\\"ird\\\\name.txt"' in body
    collector = Collector()
    assert mp.read_multipart(Pieces(body, (1000, 17)), B, collector) == len(files)
    got = collector.simple()
    assert [(n, d) for n, _, d in got] == list(files.items())
    assert [f for _, f, _ in got] == [p.rsplit("/", 1)[-1] for p in files]
    assert all(list(headers) == ["content-disposition"] for headers, *_ in collector.parts)


def test_empty_body_is_an_empty_form():
    assert sim_body({}) == b""
    assert parse(b"") == []


def test_closing_boundary_only_is_an_empty_form():
    assert parse(b"--" + B + b"--\r\n") == []
    assert parse(b"--" + B + b"--") == []


def test_preamble_padding_epilogue_and_headers():
    body = (b"a preamble\r\n--" + B + b" \t\r\n"
            b"content-disposition: FORM-DATA; name=a; filename*=UTF-8'en'%C3%A9t%C3%A9.txt\r\n"
            b"Content-Type: text/plain\r\n\r\nsummer\r\n--" + B + b"--  \r\nepilogue --" + B)
    collector = Collector()
    assert mp.read_multipart(Pieces(body, (3,)), B, collector) == 1
    headers, name, filename, data = collector.parts[0]
    assert (name, filename, data) == ("a", "\u00e9t\u00e9.txt", b"summer")
    assert headers["content-type"] == "text/plain"


def test_filename_star_wins_and_escapes_are_undone():
    body = form([(b"f", b'a\\"b\\\\c', b"1"), (b"g", b"plain", b"2", [b"X-Other: 1"])])
    body = body.replace(b"--" + B + b"--", b"--" + B + b"\r\nContent-Disposition: form-data;"
                        b" name*=utf-8''a(1);b%20c; filename*=utf-8''%2e%2e; filename=\"x\""
                        b"\r\n\r\n3\r\n--" + B + b"--")
    assert parse(body) == [("f", 'a"b\\c', b"1"), ("g", "plain", b"2"), ("a(1);b c", "..", b"3")]


def test_unescaped_backslash_in_name():
    # reqwest escapes '\\' in filename="..." but not in name="..."; a backslash before the closing
    # quote of a name then reads as an escaped quote. Only a file whose path ends in '\\' and needs
    # no percent-encoding sends this; it is refused rather than guessed.
    assert parse(sim_body({"a\\b": b"1"})) == [("ab", "a\\b", b"1")]
    with pytest.raises(mp.MalformedPart):
        parse(sim_body({"a\\": b"1"}))


def test_part_without_filename_and_skipped_parts():
    body = form([(b"field", None, b"value"), (b"file", b"f.txt", b"data" * 1000)])
    collector = Collector(skip=("file",))
    assert mp.read_multipart(Pieces(body, (7,)), B, collector) == 2
    assert collector.simple() == [("field", None, b"value"), ("file", "f.txt", None)]


def test_boundary_prefixes_inside_data_are_data():
    tricky = [b"\r\n--" + B[:k] for k in range(len(B))] + [b"--" + B, b"\r--" + B, b"\n--" + B]
    data = b"|".join(tricky)
    body = form([(b"a", b"a", data), (b"b", b"b", b"\r\n"), (b"c", b"c", b"\r")])
    for sizes in [(1,), (2, 3), (len(B) + 3,), (64, 1, 5), (1 << 16,)]:
        assert parse(body, sizes=sizes) == [("a", "a", data), ("b", "b", b"\r\n"),
                                            ("c", "c", b"\r")]


def test_files_are_closed_and_counted():
    body = form([(b"n%d" % i, b"f", b"x") for i in range(50)])
    collector = Collector()
    assert mp.read_multipart(Pieces(body), B, collector, max_parts=50) == 50
    assert collector.open_files == 0


# --------------------------------------------------------------------------------------------
# Malformed bodies
# --------------------------------------------------------------------------------------------

GOOD = form([(b"run.sh", b"run.sh", b"echo 1\n"), (b"a", b"a.txt", b"hello\r\nworld")])


def test_truncated_at_every_offset():
    end_of_close = GOOD.index(b"--" + B + b"--") + len(B) + 4
    for cut in range(len(GOOD) + 1):
        for sizes in [(1 << 16,), (1,), (5, 2)]:
            body = Pieces(GOOD[:cut], sizes)
            collector = Collector()
            if cut == 0:
                assert mp.read_multipart(body, B, collector) == 0
            elif cut >= end_of_close:
                assert mp.read_multipart(body, B, collector) == 2
            else:
                with pytest.raises(mp.TruncatedBody):
                    mp.read_multipart(body, B, collector)
            assert collector.open_files == 0


def test_missing_closing_boundary():
    with pytest.raises(mp.TruncatedBody, match="no closing boundary"):
        parse(GOOD[:GOOD.rindex(b"\r\n--")])


@pytest.mark.parametrize("body", [
    b"hello",
    b"-" * 10,
    b"--wrong-boundary\r\n",
    b"\r\n\r\n" + b"x" * 100_000,
    (b"--" + B).lower().replace(b"a", b"A") + b"\r\n",
])
def test_missing_opening_boundary(body):
    with pytest.raises(mp.MissingBoundary):
        parse(body)


def test_garbage_is_refused_after_a_bounded_read():
    body = Pieces(b"x" * 10_000_000, (4096,))
    with pytest.raises(mp.MissingBoundary, match="no opening boundary"):
        mp.read_multipart(body, B, Collector(), max_header_bytes=1000, chunk_size=4096)
    assert body.pos <= 1000 + 2 * 4096 + len(B) + 4


def test_huge_part_headers_are_refused_after_a_bounded_read():
    head = b"--" + B + b'\r\nContent-Disposition: form-data; name="a"\r\nX-Big: '
    body = Pieces(head + b"y" * 10_000_000, (4096,))
    with pytest.raises(mp.PartHeadersTooLarge):
        mp.read_multipart(body, B, Collector(), max_header_bytes=16384, chunk_size=4096)
    assert body.pos <= 16384 + 3 * 4096 + len(head)
    # A whole oversized header block arriving in one read is refused too.
    big = form([(b"a", b"a", b"1", [b"X-Big: " + b"z" * 20000])])
    with pytest.raises(mp.PartHeadersTooLarge):
        parse(big, sizes=(1 << 20,), chunk_size=1 << 20)
    assert parse(big, max_header_bytes=30000)[0][2] == b"1"


def test_too_many_parts():
    body = form([(b"n", b"f", b"")] * 11)
    with pytest.raises(mp.TooManyParts):
        parse(body, max_parts=10)


@pytest.mark.parametrize("headers, message", [
    (b"Content-Disposition form-data; name=\"a\"", "malformed part header line"),
    (b'Content-Disposition: form-data; name="a"\r\n folded', "folded"),
    (b'Content-Disposition: form-data; name="a"\nX: y', "bare CR or LF"),
    (b'Content-Disposition: form-data; name="a"\rX: y', "bare CR or LF"),
    (b"X-Other: 1", "without a Content-Disposition"),
    (b'Content-Disposition: attachment; name="a"', "not form-data"),
    (b'Content-Disposition: form-data; filename="a"', "no name"),
    (b'Content-Disposition: form-data; name="a"; name="b"', "given twice"),
    (b'Content-Disposition: form-data; name="a"\r\ncontent-disposition: form-data; name="b"',
     "given twice"),
    (b'Content-Disposition: form-data; name="a', "unterminated"),
    (b'Content-Disposition: form-data; name="a"; filename*=latin-1\'\'%e9', "not supported"),
    (b'Content-Disposition: form-data; name="a"; filename*=utf-8\'\'%e9', "not UTF-8"),
    (b'Content-Disposition: form-data; name="a"; filename*=%e9', "charset'language'value"),
    (b'Content-Disposition: form-data; name="\xe9"', "not UTF-8"),
    (b'Content-Disposition: form-data; name="a\x01"', "control character"),
    (b'Content-Disposition: form-data; name="a"; filename', "has no value"),
    (b'Bad Name: 1\r\nContent-Disposition: form-data; name="a"', "malformed part header line"),
])
def test_malformed_part_headers(headers, message):
    body = b"--" + B + b"\r\n" + headers + b"\r\n\r\ndata\r\n--" + B + b"--\r\n"
    with pytest.raises(mp.MalformedPart, match=message):
        parse(body)


def test_boundary_followed_by_junk_is_refused():
    body = form([(b"a", b"a", b"before\r\n--" + B + b"junk after")])
    with pytest.raises(mp.MalformedPart, match="must not occur inside part data"):
        parse(body)


def test_lf_line_endings_are_refused():
    body = GOOD.replace(b"\r\n", b"\n")
    with pytest.raises(mp.MultipartError):
        parse(body)


def test_file_is_closed_when_the_body_is_malformed():
    collector = Collector()
    with pytest.raises(mp.TruncatedBody):
        mp.read_multipart(Pieces(GOOD[:-30]), B, collector)
    assert collector.open_files == 0


def test_bad_arguments():
    with pytest.raises(mp.MissingBoundary):
        mp.read_multipart(Pieces(GOOD), b"", Collector())
    with pytest.raises(mp.MissingBoundary):
        mp.read_multipart(Pieces(GOOD), "abc", Collector())
    with pytest.raises(ValueError):
        mp.read_multipart(Pieces(GOOD), B, Collector(), chunk_size=0)


# --------------------------------------------------------------------------------------------
# With a request body
# --------------------------------------------------------------------------------------------


def request_body(raw, length):
    return mp.RequestBody(raw, mp.Headers({"content-length": str(length)}), limit=1 << 30)


def test_request_body_stops_at_content_length_and_detects_short_bodies():
    raw = io.BytesIO(GOOD + b"GET /next HTTP/1.1\r\n")  # a pipelined next request
    assert mp.read_multipart(request_body(raw, len(GOOD)), B, Collector(), chunk_size=7) == 2
    assert raw.read() == b"GET /next HTTP/1.1\r\n"
    with pytest.raises(mp.BadRequest, match="ended early"):
        mp.read_multipart(request_body(io.BytesIO(GOOD[:-10]), len(GOOD)), B, Collector())
    with pytest.raises(mp.BadRequest):
        mp.read_multipart(request_body(io.BytesIO(b""), 10), B, Collector())


# --------------------------------------------------------------------------------------------
# safe_basename
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("run.sh", "run.sh"),
    ("a/b/c.txt", "c.txt"),
    ("../../etc/passwd", "passwd"),
    ("/abs/path.dat", "path.dat"),
    ("C:\\Users\\me\\run.sh", "run.sh"),
    ("..\\..\\evil.sh", "evil.sh"),
    (".hidden", ".hidden"),
    ("...", "..."),
    (" spaced name ", " spaced name "),
    ("\u6587\u4ef6.txt", "\u6587\u4ef6.txt"),
    ("x" * 255, "x" * 255),
])
def test_safe_basename_flattens(name, expected):
    assert mp.safe_basename(name) == expected


@pytest.mark.parametrize("name", [
    "", ".", "..", "a/", "a/..", "a\\.", "/", "\\", "nul\x00byte", "new\nline", "tab\tname",
    "del\x7f", "x" * 256, "\u00e9" * 128, "lone\udc80surrogate", None, b"bytes",
])
def test_safe_basename_refuses(name):
    with pytest.raises(ValueError):
        mp.safe_basename(name)


# --------------------------------------------------------------------------------------------
# Memory and speed
# --------------------------------------------------------------------------------------------


class BigBody:
    """One part of `size` bytes produced on the fly, full of boundary prefixes."""

    def __init__(self, size):
        self.head = b"--" + B + b'\r\nContent-Disposition: form-data; name="f"; filename="f"\r\n\r\n'
        block = b"\r\n--" + B[:-1] + b"y" * 100
        self.block = block * ((1 << 16) // len(block) + 1)
        self.left = size
        self.stage = 0

    def read(self, n):
        if self.stage == 0:
            self.stage = 1
            return self.head
        if self.left:
            chunk = self.block[:min(n, self.left)]
            self.left -= len(chunk)
            return chunk
        if self.stage == 1:
            self.stage = 2
            return b"\r\n--" + B + b"--\r\n"
        return b""


class CountingSink:
    size = 0

    def write(self, data):
        self.size += len(data)

    def close(self):
        pass


def test_memory_stays_flat_for_a_200_mb_part():
    sink = CountingSink()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        assert mp.read_multipart(BigBody(200 << 20), B, lambda *a: sink) == 1
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sink.size == 200 << 20
    assert peak < 1 << 20, f"peak Python allocations {peak} bytes"
    assert elapsed < 10  # ~0.2 s here; tests/bench_multipart.py measures MB/s


# --------------------------------------------------------------------------------------------
# Fuzzing
# --------------------------------------------------------------------------------------------

# JOBD_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps this file under 20 s.
FUZZ = settings(max_examples=int(os.environ.get("JOBD_FUZZ_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Data that likes to look like boundaries: pieces of the delimiter glued to random bytes.
DELIM = b"\r\n--" + B
tricky_bytes = st.lists(
    st.one_of(st.binary(max_size=40),
              st.integers(0, len(DELIM) - 1).map(lambda k: DELIM[:k]),
              st.sampled_from([b"\r", b"\n", b"\r\n", b"--", b"\r\n--", b"\r\n--" + B[:-1]])),
    max_size=12).map(b"".join)
# No backslash: reqwest writes a field name that needs no percent-encoding as name="..." without
# escaping it, so a name ending in '\\' cannot be read back (see test_unescaped_backslash_in_name).
names = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\\"),
                min_size=1, max_size=20)
read_sizes = st.lists(st.integers(1, 200), min_size=1, max_size=8)


@FUZZ
@given(files=st.dictionaries(names, tricky_bytes, max_size=6), sizes=read_sizes,
       chunk=st.integers(1, 300))
def test_fuzz_any_split_gives_the_same_parts(files, sizes, chunk):
    assume(all(DELIM not in data for data in files.values()))  # RFC 2046: never inside parts
    body = sim_body(files)
    got = parse(body, sizes=sizes, chunk_size=chunk)
    assert [(n, d) for n, _, d in got] == list(files.items())
    assert [f for _, f, _ in got] == [n.rsplit("/", 1)[-1] for n in files]


@FUZZ
@given(files=st.dictionaries(names, tricky_bytes, min_size=1, max_size=4),
       cut=st.integers(0, 10_000), sizes=read_sizes)
def test_fuzz_truncation_raises_truncated(files, cut, sizes):
    assume(all(DELIM not in data for data in files.values()))
    body = sim_body(files)
    end_of_close = len(body) - 2  # reqwest ends with "--boundary--\r\n"
    cut = cut % end_of_close
    assume(cut > 0)
    with pytest.raises(mp.TruncatedBody):
        parse(body[:cut], sizes=sizes)


@FUZZ
@given(data=st.binary(max_size=600), sizes=read_sizes, chunk=st.integers(1, 100))
def test_fuzz_garbage_only_raises_value_errors(data, sizes, chunk):
    for body in (data, b"--" + B + data, b"--" + B + b"\r\n" + data):
        try:
            parse(body, sizes=sizes, chunk_size=chunk, max_header_bytes=256)
        except mp.MultipartError:
            pass


@FUZZ
@given(files=st.dictionaries(names, tricky_bytes, min_size=1, max_size=3),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3),
                                st.integers(0, 3)), min_size=1, max_size=4),
       sizes=read_sizes)
def test_fuzz_mutated_bodies_only_raise_value_errors(files, edits, sizes):
    body = bytearray(sim_body(files))
    for at, insert, delete in edits:
        at %= len(body) + 1
        body[at:at + delete] = insert
    try:
        parse(bytes(body), sizes=sizes)
    except mp.MultipartError:
        pass


@FUZZ
@given(st.text(max_size=80))
def test_fuzz_safe_basename_is_one_safe_component(name):
    try:
        safe = mp.safe_basename(name)
    except ValueError:
        return
    assert safe and safe not in (".", "..") and "/" not in safe and "\\" not in safe
    assert "\x00" not in safe and len(safe.encode()) <= 255
    assert name.endswith(safe)


@FUZZ
@given(st.text(max_size=120))
def test_fuzz_parse_boundary_only_raises_value_errors(value):
    try:
        boundary = mp.parse_boundary("multipart/form-data; boundary=" + value)
    except mp.MissingBoundary:
        return
    assert 1 <= len(boundary) <= 70

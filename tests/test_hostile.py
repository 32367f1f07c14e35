"""Hostile input: zips made to escape, exhaust or confuse, and malformed HTTP.

Every refusal must leave nothing behind, and after every test the daemon still answers.
"""

import base64
import json
import os
import socket
import threading
import time

import pytest

from conftest import IMPLEMENTATIONS, jobd_command, make_zip, unzip
from helpers import (JSON_TYPE, assert_go_error, assert_nothing_stored, closed_by_peer,
                     shared_server, store_state,
                     raw_connect, raw_exchange, raw_zip, read_response, tree_size, upload_body,
                     wait_until, zeros_deflated, zip_entry)


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def shared(request, tmp_path_factory):
    """One jobd for this module's tests that leave nothing behind."""
    yield from shared_server(jobd_command(request.param), tmp_path_factory.mktemp("shared"))


RUN = zip_entry("run.sh", b"echo x\n")


def assert_alive(server):
    """The daemon answers a plain request promptly."""
    started = time.monotonic()
    resp = server.request("GET", "/api/get/alive-check", timeout=5)
    assert resp.status == 404 and resp.json()["message"] == "job not found", resp
    assert time.monotonic() - started < 2
    assert server.proc.poll() is None


def refused(server, zip_bytes, needle=None, status=400):
    """Upload a hostile zip: refused with a Go error body, nothing stored, server alive."""
    before = store_state(server)
    resp = server.request("POST", "/api/upload", upload_body("hostile", zip_bytes))
    body = assert_go_error(resp, status, "bad_request" if status == 400 else resp.json()["error"])
    if needle is not None:
        assert needle.lower() in body["message"].lower(), body
    assert_nothing_stored(server, "hostile", before=before)
    assert_alive(server)
    return body


# ==================================================================================
# Hostile zips
# ==================================================================================

@pytest.mark.parametrize("files,modes", [
    ({"run.sh": "echo x\n", "link": "/etc/passwd"}, {"link": 0o120777}),
    ({"run.sh": "/etc/passwd"}, {"run.sh": 0o120777}),
    ({"run.sh": "echo x\n", "dirlink": "/tmp", "dirlink/x": "through the link"},
     {"dirlink": 0o120777}),
    ({"run.sh": "echo x\n", "a/b/up": "../../.."}, {"a/b/up": 0o120777}),
])
def test_symlink_entries_are_refused(shared, files, modes):
    refused(shared, make_zip(files, modes))


@pytest.mark.parametrize("mode", [0o010644, 0o020644, 0o060644, 0o140644])
def test_fifo_device_and_socket_entries_are_refused(shared, mode):
    refused(shared, make_zip({"run.sh": "echo x\n", "special": ""}, {"special": mode}))


def test_zip_bomb_is_refused_fast_without_inflating(jobd):
    # 2 MiB of deflate data that inflates to 2 GiB, named by 9 directory entries: 18 GiB
    # declared, above the 16 GiB default cap. Inflating even one would take many seconds
    # on this machine (and 2 GiB of disk if written).
    kernel, crc = zeros_deflated(2047)
    entries = [RUN, zip_entry("bomb0", compressed=kernel, crc=crc, size=2047 << 20)]
    entries += [zip_entry(f"bomb{n}", compressed=kernel, crc=crc, size=2047 << 20,
                          share_with="bomb0") for n in range(1, 9)]
    bomb = raw_zip(entries)
    assert len(bomb) < 3 << 20
    before = tree_size(jobd.workdir)
    started = time.monotonic()
    refused(jobd, bomb, needle="unpacks to more than")
    assert time.monotonic() - started < 5
    assert tree_size(jobd.workdir) - before < 1 << 20


def test_real_bomb_above_max_unpacked_is_refused_before_inflating(make_jobd):
    # One honest entry of 1 GiB of zeros (1 MiB of deflate) against --max-unpacked 64M.
    server = make_jobd(args=["--max-unpacked", "64M"])
    kernel, crc = zeros_deflated(1024)
    bomb = raw_zip([RUN, zip_entry("zeros", compressed=kernel, crc=crc, size=1 << 30)])
    started = time.monotonic()
    refused(server, bomb, needle="unpacks to more than")
    assert time.monotonic() - started < 3  # inflating 1 GiB takes ~7 s here


def test_entry_that_inflates_past_its_declared_size_is_refused(shared):
    # Declares 1 KiB, holds 64 MiB: a reader trusting the header would be fooled.
    kernel, crc = zeros_deflated(64)
    liar = raw_zip([RUN, zip_entry("liar", compressed=kernel, crc=crc, size=1024)])
    refused(shared, liar)


def test_max_entries_is_enforced_at_the_boundary(make_jobd):
    server = make_jobd(args=["--max-entries", "10"])
    at_cap = {"run.sh": "echo x\n", **{f"f{n}": "x" for n in range(9)}}
    assert server.upload("ten", at_cap).status == 201
    over = {**at_cap, "f9": "x"}
    resp = server.upload("eleven", over)
    assert_go_error(resp, 400, "bad_request")
    assert "11 entries" in resp.json()["message"]
    assert server.get("eleven").status == 404
    assert server.output("ten")[0]["Status"] == "SUCCESS"


def test_max_unpacked_is_enforced_at_the_boundary(make_jobd):
    server = make_jobd(args=["--max-unpacked", "1000"])
    script = "echo x\n"
    fits = {"run.sh": script, "pad": "p" * (1000 - len(script))}
    assert server.upload("fits", fits).status == 201
    resp = server.upload("over", {**fits, "pad": "p" * (1001 - len(script))})
    assert_go_error(resp, 400, "bad_request")
    assert server.get("over").status == 404
    assert server.output("fits")[0]["Status"] == "SUCCESS"


def test_encrypted_entry_is_refused(shared):
    refused(shared, raw_zip([RUN, zip_entry("secret", b"\x00" * 24, method=0, flags=0x1)]),
            needle="encrypted")


def test_encrypted_run_sh_is_refused(shared):
    refused(shared, raw_zip([zip_entry("run.sh", b"\x00" * 24, method=0, flags=0x1)]))


@pytest.mark.parametrize("names", [
    ["run.sh", "run.sh"], ["run.sh", "a.txt", "a.txt"], ["run.sh", "./run.sh"],
    ["run.sh", "a/b", "a//b"], ["run.sh", "d/x", "d/./x"]])
def test_duplicate_entry_names_are_refused(shared, names):
    refused(shared, raw_zip([zip_entry(name, b"echo x\n") for name in names]))


@pytest.mark.parametrize("names", [
    ["run.sh", "x", "x/y"], ["run.sh", "x/y", "x"], ["run.sh", "x", "x/"],
    ["run.sh", "a/b/c", "a/b"], ["run.sh", "run.sh/inner"]])
def test_file_versus_folder_clash_is_refused(shared, names):
    entries = [zip_entry(name, b"", method=0, mode=0o040755) if name.endswith("/")
               else zip_entry(name, b"echo x\n") for name in names]
    refused(shared, raw_zip(entries))


@pytest.mark.parametrize("name", [
    "../x", "../../x", "a/../../x", "a/../..", "..", "/abs/x", "/x", "//x",
    "..\\x", "a\\..\\..\\x", "\\abs\\x", "\\..\\x", "a/..\\..\\x", "./../x"])
def test_absolute_and_parent_names_are_refused(shared, name):
    refused(shared, raw_zip([RUN, zip_entry(name, b"escaped")]), needle="unsafe")
    assert not os.path.exists(shared.workdir / "x")
    assert not os.path.exists("/abs/x")


@pytest.mark.parametrize("name", [b"data\x00.txt", b"run.sh\x00evil", b"a/\x00/b"])
def test_nul_in_entry_names_is_refused(shared, name):
    # Python's zipfile cuts names at NUL, so a check on the cut name sees nothing wrong;
    # other tools read these names differently, so the zip is ambiguous: refuse it.
    entries = [zip_entry(name, b"echo from nul\n")]
    if not name.startswith(b"run.sh"):
        entries.insert(0, RUN)
    refused(shared, raw_zip(entries))


def test_overlapping_entries_are_refused(shared):
    # Two directory records pointing at the same data (the trick of non-recursive bombs).
    refused(shared, raw_zip([RUN, zip_entry("alias", b"echo x\n", share_with="run.sh")]))


def test_bad_crc_is_refused(shared):
    refused(shared, raw_zip([RUN, zip_entry("data", b"hello world", method=0, crc=12345)]))


def test_corrupt_deflate_data_is_refused(shared):
    refused(shared, raw_zip([RUN, zip_entry("data", compressed=b"\xff\xfe\xfd" * 20, crc=0,
                                          size=1000)]))


def test_entry_shorter_than_declared_is_refused(shared):
    refused(shared, raw_zip([RUN, zip_entry("data", b"short", method=0, size=5000)]))


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_truncated_zip_is_refused(shared, cut):
    data = make_zip({"run.sh": "echo x\n", "blob": os.urandom(4000)})
    refused(shared, data[: int(len(data) * cut)])


def test_zip_without_its_end_record_is_refused(shared):
    data = make_zip({"run.sh": "echo x\n"})
    refused(shared, data[: data.rindex(b"PK\x05\x06")])


def test_empty_zip_is_refused(shared):
    refused(shared, b"PK\x05\x06" + b"\0" * 18, needle="run.sh")


@pytest.mark.parametrize("name", ["n" * 256, "d/" * 2100 + "x"], ids=["part", "whole"])
def test_overlong_names_are_refused(shared, name):
    refused(shared, raw_zip([RUN, zip_entry(name, b"x")]))


def test_harmless_odd_names_are_accepted(jobd):
    # Not everything unusual is hostile: these unpack safely and must work.
    files = {"./run.sh": "cat 'sp ace.txt' caf\u00e9.txt > out.txt\n", "sp ace.txt": "a\n",
             "caf\u00e9.txt": "b\n", "deep/./er/x": "x", "-dash": "d", "folder/": ""}
    assert jobd.upload("odd", files).status == 201
    job, out = jobd.output("odd")
    assert job["Status"] == "SUCCESS", job["Message"]
    assert out["out.txt"] == b"a\nb\n" and out["deep/er/x"] == b"x" and out["-dash"] == b"d"


# ==================================================================================
# Hostile JSON
# ==================================================================================

def test_huge_id_is_refused(shared):
    before = store_state(shared)
    body = json.dumps({"id": "a" * (10 << 20), "input": base64.b64encode(b"x").decode()})
    assert_go_error(shared.request("POST", "/api/upload", body), 400, "bad_request")
    assert_nothing_stored(shared, before=before)
    assert_alive(shared)


@pytest.mark.parametrize("depth", [1000, 200_000])
def test_deeply_nested_unknown_value_does_not_hurt(jobd, depth):
    body = ('{"nest": ' + "[" * depth + "]" * depth + ', "id": "nest", "input": "%s"}'
            % base64.b64encode(make_zip({"run.sh": "echo x\n"})).decode())
    resp = jobd.request("POST", "/api/upload", body)
    assert resp.status in (201, 400), resp
    assert_alive(jobd)


def test_unterminated_nesting_is_400(shared):
    assert_go_error(shared.request("POST", "/api/upload", '{"x": ' + "[" * 100_000), 400,
                    "bad_request")
    assert_alive(shared)


# ==================================================================================
# Malformed HTTP
# ==================================================================================

def expect_json_error(answer, status):
    code, headers, body = answer
    assert code == status, (code, body[:300])
    assert headers.get("content-type") == JSON_TYPE
    parsed = json.loads(body)
    assert list(parsed) == ["error", "message", "status"] and parsed["status"] == status
    return parsed


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),  # HTTP/0.9
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET / FTP/1.1\r\n\r\n", 400),
    (b"GET /api/get/x HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /api/get/x HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    (b"GET /api/get/x HTTP/9.9\r\nHost: x\r\n\r\n", 505),
    (b"GET /api/get/x HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /api/get/x HTTP/1.1\r\n: empty name\r\n\r\n", 400),
    (b"GET /api/get/x HTTP/1.1\r\nHost : space\r\n\r\n", 400),
    (b"GET /api/get/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
])
def test_malformed_request_lines_and_headers(shared, request_bytes, status):
    expect_json_error(raw_exchange(shared.port, request_bytes), status)
    assert_alive(shared)


def test_binary_garbage_and_tls_hello(make_jobd):
    server = make_jobd(args=["--request-timeout", "1s"])
    # a TLS hello has no line end: it is dropped when the request time-out strikes
    for data in (os.urandom(4096), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200),
                 b"\x00" * 100 + b"\r\n\r\n", b"\r\n" * 50, b"\xff" * 70000):
        code, _, _ = raw_exchange(server.port, data, timeout=5)
        assert code in (None, 400, 414), code
        assert_alive(server)


def test_request_line_too_long(shared):
    code, headers, body = raw_exchange(shared.port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
    assert code == 414, (code, body[:200])
    assert headers.get("content-type") == JSON_TYPE
    assert_alive(shared)


def test_header_line_too_long(shared):
    answer = raw_exchange(shared.port, b"GET /api/get/x HTTP/1.1\r\nX-Long: " + b"v" * 70000 +
                          b"\r\n\r\n")
    expect_json_error(answer, 431)
    assert_alive(shared)


def test_too_many_headers(shared):
    headers = b"".join(b"X-H%d: v\r\n" % n for n in range(150))
    expect_json_error(raw_exchange(shared.port, b"GET /api/get/x HTTP/1.1\r\n" + headers + b"\r\n"),
                      431)
    assert_alive(shared)


@pytest.mark.parametrize("length,status", [
    (b"abc", 400), (b"-5", 400), (b"1e3", 400), (b"0x10", 400), (b"+5", 400), (b"5, 6", 400),
    (b"\xb2", 400), (b"\xd9\xa3", 400), (b"", 400),
    (b"99999999999999999999999", 413), (b"3000000000", 413)])
def test_bad_content_length(make_jobd, length, status):
    server = make_jobd(args=["--max-upload", "1M"])
    answer = raw_exchange(server.port, b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: "
                          + length + b"\r\n\r\n{}")
    expect_json_error(answer, status)
    assert_nothing_stored(server)
    assert_alive(server)


def test_conflicting_content_lengths(shared):
    answer = raw_exchange(shared.port, b"POST /api/upload HTTP/1.1\r\nContent-Length: 2\r\n"
                          b"Content-Length: 20\r\n\r\n{}")
    expect_json_error(answer, 400)
    assert_alive(shared)


def test_body_shorter_than_content_length_times_out(make_jobd):
    server = make_jobd(args=["--request-timeout", "2s"])
    sock = raw_connect(server.port)
    started = time.monotonic()
    body = upload_body("stall", make_zip({"run.sh": "echo x\n", "pad": os.urandom(1000)}))
    sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                 % (len(body) + 500) + body.encode())
    # meanwhile, others are served
    assert_alive(server)
    assert closed_by_peer(sock, timeout=8), "jobd kept a stalled upload open"
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 6, elapsed
    sock.close()
    assert_nothing_stored(server, "stall")
    assert_alive(server)


def test_stalled_body_gets_a_408(make_jobd):
    server = make_jobd(args=["--request-timeout", "1s"])
    with raw_connect(server.port) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"id\":")
        expect_json_error(read_response(sock, timeout=6), 408)
    assert_alive(server)


def test_idle_and_half_sent_connections_are_dropped(make_jobd):
    server = make_jobd(args=["--request-timeout", "1s"])
    idle = raw_connect(server.port)
    half = raw_connect(server.port)
    half.sendall(b"GET /api/get/x HTTP/1.1\r\nHost: x\r\n")  # no blank line: headers unfinished
    started = time.monotonic()
    assert closed_by_peer(idle, 5) and closed_by_peer(half, 5)
    assert time.monotonic() - started < 5
    idle.close()
    half.close()
    assert_alive(server)


def test_slowloris_does_not_starve_other_clients(make_jobd):
    server = make_jobd(args=["--request-timeout", "2s"])
    socks = [raw_connect(server.port) for _ in range(40)]
    stop = threading.Event()

    def trickle():
        for n in range(200):
            if stop.is_set():
                return
            for sock in socks:
                try:
                    sock.send(b"GET /api/get/x HTTP/1.1\r\n" if n == 0 else b"X-%d: 1\r\n" % n)
                except OSError:
                    pass
            time.sleep(0.3)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        for _ in range(10):
            assert_alive(server)
            time.sleep(0.1)
        assert server.upload("during", {"run.sh": "echo ok\n"}).status == 201
        assert server.output("during", timeout=10)[0]["Status"] == "SUCCESS"
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            sock.close()
    assert_alive(server)


def chunked(body, size=1000):
    out = b""
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


def test_valid_chunked_upload_is_accepted(jobd):
    body = upload_body("chunky", make_zip({"run.sh": "echo chunked\n", "p": os.urandom(5000)}))
    answer = raw_exchange(jobd.port, b"POST /api/upload HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body.encode(), 777))
    assert answer[0] == 201, answer
    assert jobd.output("chunky")[1]["jobd.stdout"] == b"chunked\n"


def lenient_chunk(write_size):
    """A chunked body whose one chunk holds a valid upload, its size written by
    `write_size`: a lenient parser (int(x, 16)) would accept it."""
    body = upload_body("lenient", make_zip({"run.sh": "echo x\n"})).encode()
    return write_size(len(body)).encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize("payload", [
    b"zz\r\nabc\r\n0\r\n\r\n",             # size not hex
    b"5\r\n{}{}{}{}\r\n0\r\n\r\n",         # chunk longer than its size
    b"2\r\n{}XX0\r\n\r\n",                   # no CRLF after the chunk
    b"-2\r\n{}\r\n0\r\n\r\n",                # int(x, 16) takes the next three
    lenient_chunk(lambda n: "0x%x" % n),
    lenient_chunk(lambda n: "+%x" % n),
    lenient_chunk(lambda n: ("%x" % n)[:1] + "_" + ("%x" % n)[1:]),
    b"\r\n",                                   # no size at all
], ids=["not-hex", "too-long", "no-crlf", "negative", "0x", "plus", "underscore", "empty"])
def test_malformed_chunked_body_is_400(shared, payload):
    before = store_state(shared)
    answer = raw_exchange(shared.port, b"POST /api/upload HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + payload)
    expect_json_error(answer, 400)
    assert_nothing_stored(shared, "lenient", before=before)
    assert_alive(shared)


def test_unsupported_transfer_encoding_is_refused(shared):
    answer = raw_exchange(shared.port, b"POST /api/upload HTTP/1.1\r\nTransfer-Encoding: gzip\r\n"
                          b"Content-Length: 2\r\n\r\n{}")
    assert answer[0] in (400, 501), answer
    assert_alive(shared)


def test_truncated_chunked_body_times_out(make_jobd):
    server = make_jobd(args=["--request-timeout", "1s"])
    with raw_connect(server.port) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"100\r\n{\"id\": \"x\"")
        assert closed_by_peer(sock, 6)
    assert_nothing_stored(server)
    assert_alive(server)


def test_client_that_disconnects_mid_upload_leaves_nothing(jobd):
    body = upload_body("gone", make_zip({"run.sh": "echo x\n", "p": os.urandom(600_000)}))
    with raw_connect(jobd.port) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body[: len(body) // 2].encode())
        time.sleep(0.3)
    # jobd logs one line per request once it is done with it
    wait_until(lambda: any("/api/upload" in line for line in jobd.lines), 10,
               what="jobd to give up the half upload")
    assert_nothing_stored(jobd, "gone")
    assert_alive(jobd)


# (GET / is not here: it is job-orchestrator's ping, {"message": "pong"}; test_orchestrator.py)
@pytest.mark.parametrize("method,path", [
    ("GET", "/index.html"), ("GET", "/api"), ("GET", "/api/"), ("GET", "/api/get"),
    ("GET", "/api/get/"), ("GET", "/api/get/a/b"), ("GET", "/api/upload/"), ("POST", "/api/uploads"),
    ("POST", "/upload"), ("GET", "/favicon.ico"), ("GET", "/API/GET/x"), ("DELETE", "/nowhere"),
])
def test_unknown_paths_are_json_404(shared, method, path):
    resp = shared.request(method, path)
    assert_go_error(resp, 404, "not_found")
    assert_alive(shared)


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/api/upload", "POST"), ("PUT", "/api/upload", "POST"),
    ("DELETE", "/api/upload", "POST"), ("PATCH", "/api/upload", "POST"),
    ("POST", "/api/get/x", "GET"), ("PUT", "/api/get/x", "GET"), ("DELETE", "/api/get/x", "GET"),
])
def test_wrong_method_is_405_with_allow(shared, method, path, allow):
    resp = shared.request(method, path)
    assert_go_error(resp, 405, "method_not_allowed")
    allowed = [m.strip() for m in resp.headers.get("Allow", "").split(",")]
    assert allow in allowed, resp.headers
    assert method not in allowed
    assert_alive(shared)


def test_unknown_method_is_answered_in_json(shared):
    code, headers, body = raw_exchange(shared.port, b"BREW /api/upload HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code in (405, 501), (code, body)
    assert headers.get("content-type") == JSON_TYPE
    assert_alive(shared)


def test_expect_100_continue_too_large_is_413_without_reading(make_jobd):
    server = make_jobd(args=["--max-upload", "1M"])
    with raw_connect(server.port) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % (5 << 20))
        started = time.monotonic()
        expect_json_error(read_response(sock, 5), 413)  # the body was never sent
        assert time.monotonic() - started < 2
    assert_alive(server)


def test_expect_100_continue_within_the_cap_continues(make_jobd):
    server = make_jobd(args=["--max-upload", "1M"])
    body = upload_body("cont", make_zip({"run.sh": "echo continued\n"})).encode()
    with raw_connect(server.port) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        assert read_response(sock)[0] == 201
    assert server.output("cont")[1]["jobd.stdout"] == b"continued\n"


def test_upload_above_max_upload_is_413(make_jobd):
    server = make_jobd(args=["--max-upload", "100K"])
    body = upload_body("huge", make_zip({"run.sh": "echo x\n", "p": os.urandom(200_000)}))
    resp = server.request("POST", "/api/upload", body)
    assert_go_error(resp, 413, "payload_too_large")
    assert_nothing_stored(server, "huge")
    # exactly at the cap is fine
    small = upload_body("small", make_zip({"run.sh": "echo x\n"})).encode()
    small += b" " * (100 * 1024 - len(small))
    assert server.request("POST", "/api/upload", small).status == 201
    assert_alive(server)


@pytest.mark.parametrize("length", [b"\xb2", b"-1", b"abc"])
def test_expect_100_continue_with_a_bad_length_is_answered(shared, length):
    with raw_connect(shared.port) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nExpect: 100-continue\r\n"
                     b"Content-Length: " + length + b"\r\n\r\n")
        answer = read_response(sock, 5)  # perhaps after a 100 Continue
    expect_json_error(answer, 400)
    assert_alive(shared)


def test_client_still_sending_a_refused_body_reads_the_answer(make_jobd):
    # jobd answers as soon as it knows, before the body is in; the client, still sending,
    # must then read that answer, not a connection reset.
    server = make_jobd(args=["--max-upload", "1M"])
    for _ in range(3):
        assert_go_error(server.request("POST", "/api/upload", b"x" * (8 << 20)), 413,
                        "payload_too_large")
    bad_base64 = '{"id": "early", "input": "' + "!" * (900 << 10) + '"}'
    for _ in range(3):  # refused mid-body, at the first bad base64 character
        assert_go_error(server.request("POST", "/api/upload", bad_base64), 400, "bad_request")
    assert_nothing_stored(server, "early")
    assert_alive(server)


def test_chunked_upload_above_max_upload_is_413(make_jobd):
    server = make_jobd(args=["--max-upload", "100K"])
    body = upload_body("huge", make_zip({"run.sh": "echo x\n", "p": os.urandom(200_000)}))
    answer = raw_exchange(server.port, b"POST /api/upload HTTP/1.1\r\nTransfer-Encoding: chunked"
                          b"\r\n\r\n" + chunked(body.encode(), 8192))
    expect_json_error(answer, 413)
    assert_nothing_stored(server, "huge")
    assert_alive(server)


def test_keep_alive_and_pipelining(shared):
    with raw_connect(shared.port) as sock:
        sock.sendall(b"GET /api/get/one HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /api/get/two HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(sock)
        second = read_response(sock)
        assert first[0] == 404 and second[0] == 404


def test_a_body_is_never_read_as_the_next_request(shared):
    smuggled = b"GET /api/get/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    with raw_connect(shared.port) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(smuggled) + smuggled +
                     b"GET /api/upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = []
        for _ in range(3):
            status, _, body = read_response(sock, 5)
            if status is None:
                break
            answers.append((status, json.loads(body)["message"]))
    # jobd may keep the connection (having read the body) or close it; never more
    assert [status for status, _ in answers] in ([404], [404, 405]), answers
    assert "job not found" not in [message for _, message in answers]


def test_many_connections_opened_and_dropped(shared):
    socks = []
    for _ in range(200):
        socks.append(socket.create_connection(("127.0.0.1", shared.port), timeout=10))
    for n, sock in enumerate(socks):
        if n % 2:
            sock.sendall(b"GET /api/get/x HTTP/1.1\r\n")
        sock.close()
    assert_alive(shared)


# ==================================================================================
# Hostile (or careless) jobs
# ==================================================================================

def test_links_made_by_a_job_are_not_followed_into_the_output(jobd):
    script = ("ln -s /etc/passwd leak\nln -s / rootlink\nmkdir d\nln -s /etc d/etc\n"
              "ln -s ../.. up\necho mine > mine.txt\n")
    assert jobd.upload("links", {"run.sh": script}).status == 201
    job, files = jobd.output("links")
    assert job["Status"] == "SUCCESS"
    assert files["mine.txt"] == b"mine\n"
    assert not any(name.startswith(("leak", "rootlink", "d/etc", "up")) for name in files), files
    assert all(b"root:" not in data for data in files.values())


def test_fifo_and_socket_made_by_a_job_do_not_hang_the_result(jobd):
    script = ("mkfifo pipe\n"
              "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.bind(\"sock\")'"
              " || true\necho fine > fine.txt\n")
    assert jobd.upload("fifo", {"run.sh": script}).status == 201
    job, files = jobd.output("fifo", timeout=10)
    assert job["Status"] == "SUCCESS" and files["fine.txt"] == b"fine\n"
    assert "pipe" not in files and "sock" not in files


def test_job_that_removes_its_own_directory_still_answers_with_a_zip(jobd):
    assert jobd.upload("selfdel", {"run.sh": 'cd ..; rm -rf "$OLDPWD"\n'}).status == 201
    job, files = jobd.output("selfdel")
    assert job["ID"] == "selfdel" and job["Status"] in ("SUCCESS", "FAILED")
    assert isinstance(files, dict)


def test_background_processes_do_not_outlive_their_job(jobd, tmp_path):
    pid_file = tmp_path / "bg.pid"
    script = f'sleep 60 &\necho $! > "{pid_file}"\nsleep 60 > /dev/null 2>&1 &\necho done\n'
    started = time.monotonic()
    assert jobd.upload("bg", {"run.sh": script}).status == 201
    job, files = jobd.output("bg", timeout=20)
    assert job["Status"] == "SUCCESS" and files["jobd.stdout"] == b"done\n"
    assert time.monotonic() - started < 10  # not waiting for the helpers
    pid = int(pid_file.read_text())

    def gone():
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(gone, 5, what="the job's background process to be killed")


def test_a_job_signalling_its_process_group_hits_only_itself(jobd):
    # (A job can of course signal jobd by its pid -- it runs as the same user, as in Go.)
    assert jobd.upload("group", {"run.sh": "kill -TERM 0\necho after\n"}).status == 201
    job, files = jobd.output("group", timeout=15)
    assert job["Status"] == "FAILED" and "terminated" in job["Message"].lower(), job["Message"]
    assert jobd.proc.poll() is None
    assert_alive(jobd)


def test_file_names_that_are_not_utf8_do_not_wedge_the_job(jobd):
    # Linux names are bytes; a job may well write one that is not UTF-8.
    script = "printf x > \"$(printf 'bad\\377name')\"\nmkdir \"$(printf 'dir\\376')\"\necho ok\n"
    assert jobd.upload("bytesname", {"run.sh": script}).status == 201
    resp = jobd.wait("bytesname", timeout=15)
    assert resp.status == 200
    job = resp.json()
    files = unzip(base64.b64decode(job["Output"], validate=True))
    assert files["jobd.stdout"] == b"ok\n"
    assert job["Status"] == "SUCCESS", job["Message"]
    assert files["bad\ufffdname"] == b"x"  # kept, its name made readable


def test_repeated_input_key_last_one_wins(jobd):
    small = make_zip({"run.sh": "echo small\n"})
    large = make_zip({"run.sh": "echo large\n", "pad": os.urandom(400 * 1024)})
    for job_id, first, last, word in (("s-then-l", small, large, b"large\n"),
                                      ("l-then-s", large, small, b"small\n")):
        body = '{"id": "%s", "input": "%s", "INPUT": "%s"}' % (
            job_id, base64.b64encode(first).decode(), base64.b64encode(last).decode())
        assert jobd.request("POST", "/api/upload", body).status == 201
        assert jobd.output(job_id)[1]["jobd.stdout"] == word


# ==================================================================================
# Slow clients: a trickle must not hold a thread for ever
# ==================================================================================

def test_headers_trickled_in_are_cut_off(make_jobd):
    server = make_jobd(args=["--request-timeout", "2"])
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    started = time.monotonic()
    closed = False
    for _ in range(40):  # one header byte every 0.25 s: never silent for 2 s
        try:
            sock.sendall(b"X")
            time.sleep(0.25)
            sock.setblocking(False)
            if sock.recv(1024) == b"":
                closed = True
                break
        except BlockingIOError:
            pass
        except OSError:
            closed = True
            break
        finally:
            sock.setblocking(True)
    assert closed and time.monotonic() - started < 6
    sock.close()
    assert server.request("GET", "/healthz").status == 200


def test_a_body_trickled_in_gets_408(make_jobd):
    server = make_jobd(args=["--request-timeout", "2"])
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"PUT /api/jobs/slow HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
    started, answer = time.monotonic(), b""
    for _ in range(40):  # one byte every 0.25 s: 4 bytes/s, far below 1 KiB/s
        try:
            sock.sendall(b"P")
        except OSError:
            break
        time.sleep(0.25)
        sock.setblocking(False)
        try:
            answer += sock.recv(65536)
        except BlockingIOError:
            pass
        finally:
            sock.setblocking(True)
        if answer:
            break
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 6
    assert server.request("GET", "/api/jobs/slow").status == 404

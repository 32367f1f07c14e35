"""The front end: the one loop that holds idle connections and answers plain uploads
itself, handing every other request (with the bytes it has read) to a Handler thread.

Each test drives the boundary between the two through raw sockets: the loop's answer
must be the Handler's answer, byte for byte apart from the Date, and no request may be
lost, repeated or reordered when a connection changes hands.
"""

import argparse
import contextlib
import io
import json
import os
import re
import socket
import sys
import threading
import time

from conftest import ROOT, make_zip
from helpers import (closed_by_peer, epoch, gate_script, jobd_process, job_rows, proc_status,
                     raw_connect, read_response, upload_body, wait_status, wait_until)

sys.path.insert(0, str(ROOT))
import jobd  # noqa: E402  (the front end, run in this process for one test)

TRIVIAL = make_zip({"run.sh": "true\n"})


def upload_request(job_id, extra_headers=b"", zip_bytes=TRIVIAL):
    body = upload_body(job_id, zip_bytes).encode()
    return (b"POST /api/upload HTTP/1.1\r\nHost: t\r\n%sContent-Length: %d\r\n\r\n%s"
            % (extra_headers, len(body), body))


def chunked_upload_request(job_id):
    body = upload_body(job_id, TRIVIAL).encode()
    return (b"POST /api/upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


def threads(server):
    """How many threads jobd has: a connection a Handler serves has one."""
    return jobd_process(server)[1]


def raw_answer(sock):
    """(head bytes with the Date and Content-Length values blanked, body) of one answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return re.sub(rb"(Date|Content-Length): [^\r]*", rb"\1: -", head), body


def test_the_loops_201_is_the_handlers_201(jobd):
    """Byte for byte, apart from the date and the job itself: the loop's answer to a
    plain upload (no thread is made for it) and a Handler's to a chunked one (a thread)."""
    before = threads(jobd)
    with raw_connect(jobd.port) as sock:
        sock.sendall(upload_request("fast"))
        fast_head, fast_body = raw_answer(sock)
        assert threads(jobd) == before
    with raw_connect(jobd.port) as sock:
        sock.sendall(chunked_upload_request("slow"))
        slow_head, slow_body = raw_answer(sock)
        assert threads(jobd) == before + 1
    assert fast_head == slow_head
    assert fast_head.split(b"\r\n") == [
        b"HTTP/1.1 201 Created", fast_head.split(b"\r\n")[1], b"Date: -",
        b"Content-Type: application/json; charset=utf-8", b"Content-Length: -"]
    assert re.fullmatch(rb"Server: jobd/[0-9][^ ]*", fast_head.split(b"\r\n")[1])
    fast_job, slow_job = json.loads(fast_body), json.loads(slow_body)
    assert list(fast_job) == list(slow_job)
    assert fast_job["ID"] == "fast" and slow_job["ID"] == "slow"
    unchanging = [key for key in fast_job if key not in ("ID", "LastUpdated")]
    assert [fast_job[key] for key in unchanging] == [slow_job[key] for key in unchanging]
    for job_id in ("fast", "slow"):
        assert wait_status(jobd, job_id, "SUCCESS")["Status"] == "SUCCESS"


def test_pipelined_requests_are_answered_in_order_across_the_hand_over(jobd):
    """Two uploads and a GET in one write: the loop answers the uploads, then hands
    the connection, with the GET already read, to a Handler; then one more upload."""
    with raw_connect(jobd.port) as sock:
        sock.sendall(upload_request("p1") + upload_request("p2") +
                     b"GET /api/jobs/p1 HTTP/1.1\r\nHost: t\r\n\r\n" + upload_request("p3"))
        answers = [read_response(sock) for _ in range(4)]
    assert [a[0] for a in answers] == [201, 201, 200, 201]
    assert [json.loads(a[2])["ID"] for a in answers] == \
           ["p1", "p2", "p1", "p3"]


def test_a_refused_upload_gets_the_handlers_error_and_the_connection_goes_on(jobd):
    with raw_connect(jobd.port) as sock:
        sock.sendall(upload_request("bad", zip_bytes=b"not a zip"))
        status, _, body = read_response(sock)
        assert status == 400
        assert json.loads(body)["message"].startswith("input is not a readable zip file")
        sock.sendall(upload_request("good"))
        status, _, body = read_response(sock)
        assert status == 201 and json.loads(body)["ID"] == "good"
        sock.sendall(upload_request("good"))  # a duplicate: refused by the commit
        status, _, body = read_response(sock)
        assert status == 409 and json.loads(body)["error"] == "conflict"
    assert jobd.get("bad").status == 404


def test_duplicates_within_one_commit_give_one_201(jobd):
    """Sixteen connections send the same id in the same instant, so most of them land
    in one pass of the loop and one transaction."""
    socks = [raw_connect(jobd.port) for _ in range(16)]
    try:
        request = upload_request("twin")
        for sock in socks:
            sock.sendall(request)
        statuses = sorted(read_response(sock)[0] for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [201] + [409] * 15


def test_an_upload_arriving_in_pieces_is_answered(make_jobd):
    """Head first, the body 0.3 s later: the loop waits for it (no thread is made). A
    body that takes longer than the loop waits (1 s): a Handler takes the connection over,
    mid-request, with what has come so far."""
    server = make_jobd()
    before = threads(server)
    for job_id, pause, handed in (("pieces", 0.3, 0), ("slowly", 1.6, 1)):
        request = upload_request(job_id)
        split = request.index(b"\r\n\r\n") + 10
        with raw_connect(server.port) as sock:
            sock.sendall(request[:split])
            time.sleep(pause)
            sock.sendall(request[split:])
            status, _, body = read_response(sock)
            assert threads(server) == before + handed
        assert status == 201 and json.loads(body)["ID"] == job_id
        assert wait_status(server, job_id, "SUCCESS")["Status"] == "SUCCESS"
        wait_until(lambda: threads(server) == before, 5, what="the Handler thread to end")


def in_process_server(tmp_path):
    """jobd's server in this process (no workers), so that its listening socket can be
    given a small send buffer, which the connections it accepts inherit."""
    parser = argparse.ArgumentParser()
    jobd.server_arguments(parser)
    args = parser.parse_args(["--host", "127.0.0.1", "--port", "0", "--db", str(tmp_path / "db"),
                              "--data", str(tmp_path / "data")])
    app = jobd.Jobd(jobd.load_config(args, {}), jobd.Log("text", io.StringIO()))
    return jobd.Server(app)


def test_answers_the_socket_cannot_take_at_once_are_sent_by_a_handler(tmp_path):
    """300 pipelined uploads; the client reads nothing for a second and has a 4 KiB
    receive buffer, the server's side an 8 KiB send buffer: the 90 KB of answers cannot
    all be sent at once, so the loop hands the connection, with the unsent rest of an
    answer and the requests not yet read, to a Handler. Every answer arrives, in order."""
    with socket.create_server(("127.0.0.1", 0)) as probe:  # the kernel does pass it on
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with socket.create_connection(probe.getsockname()), probe.accept()[0] as accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 16384
    server = in_process_server(tmp_path)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    frontend = jobd.Frontend(server)
    loop = threading.Thread(target=frontend.run)
    loop.start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(server.server_address[:2])
        with sock:
            sock.sendall(b"".join(upload_request(f"q{n}") for n in range(300)))
            time.sleep(1.0)  # answers pile up while nothing is read
            answers = [read_response(sock, timeout=30) for _ in range(300)]
        assert sum(len(body) for _, _, body in answers) > 40_000  # 300 x (164 + headers)
        assert [status for status, _, _ in answers] == [201] * 300
        assert [json.loads(body)["ID"] for _, _, body in answers] == [f"q{n}" for n in range(300)]
        assert server.app.store.counts()["QUEUED"] == 300
    finally:
        frontend.stopping.set()
        loop.join()
        server.server_close()
        server.app.store.close()


def test_the_token_is_checked_on_the_loops_path_too(make_jobd):
    server = make_jobd(env={**os.environ, "JOBD_TOKEN": "s3cret"})
    for given in (b"", b"Authorization: Bearer wrong\r\n", b"Authorization: Basic czNjcmV0\r\n"):
        with raw_connect(server.port) as sock:
            sock.sendall(upload_request("nope", given))
            status, headers, body = read_response(sock)
            assert status == 401 and headers["www-authenticate"] == "Bearer", given
            assert json.loads(body)["error"] == "unauthorized"
    with raw_connect(server.port) as sock:
        sock.sendall(upload_request("yes", b"Authorization: Bearer s3cret\r\n"))
        status, _, body = read_response(sock)
        assert status == 201 and json.loads(body)["ID"] == "yes"
    headers = {"Authorization": "Bearer s3cret"}
    assert server.request("GET", "/api/jobs/nope", headers=headers).status == 404


def test_an_idle_connection_is_closed_after_the_request_timeout(make_jobd):
    server = make_jobd(args=["--request-timeout", "1s"])
    with raw_connect(server.port) as idle, raw_connect(server.port) as used:
        used.sendall(upload_request("before"))
        assert read_response(used)[0] == 201  # idle again, in the loop
        started = time.monotonic()
        assert closed_by_peer(idle, timeout=5) and closed_by_peer(used, timeout=5)
        assert 0.8 < time.monotonic() - started < 4
    wait_until(lambda: any("idle connection was closed" in line for line in server.lines), 5,
               what="the log line of the closed connection")
    assert server.upload("after", {"run.sh": "true\n"}).status == 201


def test_the_loop_survives_clients_that_vanish_mid_request(jobd):
    """Half a head, half a body, a reset: none of them stops the loop."""
    request = upload_request("whole")
    for cut in (10, request.index(b"\r\n\r\n") + 20):
        sock = raw_connect(jobd.port)
        sock.sendall(request[:cut])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # a reset
    with raw_connect(jobd.port) as sock:
        sock.sendall(request)
        assert read_response(sock)[0] == 201
    assert jobd.proc.poll() is None


def test_http_1_0_and_connection_close_uploads_are_answered_and_closed(jobd):
    for job_id, request in (("ten", upload_request("ten").replace(b"HTTP/1.1", b"HTTP/1.0")),
                            ("bye", upload_request("bye", b"Connection: close\r\n"))):
        with raw_connect(jobd.port) as sock:
            sock.sendall(request)
            status, headers, body = read_response(sock)
            assert status == 201 and json.loads(body)["ID"] == job_id
            assert headers.get("connection") == "close"
            assert closed_by_peer(sock, timeout=5)


def test_many_clients_each_upload_counted_once(jobd):
    """Forty keep-alive clients, five uploads each, all at once: 200 jobs, each 201 once."""
    socks = [raw_connect(jobd.port) for _ in range(40)]
    try:
        for round_ in range(5):
            for n, sock in enumerate(socks):
                sock.sendall(upload_request(f"m{n}-{round_}"))
            for n, sock in enumerate(socks):
                status, _, body = read_response(sock)
                assert status == 201 and json.loads(body)["ID"] == f"m{n}-{round_}"
    finally:
        for sock in socks:
            sock.close()
    listed = jobd.request("GET", "/api/jobs?limit=1000").json()["Jobs"]
    assert sorted(job["ID"] for job in listed) == sorted(
        f"m{n}-{r}" for n in range(40) for r in range(5))


def test_requests_sent_before_a_half_close_are_all_answered(jobd):
    """A client that writes its requests, then shuts its side (SHUT_WR), still reads
    every answer; that end of the stream must not drop requests read with it."""
    for job_id, second in (("hc1", b"GET /api/jobs/hc1 HTTP/1.1\r\nHost: t\r\n\r\n"),
                           ("hc2", upload_request("hc3"))):
        with raw_connect(jobd.port) as sock:
            sock.sendall(upload_request(job_id) + second)
            sock.shutdown(socket.SHUT_WR)
            first, then = read_response(sock), read_response(sock)
        assert first[0] == 201 and json.loads(first[2])["ID"] == job_id
        assert then[0] in (200, 201)
    assert jobd.request("GET", "/api/jobs/hc3").status == 200


def test_one_clients_trouble_does_not_cost_another_its_answers(jobd):
    """In one pass: A's second upload is refused (a duplicate) after A has half-closed,
    while B has two uploads pipelined. B gets both answers, every time."""
    for round_ in range(5):
        a, b = raw_connect(jobd.port), raw_connect(jobd.port)
        with a, b:
            a.sendall(upload_request(f"a{round_}") + upload_request(f"a{round_}"))
            a.shutdown(socket.SHUT_WR)
            b.sendall(upload_request(f"b{round_}-1") + upload_request(f"b{round_}-2"))
            answers = [read_response(b) for _ in range(2)]
            assert [(status, json.loads(body)["ID"]) for status, _, body in answers] == \
                   [(201, f"b{round_}-1"), (201, f"b{round_}-2")]
            assert [read_response(a)[0] for _ in range(2)] == [201, 409]


def test_a_client_pipelining_without_end_meets_backpressure(jobd):
    """40 MB of pipelined uploads, sent as fast as the socket takes them for 1.5 s: the
    server reads ahead of what it has answered by a bounded amount (the rest waits in
    the kernel, and the client is held back), so its memory does not follow the stream."""
    stream = memoryview(b"".join(upload_request(f"p{n}") for n in range(100_000)))
    pid = jobd_process(jobd)[0]
    before = proc_status(pid, "VmRSS")
    with raw_connect(jobd.port) as sock:
        sock.setblocking(False)
        sent, deadline = 0, time.monotonic() + 1.5
        while sent < len(stream) and time.monotonic() < deadline:
            try:
                sent += sock.send(stream[sent:sent + 1 << 20])
            except BlockingIOError:
                time.sleep(0.01)
        grown = proc_status(pid, "VmRSS") - before
    assert sent < len(stream) // 2, f"the server took {sent} bytes without answering them"
    assert grown < 30_000_000, grown
    assert jobd.request("GET", "/api/jobs/p0").status == 200


def test_an_input_too_big_for_the_loop_to_check_is_checked_by_a_handler(make_jobd):
    """The loop checks small zips only (it must not stall on one); a zip that unpacks
    to 5 MiB (of zeros, 5 KB packed) is checked by a Handler thread, with the limit set."""
    server = make_jobd(args=["--max-unpacked", "6MiB"])
    zeros = make_zip({"run.sh": "true\n", "zeros": bytes(5 << 20)})
    assert len(zeros) < 16_000
    before = threads(server)
    with raw_connect(server.port) as sock:
        sock.sendall(upload_request("small"))
        assert read_response(sock)[0] == 201
        assert threads(server) == before
        sock.sendall(upload_request("big", zip_bytes=zeros))
        status, _, body = read_response(sock)
        assert status == 201 and json.loads(body)["ID"] == "big"
        assert threads(server) == before + 1
        sock.sendall(upload_request("bigger", zip_bytes=make_zip(
            {"run.sh": "true\n", "zeros": bytes(7 << 20)})))
        status, _, body = read_response(sock)
        assert status == 400 and "JOBD_MAX_UNPACKED" in json.loads(body)["message"]


def test_jobs_still_start_during_a_flood_of_uploads(make_jobd):
    """Workers give way to a flood of uploads, but only for a while (GIVE_WAY a job):
    with 2,400 uploads pouring in from 8 clients, each worker keeps starting jobs until
    the flood ends, about one every GIVE_WAY (plus the time a job takes), and every job
    runs. (Workers that waited for the whole flood would start jobs only in its first
    tens of milliseconds, before the loop had counted enough uploads to call it a flood.)"""
    workers = 2
    server = make_jobd(["--workers", str(workers)])
    socks = [raw_connect(server.port) for _ in range(8)]
    try:
        for round_ in range(300):
            for n, sock in enumerate(socks):
                sock.sendall(upload_request(f"f{round_}-{n}"))
            for sock in socks:
                assert read_response(sock)[0] == 201
    finally:
        for sock in socks:
            sock.close()
    first = server.request("GET", "/api/jobs/f0-0").json()["CreatedAt"]
    last = server.request("GET", "/api/jobs/f299-7").json()["CreatedAt"]
    wait_until(lambda: not server.request(
        "GET", "/api/jobs?status=QUEUED,RUNNING&limit=1").json()["Jobs"], timeout=60,
        interval=0.2, what="every job to end")
    done, cursor = [], ""
    while cursor is not None:  # pages of 1,000 at most
        page = server.request("GET", f"/api/jobs?status=SUCCESS&limit=1000&cursor={cursor}").json()
        done, cursor = done + page["Jobs"], page["Next"]
    assert len(done) == 2400
    start, end = epoch(first), epoch(last)
    assert 2400 / (end - start) >= jobd.Runner.FLOOD_RATE, "too slow to make a flood"
    late = [job for job in done if (start + end) / 2 <= epoch(job["StartedAt"]) < end]
    # a worker starts one job every GIVE_WAY and that job's own time (0.2 s here at most)
    least = workers * int((end - start) / 2 / (jobd.Runner.GIVE_WAY + 0.2))
    assert len(late) >= max(least, 1), \
        f"{len(late)} jobs started in the second half of a {end - start:.2f} s flood"


def test_a_stop_during_a_flood_starts_no_job_it_cannot_stop(make_jobd, tmp_path):
    """SIGTERM while uploads pour in: the workers are waiting for the flood to pass.
    Woken by the stop, they must not claim a job after the stop has listed the running
    ones (such a job gets no TERM: jobd then waits for it past the grace period and
    exits with it RUNNING). Jobs started once `marker` exists run until stopped."""
    marker = tmp_path / "marker"
    server = make_jobd(["--workers", "2", "--grace", "1"])
    script = make_zip({"run.sh": f'if [ -e "{marker}" ]; then sleep 30; fi\n'})
    sent = threading.Event()

    def flood(n):
        with raw_connect(server.port, timeout=3) as sock, contextlib.suppress(OSError):
            for i in range(10000):  # until jobd stops answering
                sock.sendall(upload_request(f"s{n}-{i}", zip_bytes=script))
                if read_response(sock, timeout=3)[0] != 201:
                    return
                sent.set()

    clients = [threading.Thread(target=flood, args=(n,), daemon=True) for n in range(8)]
    for client in clients:
        client.start()
    assert sent.wait(10)
    time.sleep(0.5)  # the flood is on
    marker.touch()
    started = time.monotonic()
    assert server.stop(timeout=30) == 0
    assert time.monotonic() - started < 1 + 3, "jobd waited for a job it did not stop"
    rows = job_rows(server.db)
    assert "RUNNING" not in rows.values(), [job for job, status in rows.items()
                                            if status == "RUNNING"]
    for client in clients:
        client.join(10)


def test_jobs_accepted_in_one_pass_each_wake_an_idle_worker(make_jobd, tmp_path):
    """Three uploads arriving together are committed in one pass; each of the three idle
    workers must start one at once. (One wake-up for the pass left the other two jobs
    waiting for a worker's 5 s look-around.)"""
    server = make_jobd(["--workers", "3"])
    gate = tmp_path / "gate"
    requests = [upload_request(f"w{n}", zip_bytes=make_zip({"run.sh": gate_script(gate)}))
                for n in range(3)]
    socks = [raw_connect(server.port) for _ in requests]
    try:
        for sock, request in zip(socks, requests):
            sock.sendall(request)
        assert [read_response(sock)[0] for sock in socks] == [201] * 3
        started = time.monotonic()
        wait_until(lambda: all(server.request("GET", f"/api/jobs/w{n}").json()["Status"]
                               == "RUNNING" for n in range(3)), timeout=10, what="3 jobs running")
        assert time.monotonic() - started < 2
    finally:
        for sock in socks:
            sock.close()
        gate.touch()
    for n in range(3):
        wait_status(server, f"w{n}", "SUCCESS")


def test_many_connections_uploading_cost_no_threads(jobd):
    """Twenty keep-alive clients upload: the loop answers them all, no thread is made.
    Then each asks something else: each connection gets a Handler thread of its own."""
    before = threads(jobd)
    socks = [raw_connect(jobd.port) for _ in range(20)]
    try:
        for n, sock in enumerate(socks):
            sock.sendall(upload_request(f"c{n}"))
        assert all(read_response(sock)[0] == 201 for sock in socks)
        assert threads(jobd) == before
        for n, sock in enumerate(socks):
            sock.sendall(b"GET /api/jobs/c%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
        assert all(read_response(sock)[0] == 200 for sock in socks)
        assert threads(jobd) == before + 20
    finally:
        for sock in socks:
            sock.close()


def test_a_header_with_a_bare_line_feed_is_read_as_the_handler_reads_it(jobd):
    """A long head whose line feeds are not all CRLF: the Handler splits such lines at
    LF too, so the loop must not read the head its own way (here it would hide a
    malformed line, and could hide a Transfer-Encoding)."""
    pad = b"X-Pad: " + b"a" * 9000 + b"\nbogus line without colon"
    with raw_connect(jobd.port) as sock:
        sock.sendall(upload_request("lf", pad + b"\r\n"))
        status, _, body = read_response(sock)
    assert status == 400 and "malformed request header" in json.loads(body)["message"]
    assert jobd.get("lf").status == 404
    with raw_connect(jobd.port) as sock:  # a short one in bare LF is answered at once
        started = time.monotonic()
        sock.sendall(b"GET /api/jobs/lf HTTP/1.0\n\n")
        assert read_response(sock)[0] == 404
        assert time.monotonic() - started < 0.5


def test_a_content_length_of_thousands_of_digits_is_too_large_not_an_error(jobd):
    for extra in (b"", b"Expect: 100-continue\r\n"):
        with raw_connect(jobd.port) as sock:
            sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: t\r\n%sContent-Length: %s\r\n\r\n"
                         % (extra, b"9" * 5000))
            status, _, body = read_response(sock)
        assert status == 413, body
        assert json.loads(body)["error"] == "payload_too_large"
    assert not any("Traceback" in line for line in jobd.lines)

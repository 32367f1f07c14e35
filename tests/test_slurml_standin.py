"""Tests of the slurml stand-in, driven the way the Go jobd's client drives the real service."""

import base64
import http.client
import json
import threading
import urllib.parse

from slurm_fixtures import slurml  # noqa: F401
from slurml_standin import SlurmlStandin, Step

ZIP_B64 = base64.b64encode(b"PK\x05\x06" + b"\0" * 18).decode()  # an empty zip


def go_request(url, method, path, token, body=None):
    """One request as Go's net/http client sends it: no Content-Type, new connection."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
    try:
        headers = {"Authorization": token, "User-Agent": "Go-http-client/1.1"}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def go_submit(url, token, payload):
    # PostToSlurml builds the body by string concatenation, with this exact layout.
    body = ('{\n\t\t\t"payload": "' + payload + '"\n\t\t}').encode()
    return go_request(url, "POST", "/api/submit", token, body)


def test_submit_then_download_default(slurml):
    status, body = go_submit(slurml.url, "test-token", ZIP_B64)
    assert status == 201
    jobid = json.loads(body)["jobid"]
    assert isinstance(jobid, int)
    status, body = go_request(slurml.url, "GET", "/api/download/%d" % jobid, "test-token")
    # Unplanned jobs answer 200 with their own payload as output.
    assert (status, json.loads(body)) == (200, {"output": ZIP_B64})
    submit = slurml.submits()[0]
    assert submit.authorization == "test-token"
    assert submit.json == {"payload": ZIP_B64}
    assert slurml.payloads[jobid] == ZIP_B64


def test_scripted_plan_not_ready_partial_done(slurml):
    slurml.plan(204, 204, (206, b"part"), (200, b"all"))
    _, body = go_submit(slurml.url, "test-token", ZIP_B64)
    jobid = json.loads(body)["jobid"]
    answers = [go_request(slurml.url, "GET", "/api/download/%d" % jobid, "test-token")
               for _ in range(5)]
    assert answers[0] == (204, b"") and answers[1] == (204, b"")
    assert answers[2][0] == 206 and json.loads(answers[2][1]) == {"output": "cGFydA=="}
    for status, body in answers[3:]:  # the last step repeats
        assert status == 200 and json.loads(body) == {"output": "YWxs"}
    assert len(slurml.downloads(jobid)) == 5


def test_plans_apply_to_jobs_in_submit_order_and_failures(slurml):
    slurml.plan(500)
    slurml.plan(Step(200, body=b"not json"))
    first = json.loads(go_submit(slurml.url, "test-token", ZIP_B64)[1])["jobid"]
    second = json.loads(go_submit(slurml.url, "test-token", ZIP_B64)[1])["jobid"]
    assert second == first + 1
    assert go_request(slurml.url, "GET", "/api/download/%d" % first, "test-token")[0] == 500
    assert go_request(slurml.url, "GET", "/api/download/%d" % second, "test-token") == \
        (200, b"not json")
    slurml.plan(204, jobid=first)  # re-script a known job
    assert go_request(slurml.url, "GET", "/api/download/%d" % first, "test-token")[0] == 204


def test_bad_token_unknown_job_and_scripted_submit_failure(slurml):
    assert go_submit(slurml.url, "wrong", ZIP_B64)[0] == 401
    assert go_request(slurml.url, "GET", "/api/download/1000", "")[0] == 401
    assert go_request(slurml.url, "GET", "/api/download/999999", "test-token")[0] == 404
    slurml.script_submit(500, Step(201, body=b'{"jobid": "x"}'))
    assert go_submit(slurml.url, "test-token", ZIP_B64)[0] == 500
    assert go_submit(slurml.url, "test-token", ZIP_B64) == (201, b'{"jobid": "x"}')
    assert go_submit(slurml.url, "test-token", ZIP_B64)[0] == 201
    assert [r.authorization for r in slurml.requests][:2] == ["wrong", ""]


def test_wait_for_requests_from_another_thread(slurml):
    def client():
        go_submit(slurml.url, "test-token", ZIP_B64)
    t = threading.Thread(target=client)
    t.start()
    hits = slurml.wait_for(lambda r: r.path == "/api/submit", count=1, timeout=5)
    t.join(5)
    assert hits[0].method == "POST"


def test_standalone_start_stop_on_loopback():
    server = SlurmlStandin(token=None).start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert go_submit(server.url, "anything", ZIP_B64)[0] == 201
    finally:
        server.stop()

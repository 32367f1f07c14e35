"""Go compatibility: "slurml": true uploads are forwarded to the slurml service, as the Go
jobd does, here to a stand-in of it (slurml_standin.py) on loopback."""

import base64
import os
import time

from conftest import make_zip, unzip
from slurm_fixtures import slurml  # noqa: F401 (a fixture)

ZIP = make_zip({"run.sh": "echo never runs here\n"})
B64 = base64.b64encode(ZIP).decode()
RESULT = make_zip({"out.txt": "from slurml\n"})


def forwarding_jobd(make_jobd, standin, token="test-token"):
    env = {**os.environ, "SLURML_API_URL": standin.url, "SLURML_API_TOKEN": token}
    return make_jobd(args=["--slurml-poll", "0.1"], env=env)


def upload(jobd, job_id, **extra):
    resp = jobd.upload(job_id, zip_bytes=ZIP, slurml=True, **extra)
    assert resp.status == 201, resp
    return resp.json()


def wait_get(jobd, job_id, ready=(200, 206), timeout=15):
    """GET /api/get until it answers one of `ready`; every answer before must be 202."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = jobd.get(job_id)
        if resp.status in ready:
            return resp
        assert resp.status == 202, resp
        time.sleep(0.05)
    raise AssertionError(f"{job_id}: still not ready\n{jobd.log_text()}")


def test_upload_is_forwarded_with_the_raw_token_and_the_input(make_jobd, slurml):
    slurml.plan(204, 204, (200, RESULT))
    jobd = forwarding_jobd(make_jobd, slurml)
    job = upload(jobd, "fwd")
    assert (job["Status"], job["Slurml"]) == ("QUEUED", True)
    submit = slurml.wait_for(lambda r: r.path == "/api/submit")[0]
    assert submit.method == "POST" and submit.authorization == "test-token"  # no "Bearer"
    assert submit.json == {"payload": B64}
    assert submit.body.startswith(b'{\n\t\t\t"payload": "')  # Go's body, byte for byte
    jobid = min(slurml.payloads)  # the stand-in's job id
    # 204 (not ready) twice: jobd answers 202 meanwhile, as Go does
    slurml.wait_for(lambda r: r.path == f"/api/download/{jobid}", count=2)
    assert jobd.get("fwd").status == 202
    resp = wait_get(jobd, "fwd")
    assert resp.status == 200
    done = resp.json()
    assert (done["Status"], done["SlurmID"], done["Slurml"]) == ("SUCCESS", jobid, True)
    assert base64.b64decode(done["Output"]) == RESULT
    assert all(r.authorization == "test-token" for r in slurml.downloads(jobid))
    # the resource API sees the same job and the same result zip
    assert unzip(jobd.request("GET", "/api/jobs/fwd/output").body) == {"out.txt": b"from slurml\n"}
    time.sleep(0.3)  # a finished job is not asked about again
    asked = len(slurml.downloads(jobid))
    time.sleep(0.3)
    assert len(slurml.downloads(jobid)) == asked


def test_partial_output_is_206_and_partial(make_jobd, slurml):
    slurml.plan(204, (206, b"part of it"))
    jobd = forwarding_jobd(make_jobd, slurml)
    upload(jobd, "half")
    resp = wait_get(jobd, "half")
    assert resp.status == 206
    assert resp.json()["Status"] == "PARTIAL"
    assert base64.b64decode(resp.json()["Output"]) == b"part of it"
    assert jobd.request("GET", "/api/jobs/half").json()["Status"] == "PARTIAL"


def test_unplanned_job_comes_back_with_the_services_output(make_jobd, slurml):
    jobd = forwarding_jobd(make_jobd, slurml)  # the stand-in answers 200 with the payload
    upload(jobd, "echo")
    resp = wait_get(jobd, "echo")
    assert (resp.status, resp.json()["Output"]) == (200, B64)


def test_failures_at_the_service_are_failed_jobs(make_jobd, slurml):
    slurml.plan(500)
    jobd = forwarding_jobd(make_jobd, slurml)
    upload(jobd, "boom")
    resp = wait_get(jobd, "boom")
    assert resp.status == 200 and resp.json()["Status"] == "FAILED"
    assert "HTTP 500" in resp.json()["Message"]
    slurml.script_submit(503)  # refused at submission
    upload(jobd, "refused")
    resp = wait_get(jobd, "refused")
    assert resp.json()["Status"] == "FAILED" and resp.json()["SlurmID"] == 0
    assert "refused the job: HTTP 503" in resp.json()["Message"]


def test_wrong_token_is_a_failed_job(make_jobd, slurml):
    jobd = forwarding_jobd(make_jobd, slurml, token="wrong")
    upload(jobd, "denied")
    resp = wait_get(jobd, "denied")
    assert resp.json()["Status"] == "FAILED" and "HTTP 401" in resp.json()["Message"]


def test_cancel_ends_a_forwarded_job_here(make_jobd, slurml):
    slurml.plan(204)
    jobd = forwarding_jobd(make_jobd, slurml)
    upload(jobd, "stop-me")
    slurml.wait_for(lambda r: r.path.startswith("/api/download/"))
    resp = jobd.request("POST", "/api/jobs/stop-me/cancel")
    assert resp.status == 200 and resp.json()["Status"] == "CANCELLED", resp
    assert wait_get(jobd, "stop-me").json()["Status"] == "CANCELLED"


def test_restart_goes_on_asking_about_forwarded_jobs(make_jobd, slurml):
    slurml.plan(204)
    jobd = forwarding_jobd(make_jobd, slurml)
    upload(jobd, "later")
    slurml.wait_for(lambda r: r.path.startswith("/api/download/"))
    jobd.kill()
    jobid = min(slurml.payloads)
    slurml.plan((200, RESULT), jobid=jobid)
    jobd.start()
    assert base64.b64decode(wait_get(jobd, "later").json()["Output"]) == RESULT
    assert len(slurml.submits()) == 1  # asked about again, never forwarded again


def test_slurml_upload_without_the_service_is_a_clear_400(make_jobd):
    env = {k: v for k, v in os.environ.items() if k not in ("SLURML_API_URL", "SLURML_API_TOKEN")}
    jobd = make_jobd(env=env)
    resp = jobd.upload("nope", zip_bytes=ZIP, slurml=True)
    assert resp.status == 400
    assert "SLURML_API_URL and SLURML_API_TOKEN" in resp.json()["message"]
    assert jobd.get("nope").status == 404
    jobd.stop()
    jobd.env["SLURML_API_URL"] = "http://127.0.0.1:9"  # the token is missing still
    jobd.start()
    assert jobd.upload("nope", zip_bytes=ZIP, slurml=True).status == 400
    assert jobd.upload("plain", zip_bytes=ZIP, slurml=False).status == 201

"""The shortest path through jobd: upload a job, get its result."""


def test_upload_then_get(jobd):
    resp = jobd.upload("hello", {"run.sh": "echo hello\n"})
    assert resp.status == 201, resp
    job, files = jobd.output("hello")
    assert job["Status"] == "SUCCESS"
    assert files["jobd.stdout"] == b"hello\n"

"""GET /api/openapi.json describes every endpoint; real answers match it; and schemathesis,
run against the live server from that document, finds no 500, no answer outside the
schema, no crash and no hang."""

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from conftest import ROOT, make_zip

TOKEN = "openapi-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def to_json_schema(schema):
    """OpenAPI 3.0 schema -> JSON Schema (nullable becomes a null type)."""
    if isinstance(schema, list):
        return [to_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: to_json_schema(value) for key, value in schema.items()
                 if key not in ("nullable", "example", "format")}
    if schema.get("nullable"):
        converted["type"] = [schema["type"], "null"]
        if "enum" in converted:
            converted["enum"] = converted["enum"] + [None]
    if schema.get("format") == "date-time":
        converted["pattern"] = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"
    return converted


class Document:
    def __init__(self, doc):
        self.doc = doc
        self.templates = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), path)
                          for path in doc["paths"]]

    def operation(self, method, path):
        for pattern, template in self.templates:
            if pattern.match(path):
                return template, self.doc["paths"][template][method.lower()]
        raise AssertionError(f"{method} {path} is not documented")

    def check(self, method, path, resp):
        """Assert that a real answer is documented: its code, content type and body."""
        template, operation = self.operation(method, path.split("?")[0])
        documented = operation["responses"].get(str(resp.status))
        assert documented, f"{method} {template} answered {resp.status}, undocumented"
        content = documented.get("content")
        if not content or not resp.body:
            return
        kind = resp.headers["Content-Type"].split(";")[0]
        assert kind in content, f"{method} {template} {resp.status}: {kind} not in {list(content)}"
        if kind == "application/json":
            schema = to_json_schema({**content[kind]["schema"],
                                     "components": self.doc["components"]})
            jsonschema.validate(resp.json(), schema)


@pytest.fixture
def secured(make_jobd):
    return make_jobd(args=["--callback-allow", "http://127.0.0.1:9/"],
                     env={**os.environ, "JOBD_TOKEN": TOKEN})


def test_every_route_is_documented(secured):
    doc = secured.request("GET", "/api/openapi.json", headers=AUTH).json()
    assert doc["openapi"].startswith("3.")
    sys.path.insert(0, str(ROOT))
    import jobd as source
    for pattern, methods in source.ROUTES:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: "{" + ("id" if m.group(1) == "job_id"
                                                                else m.group(1)) + "}", pattern)
        path = path.replace("\\", "").replace("stdout|stderr", "")
        path = re.sub(r"\{stream\}\)?", "{stream}", path)
        assert path in doc["paths"], f"{path} is not in the OpenAPI document"
        for method in methods:
            assert method.lower() in doc["paths"][path], f"{method} {path} is not documented"


def test_real_answers_match_the_document(secured):
    doc = Document(secured.request("GET", "/api/openapi.json", headers=AUTH).json())
    payload = base64.b64encode(make_zip({"run.sh": "echo hi; sleep 0.5\n"})).decode()

    def call(method, path, body=None, headers=None):
        resp = secured.request(method, path, body, {**AUTH, **(headers or {})})
        doc.check(method, path, resp)
        return resp

    assert call("POST", "/api/upload", json.dumps({"id": "a", "input": payload})).status == 201
    assert call("GET", "/api/get/a").status == 202
    assert call("POST", "/api/upload", json.dumps({"id": "a", "input": payload})).status == 409
    assert call("POST", "/api/upload", "{").status == 400
    assert call("GET", "/api/jobs/a").status == 200
    assert call("GET", "/api/jobs/a/output").status == 202
    assert call("GET", "/api/jobs/a/logs/stdout").status == 200
    deadline = time.monotonic() + 20
    while call("GET", "/api/get/a").status != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert call("GET", "/api/jobs/a/output").status == 200
    assert call("GET", "/api/jobs/a/output", headers={"Range": "bytes=0-3"}).status == 206
    assert call("GET", "/api/jobs/a/output", headers={"Range": "bytes=99999-"}).status == 416
    assert call("POST", "/api/jobs/a/cancel").status == 409
    zip_body = make_zip({"run.sh": "sleep 5\n"})
    assert call("PUT", "/api/jobs/b", zip_body, {"Content-Type": "application/zip"}).status == 201
    assert call("PUT", "/api/jobs/b", zip_body).status == 409
    assert call("POST", "/api/jobs", b"junk").status == 400
    assert call("POST", "/api/jobs/b/cancel").status == 200
    assert call("GET", "/api/jobs?limit=2").status == 200
    assert call("GET", "/api/jobs?limit=0").status == 400
    assert call("DELETE", "/api/jobs/b").status == 204
    assert call("GET", "/api/jobs/b").status == 404
    assert call("GET", "/api/get/b").status == 404
    resp = secured.request("GET", "/api/jobs/a")  # no token
    doc.check("GET", "/api/jobs/a", resp)
    assert resp.status == 401
    assert call("GET", "/healthz").status == 200
    assert call("GET", "/metrics").status == 200


def test_schemathesis_finds_nothing(secured):
    """The issue's bar: no 500s, no response outside the schema, no crash, no hang."""
    st = Path(sys.executable).with_name("st")
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,"
              "response_schema_conformance,response_headers_conformance")
    proc = subprocess.run(
        [str(st), "run", f"http://127.0.0.1:{secured.port}/api/openapi.json",
         "-H", f"Authorization: Bearer {TOKEN}", "--checks", checks,
         "--max-examples", "40", "--request-timeout", "20", "--max-response-time", "10",
         "--workers", "2", "--seed", "1", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=secured.workdir)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert secured.proc.poll() is None, "jobd died under schemathesis"
    assert secured.request("GET", "/healthz").status == 200

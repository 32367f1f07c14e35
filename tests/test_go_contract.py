"""Every row of shared/spec/go-contract.md: what Go clients rely on (keep) and the Go
daemon's failures we answer differently (improve).

Each test talks to a real jobd on 127.0.0.1 and runs real run.sh scripts.
"""

import base64
import hashlib
import http.client
import io
import json
import os
import pathlib
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile

import pytest

from conftest import IMPLEMENTATIONS, jobd_command, make_zip, unzip
from helpers import (JOB_KEYS, JSON_TYPE, RFC3339_UTC, assert_go_error, assert_nothing_stored,
                     gate_script, jobd_process, proc_status, raw_connect, raw_zip, shared_server,
                     store_state, upload_body, zip_entry)


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def shared(request, tmp_path_factory):
    """One jobd for this module's tests that leave nothing behind."""
    yield from shared_server(jobd_command(request.param), tmp_path_factory.mktemp("shared"))


TRIVIAL = make_zip({"run.sh": "echo ok\n"})


def post(server, body, headers=None):
    return server.request("POST", "/api/upload", body, headers)


def check_job_object(resp, job_id, status):
    """A Go job object: exact keys in Go's order, Input/Path empty, Output a string."""
    assert resp.headers.get("Content-Type") == JSON_TYPE, resp.headers
    # the key order is part of the wire format, so look at the text, not only the dict
    text = resp.body.decode()
    positions = [text.find(f'"{key}":') for key in JOB_KEYS]
    assert -1 not in positions and positions == sorted(positions), text[:300]
    job = resp.json()
    assert list(job) == JOB_KEYS, list(job)
    assert job["ID"] == job_id
    assert job["Status"] == status
    assert job["Input"] == "" and job["Path"] == ""
    assert isinstance(job["Output"], str)
    assert re.fullmatch(RFC3339_UTC, job["LastUpdated"]), job["LastUpdated"]
    assert job["SlurmID"] == 0 and job["Slurml"] is False
    assert isinstance(job["Message"], str)
    return job


# ==================================================================================
# POST /api/upload: the request
# ==================================================================================

@pytest.mark.parametrize("keys", [("ID", "Input", "SLURML"), ("Id", "INPUT", "Slurml"),
                                  ("iD", "inPut", "sLuRmL")])
def test_keys_match_case_insensitively(jobd, keys):
    id_key, input_key, slurml_key = keys
    body = json.dumps({id_key: "ci", input_key: base64.b64encode(
        make_zip({"run.sh": "echo from-case\n"})).decode(), slurml_key: False})
    resp = post(jobd, body)
    assert resp.status == 201, resp
    job, files = jobd.output("ci")
    assert job["ID"] == "ci" and files["jobd.stdout"] == b"from-case\n"


def test_unknown_keys_are_ignored(jobd):
    body = json.dumps({"id": "unk", "input": base64.b64encode(TRIVIAL).decode(),
                       "priority": 9, "nested": {"a": [1, {"b": None}], "s": "}\"{"},
                       "list": [[], {}], "flag": True, "nothing": None, "callbackx": "y"})
    assert post(jobd, body).status == 201
    assert jobd.output("unk")[0]["Status"] == "SUCCESS"


def test_duplicate_keys_last_one_wins_as_in_go(jobd):
    # Go's encoding/json takes the last of repeated (case-insensitively equal) keys.
    body = ('{"id": "first", "ID": "second", "input": "%s"}'
            % base64.b64encode(TRIVIAL).decode())
    assert post(jobd, body).status == 201
    assert jobd.get("first").status == 404
    assert jobd.output("second")[0]["ID"] == "second"


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/octet-stream", "nonsense"])
def test_content_type_is_not_checked(jobd, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    assert post(jobd, upload_body("ct", TRIVIAL), headers).status == 201
    assert jobd.output("ct")[0]["Status"] == "SUCCESS"


def test_slurml_false_and_null_are_accepted(jobd):
    assert post(jobd, upload_body("sf", TRIVIAL, slurml=False)).status == 201
    assert post(jobd, upload_body("sn", TRIVIAL, slurml=None)).status == 201
    for job_id in ("sf", "sn"):
        job = jobd.output(job_id)[0]
        assert job["Slurml"] is False and job["SlurmID"] == 0


def test_whitespace_around_the_object_and_escaped_slashes_are_accepted(jobd):
    # curl -d @file.json sends the file's final newline; PHP and others write "\/".
    data = make_zip({"run.sh": "echo esc\n", "blob": os.urandom(3000)})
    encoded = base64.b64encode(data).decode()
    assert "/" in encoded
    body = '\n {"id":"esc",\t"input":"%s"}\r\n\n' % encoded.replace("/", "\\/")
    assert post(jobd, body).status == 201
    job, files = jobd.output("esc")
    assert files["blob"] == unzip(data)["blob"]


def test_base64_wrapped_in_lines_is_accepted_as_go_does(jobd):
    # Go's base64 decoder skips CR and LF, so MIME-style 76-column base64 works there.
    data = make_zip({"run.sh": "echo wrapped\n", "blob": os.urandom(2000)})
    encoded = base64.encodebytes(data).decode()  # lines of 76 characters
    assert "\n" in encoded.strip()
    assert post(jobd, json.dumps({"id": "wrap", "input": encoded})).status == 201
    assert jobd.output("wrap")[1]["jobd.stdout"] == b"wrapped\n"


WRONG_BODIES = {
    "id-number": '{"id": 123, "input": "%s"}',
    "id-true": '{"id": true, "input": "%s"}',
    "id-array": '{"id": ["x"], "input": "%s"}',
    "id-object": '{"id": {"a": 1}, "input": "%s"}',
    "slurml-string": '{"id": "x1", "input": "%s", "slurml": "yes"}',
    "slurml-number": '{"id": "x1", "input": "%s", "slurml": 1}',
    "input-number": '{"id": "x1", "input": 5, "pad": "%s"}',
    "input-array": '{"id": "x1", "input": ["%s"]}',
    "input-object": '{"id": "x1", "input": {"a": "%s"}}',
    "array-body": '[{"id": "x1", "input": "%s"}]',
    "string-body": '"%s"',
    "number-body": "42 %.0s",
    "null-body": "null %.0s",
    "truncated": '{"id": "x1", "input": "%s',
    "truncated-after-comma": '{"id": "x1", "input": "%s",',
    "no-closing-brace": '{"id": "x1", "input": "%s"',
    "missing-colon": '{"id" "x1", "input": "%s"}',
    "single-quotes": "{'id': 'x1', 'input': '%s'}",
    "bare-word": "{id: x1, input: %s}",
    "empty": "%.0s",
    "whitespace-only": "  \n %.0s",
}


@pytest.mark.parametrize("name", sorted(WRONG_BODIES))
def test_wrong_json_is_a_go_400(shared, name):
    before = store_state(shared)
    body = WRONG_BODIES[name] % base64.b64encode(TRIVIAL).decode()
    assert_go_error(post(shared, body), 400, "bad_request")
    assert_nothing_stored(shared, "x1", before=before)
    assert shared.get("x1").status == 404


@pytest.mark.parametrize("body", [
    '{"input": "%s"}', '{"id": "", "input": "%s"}', '{"id": null, "input": "%s"}',
    '{"ID": "", "input": "%s"}', '{}%.0s'])
def test_missing_or_empty_id_has_the_go_message(shared, body):
    before = store_state(shared)
    resp = post(shared, body % base64.b64encode(TRIVIAL).decode())
    assert_go_error(resp, 400, "bad_request", "error validating job job id is required")
    assert_nothing_stored(shared, before=before)


# ==================================================================================
# POST /api/upload: the 201
# ==================================================================================

def test_201_is_the_queued_job_object(jobd):
    job_id = "created-" + uuid.uuid4().hex
    resp = jobd.upload(job_id, {"run.sh": "echo x\n"})
    assert resp.status == 201, resp
    job = check_job_object(resp, job_id, "QUEUED")
    assert job["Output"] == ""  # a string, never null: the orchestrator requires it
    stamp = time.strftime("%Y-%m-%dT%H", time.gmtime())
    assert job["LastUpdated"][:13] in (stamp, time.strftime("%Y-%m-%dT%H",
                                                           time.gmtime(time.time() - 60)))
    assert json.loads(resp.body)["ID"] == job_id


def test_the_201_arrives_after_a_large_input_is_stored(jobd):
    # Inputs above the inline limit take the file path through the store.
    payload = os.urandom(600 * 1024)
    resp = jobd.upload("big-in", {"run.sh": "sha256sum payload > sum\n", "payload": payload})
    assert resp.status == 201, resp
    check_job_object(resp, "big-in", "QUEUED")
    job, files = jobd.output("big-in")
    assert files["payload"] == payload
    assert files["sum"].split()[0].decode() == hashlib.sha256(payload).hexdigest()


# ==================================================================================
# POST /api/upload: what Go accepted and then failed on (improve: 400, nothing stored)
# ==================================================================================

def b64(data):
    return base64.b64encode(data).decode()


def zip_with_method(method):
    return make_zip({"run.sh": "echo x\n", "data.txt": "hello " * 100}, compression=method)


SLIP_OUTSIDE = f"/tmp/jobd-zipslip-{uuid.uuid4().hex}"
REFUSED_INPUTS = {
    "no-input": lambda: {"id": "bad"},
    "input-null": lambda: {"id": "bad", "input": None},
    "input-empty": lambda: {"id": "bad", "input": ""},
    "not-base64": lambda: {"id": "bad", "input": "this is *not* base64!"},
    "base64-bad-padding": lambda: {"id": "bad", "input": b64(TRIVIAL)[:-2] + "=A"},
    "base64-data-after-padding": lambda: {"id": "bad", "input": "QQ==" + b64(TRIVIAL)},
    "base64-not-a-zip": lambda: {"id": "bad", "input": b64(b"just some text, no zip here\n")},
    "base64-of-a-gzip": lambda: {"id": "bad", "input": b64(
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00")},
    "bzip2-entries": lambda: {"id": "bad", "input": b64(zip_with_method(zipfile.ZIP_BZIP2))},
    "lzma-entries": lambda: {"id": "bad", "input": b64(zip_with_method(zipfile.ZIP_LZMA))},
    "unknown-method": lambda: {"id": "bad", "input": b64(raw_zip([
        zip_entry("run.sh", b"echo x\n", method=0),
        zip_entry("d", compressed=b"\x00" * 16, method=99, crc=0, size=16)]))},
    "no-run-sh": lambda: {"id": "bad", "input": b64(make_zip({"main.sh": "echo x\n"}))},
    "run-sh-in-a-folder": lambda: {"id": "bad", "input": b64(make_zip({"sub/run.sh": "x\n"}))},
    "run-sh-upper-case": lambda: {"id": "bad", "input": b64(make_zip({"RUN.SH": "x\n"}))},
    "run-sh-is-a-folder": lambda: {"id": "bad", "input": b64(make_zip({"run.sh/": "",
                                                                       "run.sh/a": "x"}))},
    "zip-slip-dotdot": lambda: {"id": "bad", "input": b64(make_zip(
        {"run.sh": "echo x\n", "../x": "escaped"}))},
    "zip-slip-nested-dotdot": lambda: {"id": "bad", "input": b64(make_zip(
        {"run.sh": "echo x\n", "a/../../x": "escaped"}))},
    "zip-slip-absolute": lambda: {"id": "bad", "input": b64(make_zip(
        {"run.sh": "echo x\n", SLIP_OUTSIDE: "escaped"}))},
}


@pytest.mark.parametrize("name", sorted(REFUSED_INPUTS))
def test_unrunnable_input_is_400_and_nothing_is_stored(shared, name):
    before = store_state(shared)
    resp = post(shared, json.dumps(REFUSED_INPUTS[name]()))
    body = assert_go_error(resp, 400, "bad_request")
    assert body["message"] != "error validating job job id is required"
    assert_nothing_stored(shared, "bad", before=before)
    assert not os.path.exists(SLIP_OUTSIDE)
    assert set(os.listdir(shared.workdir)) <= {"data", "jobd.sqlite3", "jobd.sqlite3-wal",
                                              "jobd.sqlite3-shm"}
    # and the daemon is alive and well
    assert shared.get("bad").status == 404 and shared.proc.poll() is None


def test_messages_say_what_is_wrong(shared):
    def message(body):
        return assert_go_error(post(shared, json.dumps(body)), 400, "bad_request")["message"]

    assert "input" in message(REFUSED_INPUTS["no-input"]()).lower()
    assert "base64" in message(REFUSED_INPUTS["not-base64"]()).lower()
    assert "zip" in message(REFUSED_INPUTS["base64-not-a-zip"]()).lower()
    assert "run.sh" in message(REFUSED_INPUTS["no-run-sh"]())
    assert "compression" in message(REFUSED_INPUTS["bzip2-entries"]()).lower()
    assert "../x" in message(REFUSED_INPUTS["zip-slip-dotdot"]())


@pytest.mark.parametrize("job_id", ["a/b", "../x", "..", ".", ".hidden", "-dash", "_under",
                                    "a b", "a\\b", "tab\there", "caf\u00e9", "a" * 129,
                                    "new\nline", "semi;colon", "q?x", "pct%2F"])
def test_bad_ids_are_400_and_nothing_is_stored(shared, job_id):
    before = store_state(shared)
    assert_go_error(shared.upload(job_id, {"run.sh": "echo x\n"}), 400, "bad_request")
    assert_nothing_stored(shared, before=before)
    assert not os.path.exists(shared.workdir / "x")


@pytest.mark.parametrize("job_id", ["a", "Z9", "a" * 128, "v1.2_3-rc", "0", "A.b-C_d",
                                    str(uuid.uuid4())])
def test_good_ids_are_accepted(jobd, job_id):
    resp = jobd.upload(job_id, {"run.sh": "echo x\n"})
    assert resp.status == 201, resp
    assert jobd.output(job_id)[0]["ID"] == job_id


def test_duplicate_id_is_409_conflict_and_the_first_job_is_untouched(jobd):
    assert jobd.upload("dup", {"run.sh": "echo first\n"}).status == 201
    second = jobd.upload("dup", {"run.sh": "echo second\n"})
    body = assert_go_error(second, 409, "conflict")
    assert "exist" in body["message"]
    job, files = jobd.output("dup")
    assert files["jobd.stdout"] == b"first\n"
    # still a conflict after the job finished
    assert_go_error(jobd.upload("dup", {"run.sh": "echo third\n"}), 409, "conflict")
    assert jobd.output("dup")[1]["jobd.stdout"] == b"first\n"


def test_a_refused_upload_does_not_take_the_id(jobd):
    assert post(jobd, json.dumps({"id": "later", "input": b64(b"not a zip")})).status == 400
    assert jobd.upload("later", {"run.sh": "echo second try\n"}).status == 201
    assert jobd.output("later")[1]["jobd.stdout"] == b"second try\n"


def test_slurml_true_is_not_accepted_silently(jobd):
    # There is no slurml service here: the job must not be queued as if it were local.
    resp = jobd.upload("sl", {"run.sh": "echo x\n"}, slurml=True)
    if resp.status == 201:  # forwarded: then it must say so
        assert resp.json()["Slurml"] is True
    else:
        assert_go_error(resp, resp.status, resp.json()["error"])
        assert resp.status in (400, 501, 503)
        assert_nothing_stored(jobd, "sl")


# ==================================================================================
# GET /api/get/{id}
# ==================================================================================

@pytest.mark.parametrize("job_id", ["nope", "a" * 200, "..%2F..%2Fetc", "%00", ".jobd"])
def test_unknown_job_is_404_job_not_found(shared, job_id):
    resp = shared.get(job_id)
    assert_go_error(resp, 404, "not_found", "job not found")
    assert resp.body == b'{"error":"not_found","message":"job not found","status":404}'


def test_unfinished_job_is_202_job_not_ready(jobd):
    gate = jobd.workdir / "gate"
    assert jobd.upload("slow", {"run.sh": gate_script(gate, "echo done\n")}).status == 201
    for _ in range(3):
        resp = jobd.get("slow")
        assert resp.status == 202, resp
        assert resp.headers.get("Content-Type") == JSON_TYPE
        assert resp.body == b'{"error":"no_content","message":"job not ready","status":202}'
    gate.touch()
    assert jobd.output("slow")[1]["jobd.stdout"] == b"done\n"


def test_finished_job_output_is_the_whole_directory(jobd):
    data = os.urandom(5000)
    script = ("mkdir -p made/deep empty\n"
              "echo result > made/deep/result.txt\n"
              "cp inputs/nested/data.bin made/copy.bin\n"
              "echo to-stdout\n"
              "echo to-stderr >&2\n")
    files_in = {"run.sh": script, "inputs/nested/data.bin": data, "top.txt": "top\n",
                "inputs/readme.txt": "r\n"}
    assert jobd.upload("whole", files_in).status == 201
    resp = jobd.wait("whole")
    assert resp.status == 200, resp
    job = check_job_object(resp, "whole", "SUCCESS")
    assert job["Message"] == "job finished successfully"
    assert job["ExitCode"] == 0
    # standard, padded, single-line base64
    assert re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", job["Output"])
    assert len(job["Output"]) % 4 == 0
    raw = base64.b64decode(job["Output"], validate=True)
    files = unzip(raw)
    assert files["run.sh"] == script.encode()
    assert files["inputs/nested/data.bin"] == data
    assert files["inputs/readme.txt"] == b"r\n" and files["top.txt"] == b"top\n"
    assert files["made/deep/result.txt"] == b"result\n"
    assert files["made/copy.bin"] == data
    assert files["jobd.stdout"] == b"to-stdout\n"
    assert files["jobd.stderr"] == b"to-stderr\n"
    assert "empty/" in files  # an empty folder run.sh made is kept
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert zf.testzip() is None
        info = zf.getinfo("top.txt")
        assert info.compress_type == zipfile.ZIP_DEFLATED


def test_only_big_files_that_do_not_compress_anywhere_are_stored(jobd):
    """Deflate, as Go; but a big file that deflate cannot shrink (sampled at its start,
    middle and end) is stored: deflating it would only cost time."""
    script = ("head -c 2097152 /dev/urandom > random.bin\n"
              "head -c 1048576 /dev/urandom > half.bin; head -c 1048576 /dev/zero >> half.bin\n")
    assert jobd.upload("stored", {"run.sh": script}).status == 201
    job = jobd.wait("stored").json()
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(job["Output"]))) as zf:
        assert zf.getinfo("random.bin").compress_type == zipfile.ZIP_STORED
        assert zf.getinfo("half.bin").compress_type == zipfile.ZIP_DEFLATED
        assert zf.getinfo("run.sh").compress_type == zipfile.ZIP_DEFLATED
        assert zf.testzip() is None


@pytest.mark.parametrize("script", [
    "true\n",
    "mkdir -p a/b empty/deeper; printf x > a/b/c.txt; chmod 600 a/b/c.txt\n"
    "printf u > 'a/\u00fc \u00f1.txt'; printf b > \"$(printf 'bad\\377')\"\n"
    "touch -t 197001020304 old.txt; ln -s run.sh link; echo out; echo err >&2\n",
    "for i in $(seq 100); do echo $i > f$i.txt; done\n",
    "head -c 100000 /dev/zero > zeros.bin\n",
], ids=["trivial", "names-modes-times", "100-files", "100-kB"])
def test_the_result_zip_is_what_zipfile_writes_of_the_job_folder(make_jobd, script):
    """A result of a few small files is built in one piece, a bigger one streams through
    Python's zipfile: either way its bytes are those zipfile writes of the job folder
    (deflated; names, modes and times; folders kept; links left out)."""
    server = make_jobd(env={"DEBUG": "true"})  # DEBUG keeps the folder to compare with
    assert server.upload("same", {"run.sh": script}).status == 201
    job = server.wait("same").json()
    assert job["Status"] == "SUCCESS", job["Message"]
    folder = str(server.data / "same")
    expected = io.BytesIO()
    with zipfile.ZipFile(expected, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf:
        for root, folders, files in os.walk(folder):
            folders.sort()
            relative = os.path.relpath(root, folder)
            if relative != ".":
                zf.write(root, relative)
            for name in sorted(files):
                path = os.path.join(root, name)
                if not os.path.islink(path):  # names that are not UTF-8 get U+FFFD
                    zf.write(path, os.fsencode(os.path.normpath(os.path.join(relative, name)))
                             .decode("utf-8", "replace"))
    assert base64.b64decode(job["Output"]) == expected.getvalue()


@pytest.fixture
def shm_path():
    """A folder on tmpfs, which keeps file times ext4 cannot hold (removed at the end)."""
    path = tempfile.mkdtemp(dir="/dev/shm")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("many", [False, True], ids=["in-one-piece", "streamed"])
def test_a_time_a_zip_cannot_hold_leaves_out_only_that_entry(shm_path, make_jobd, many):
    """A file or folder whose time localtime() cannot convert (on tmpfs a job can set
    one) is left out of the result; the rest of it, the folder's files too, comes back."""
    server = make_jobd(workdir=shm_path)
    script = ("mkdir far; echo in > far/in.txt; echo kept > kept.txt\n"
              "touch -d @1152921504606846976 far eoverflow.txt\n"
              "touch -d @9223372036854775807 overflow.txt\n")
    if many:
        script += "for i in $(seq 100); do : > f$i; done\n"
    assert server.upload("far", {"run.sh": script}).status == 201
    job, files = server.output("far")
    assert job["Status"] == "SUCCESS", job["Message"]
    assert files["kept.txt"] == b"kept\n" and files["far/in.txt"] == b"in\n"
    assert "run.sh" in files and ("f100" in files) == many
    assert not {"far/", "eoverflow.txt", "overflow.txt"} & set(files)


def test_failed_job_is_200_with_its_output(jobd):
    script = "echo partial > partial.txt\necho first problem >&2\necho the last words >&2\nexit 3\n"
    assert jobd.upload("fails", {"run.sh": script}).status == 201
    resp = jobd.wait("fails")
    assert resp.status == 200, resp
    job = check_job_object(resp, "fails", "FAILED")
    assert "exit status 3" in job["Message"]
    assert "the last words" in job["Message"]
    assert "first problem" not in job["Message"]
    assert job["ExitCode"] == 3
    files = unzip(base64.b64decode(job["Output"], validate=True))
    assert files["partial.txt"] == b"partial\n"
    assert files["jobd.stderr"] == b"first problem\nthe last words\n"
    assert "run.sh" in files


def test_job_killed_by_a_signal_is_failed_and_named(jobd):
    assert jobd.upload("sig", {"run.sh": "kill -KILL $$\n"}).status == 201
    job, files = jobd.output("sig")
    assert job["Status"] == "FAILED"
    assert "signal" in job["Message"].lower() and "kill" in job["Message"].lower()
    assert job["ExitCode"] not in (0, None)


# ==================================================================================
# How a job runs
# ==================================================================================

def test_job_environment_cwd_stdin_and_process_group(make_jobd):
    marker = "marker-" + uuid.uuid4().hex
    server = make_jobd(env={**os.environ, "JOBD_TEST_MARKER": marker})
    script = ('echo "$JOBD_TEST_MARKER" > env.txt\n'
              "pwd -P > cwd.txt\n"
              "readlink /proc/self/fd/0 > stdin.txt\n"
              "cat > read-stdin.txt\n"  # must see end of input at once
              "echo $$ > pid.txt\n"
              "cut -d' ' -f5 /proc/$$/stat > pgid.txt\n"
              "cut -d' ' -f6 /proc/$$/stat > sid.txt\n")
    assert server.upload("env1", {"run.sh": script}).status == 201
    job, files = server.output("env1", timeout=15)
    assert job["Status"] == "SUCCESS", job["Message"]
    assert files["env.txt"].decode().strip() == marker
    assert files["cwd.txt"].decode().strip() == os.path.realpath(server.data / "env1")
    assert files["stdin.txt"].decode().strip() == "/dev/null"
    assert files["read-stdin.txt"] == b""
    pid = files["pid.txt"].strip()
    assert files["pgid.txt"].strip() == pid  # its own process group...
    assert files["sid.txt"].strip() == pid   # ...and session, apart from jobd's
    assert int(pid) != server.proc.pid


@pytest.mark.parametrize("script,mode", [
    ("echo no-shebang\n", None),
    ("#!/bin/sh\necho shebang\n", None),
    ("#!/bin/sh\necho not-executable\n", 0o100644),
    ("echo no-shebang-not-executable\n", 0o100600),
    ("echo crlf\r\n", None),
])
def test_run_sh_runs_with_or_without_shebang_and_mode(jobd, script, mode):
    modes = {"run.sh": mode} if mode else None
    assert jobd.upload("sh", zip_bytes=make_zip({"run.sh": script}, modes)).status == 201
    job, files = jobd.output("sh")
    word = script.splitlines()[-1].split()[-1].strip().encode()
    assert job["Status"] == "SUCCESS", job["Message"]
    assert files["jobd.stdout"].strip() == word


def test_a_script_without_shebang_runs_with_sh_and_one_with_shebang_as_it_says(jobd):
    # The Go jobd execs ./run.sh, so a script without #! fails there ("exec format
    # error"); jobd runs it with /bin/sh, as a shell would. A #! line is obeyed.
    posix = "set -- one two\necho $2\ncase x in x) echo matched;; esac\n"
    assert jobd.upload("posix", {"run.sh": posix}).status == 201
    job, files = jobd.output("posix")
    assert job["Status"] == "SUCCESS", (job["Message"], files.get("jobd.stderr"))
    assert files["jobd.stdout"] == b"two\nmatched\n"
    bashy = "#!/bin/bash\narr=(one two)\necho ${arr[1]}\n[[ -n x ]] && echo dbl\n"
    assert jobd.upload("bashy", {"run.sh": bashy}).status == 201
    job, files = jobd.output("bashy")
    assert job["Status"] == "SUCCESS", (job["Message"], files.get("jobd.stderr"))
    assert files["jobd.stdout"] == b"two\ndbl\n"


def test_large_input_round_trips_byte_exact(jobd):
    blob = random.Random(7).randbytes(1 << 20)
    text = ("line of text\n" * 80000).encode()
    assert jobd.upload("mb", {"run.sh": "sha256sum blob.bin > sums\n", "blob.bin": blob,
                              "dir/text.txt": text}).status == 201
    job, files = jobd.output("mb", timeout=60)
    assert job["Status"] == "SUCCESS"
    assert files["blob.bin"] == blob and files["dir/text.txt"] == text
    assert files["sums"].split()[0].decode() == hashlib.sha256(blob).hexdigest()


def test_default_upload_cap_is_at_least_1_gib(shared):
    # The orchestrator sends JSON bodies of ~550 MB; ask with Expect: 100-continue and
    # do not send the body: jobd must invite it, not refuse it.
    with raw_connect(shared.port) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        sock.settimeout(10)
        first = sock.recv(100)
        assert first.startswith(b"HTTP/1.1 100"), first


# ==================================================================================
# The real client: the WeNMR orchestrator's pattern
# ==================================================================================

def orchestrator_run(port, files, results, poll=0.5, limit=60):
    """Exactly what the orchestrator does: uuid id, padded base64, slurml false; only 201
    counts; a new connection per request; poll every 500 ms; 202 = not ready; 200 = done,
    Output decoded as the result zip. Both bodies must have string "ID" and "Output"."""
    job_id = str(uuid.uuid4())
    payload = json.dumps({"id": job_id, "input": base64.b64encode(make_zip(files)).decode(),
                          "slurml": False})

    def call(method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    status, body = call("POST", "/api/upload", payload)
    assert status == 201, body
    accepted = json.loads(body)
    assert isinstance(accepted["ID"], str) and accepted["ID"] == job_id
    assert isinstance(accepted["Output"], str)
    for _ in range(int(limit / poll)):
        status, body = call("GET", f"/api/get/{job_id}")
        if status == 200:
            done = json.loads(body)
            assert done["ID"] == job_id and isinstance(done["Output"], str)
            results[job_id] = unzip(base64.b64decode(done["Output"], validate=True))
            return
        assert status == 202, (status, body)
        time.sleep(poll)
    raise AssertionError(f"{job_id} never finished")


def test_orchestrator_client_pattern(jobd):
    results, errors = {}, []

    def client(n):
        try:
            orchestrator_run(jobd.port, {"run.sh": f"sleep 0.3; echo job-{n} > result.txt\n",
                                         "input.dat": os.urandom(100)}, results)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert sorted(files["result.txt"] for files in results.values()) == [
        f"job-{n}\n".encode() for n in range(4)]


def test_ids_are_case_sensitive(jobd):
    assert jobd.upload("Case", {"run.sh": "echo upper\n"}).status == 201
    assert jobd.upload("case", {"run.sh": "echo lower\n"}).status == 201
    assert jobd.output("Case")[1]["jobd.stdout"] == b"upper\n"
    assert jobd.output("case")[1]["jobd.stdout"] == b"lower\n"


def test_get_ignores_a_query_string_and_decodes_the_path(jobd):
    assert jobd.upload("job-1", {"run.sh": "echo q\n"}).status == 201
    jobd.wait("job-1")
    assert jobd.request("GET", "/api/get/job-1?x=1").status == 200
    assert jobd.request("GET", "/api/get/job%2D1").status == 200
    assert jobd.request("GET", "/api/get/job%2F1").status == 404


# ==================================================================================
# Improvements beyond the wire: memory, environment, logging
# ==================================================================================

def test_serving_a_large_output_does_not_grow_memory(jobd):
    # Go held the whole output in memory, several times (4.5 GB of RSS for 200 MB).
    size = 48 << 20
    script = f"head -c {size} /dev/urandom > big.bin\n"
    assert jobd.upload("bigout", {"run.sh": script}).status == 201
    deadline = time.monotonic() + 60
    while jobd.request("HEAD", "/api/get/bigout").status != 200:
        assert time.monotonic() < deadline, "the large job did not finish"
        time.sleep(0.1)
    pid = jobd_process(jobd)[0]  # (the frozen jobd's own process, not its loaders)
    before = proc_status(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS of jobd here")
    conn = http.client.HTTPConnection("127.0.0.1", jobd.port, timeout=60)
    conn.request("GET", "/api/get/bigout")
    resp = conn.getresponse()
    assert resp.status == 200
    assert int(resp.getheader("Content-Length")) > size * 4 // 3
    body = resp.read()
    conn.close()
    peak = proc_status(pid, "VmHWM")
    assert peak - before < 32 << 20, f"jobd grew by {(peak - before) >> 20} MiB serving it"
    job = json.loads(body)
    files = unzip(base64.b64decode(job["Output"], validate=True))
    assert len(files["big.bin"]) == size


def test_receiving_a_large_upload_does_not_grow_memory(jobd):
    # The orchestrator sends up to ~550 MB of JSON: jobd decodes "input" as it arrives.
    blob = os.urandom(40 << 20)
    body = upload_body("bigin", make_zip({"run.sh": "true\n", "blob": blob},
                                         compression=zipfile.ZIP_STORED)).encode()
    pid = jobd_process(jobd)[0]  # (the frozen jobd's own process, not its loaders)
    before = proc_status(pid, "VmRSS")
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS of jobd here")
    assert jobd.request("POST", "/api/upload", body).status == 201
    peak = proc_status(pid, "VmHWM")
    assert peak - before < 32 << 20, f"jobd grew by {(peak - before) >> 20} MiB receiving it"
    assert jobd.output("bigin", timeout=60)[1]["blob"] == blob


@pytest.mark.parametrize("library_path", [None, "/opt/custom/lib"], ids=["unset", "set"])
def test_job_environment_is_exactly_jobds_own(make_jobd, library_path):
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["JOBD_TEST_MARKER"] = "exact"
    if library_path:
        env["LD_LIBRARY_PATH"] = library_path
    server = make_jobd(env=env)
    assert server.upload("envx", {"run.sh": "env -0 > env.bin\n"}).status == 201
    job, files = server.output("envx")
    seen = dict(item.split("=", 1) for item in files["env.bin"].decode().split("\0") if item)
    shell_own = {"PWD", "SHLVL", "_", "OLDPWD"}  # set by the shell running run.sh
    assert {k: v for k, v in seen.items() if k not in shell_own} == \
        {k: v for k, v in env.items() if k not in shell_own}


def test_one_log_line_per_request_and_per_job_state_change(jobd):
    assert jobd.upload("logged", {"run.sh": "exit 4\n"}).status == 201
    jobd.wait("logged")
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
    time.sleep(0.2)
    lines = list(jobd.lines)
    assert all(stamp.match(line) for line in lines), lines
    posts = [line for line in lines if "POST" in line and "/api/upload" in line]
    assert len(posts) == 1 and "201" in posts[0], lines
    about_job = [line for line in lines if "logged" in line and "/api/" not in line]
    assert any("RUNNING" in line for line in about_job), lines
    assert any("FAILED" in line for line in about_job), lines


def test_executable_inputs_stay_executable(jobd):
    zip_bytes = make_zip({"run.sh": "./bin/tool.sh > out.txt\n",
                          "bin/tool.sh": "#!/bin/sh\necho tool\n"}, modes={"bin/tool.sh": 0o100755})
    assert jobd.upload("modes", zip_bytes=zip_bytes).status == 201
    job = jobd.wait("modes").json()
    assert job["Status"] == "SUCCESS", job["Message"]
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(job["Output"]))) as zf:
        assert zf.read("out.txt") == b"tool\n"
        assert (zf.getinfo("bin/tool.sh").external_attr >> 16) & 0o111


def test_missing_interpreter_is_a_failed_job_with_output(jobd):
    assert jobd.upload("nointerp", {"run.sh": "#!/no/such/shell\necho x\n"}).status == 201
    resp = jobd.wait("nointerp")
    assert resp.status == 200
    job = resp.json()
    assert job["Status"] == "FAILED" and "run.sh" in job["Message"], job["Message"]
    assert "run.sh" in unzip(base64.b64decode(job["Output"], validate=True))


# Small bodies are parsed whole, large and chunked ones by a streaming parser: both must
# give the same answers, so the edge cases run through both (a chunked body always streams).
def edge_bodies(job_id, payload):
    return [
        '{"id": "%s", "input": "%s"}' % (job_id, payload),
        '{"ID": "%s", "INPUT": "%s", "Slurml": false}' % (job_id, payload),
        '{"id": "x", "id": "%s", "input": "!!", "Input": "%s"}' % (job_id, payload),
        '{"id": "%s", "input": "%s", "extra": {"a": [1, {"b": "}"}]}}' % (job_id, payload),
        '{"id": "%s", "input": "%s"}   \n' % (job_id, payload),
        '{"id": "%s", "input": "%s"} trailing' % (job_id, payload),
        '{"id": "%s", "input": "%s"' % (job_id, payload),
        '{"id": %s, "input": "%s"}' % ("123", payload),
        '{"id": "%s", "input": 5}' % job_id,
        '{"id": "%s", "input": null}' % job_id,
        '{"id": "%s", "slurml": "yes", "input": "%s"}' % (job_id, payload),
        '{"id": "%s", "input": "%s"}' % (job_id, payload.replace("/", "\\/")),
        '{"id": "%s", "input": "%s"}' % (job_id, payload[:10] + "\\n" + payload[10:]),
        '{"id": "%s", "input": "not base64!"}' % job_id,
        '{"id": "%s", "input": "%s\n%s"}' % (job_id, payload[:8], payload[8:]),  # raw newline
        '{"id": "%s", "input": "%s", "slurm": {"x": "a\tb"}}' % (job_id, payload),  # raw tab
        '["%s"]' % job_id,
        '',
    ]


def test_small_and_streamed_bodies_get_the_same_answers(jobd):
    payload = base64.b64encode(make_zip({"run.sh": "true\n"})).decode()
    for n, (whole, streamed) in enumerate(zip(edge_bodies("w", payload),
                                              edge_bodies("s", payload))):
        first = jobd.request("POST", "/api/upload", whole.replace('"w"', f'"w{n}"'))
        body = streamed.replace('"s"', f'"s{n}"').encode()
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                           for part in (body[:7], body[7:]) if part) + b"0\r\n\r\n"
        second = jobd.request("POST", "/api/upload", chunked,
                              {"Transfer-Encoding": "chunked"})
        assert first.status == second.status, (n, whole[:60], first, second)
        if first.status != 201:
            assert first.json()["error"] == second.json()["error"], (n, first, second)

"""Tiny stdlib client for jobd: upload a run.sh job, wait for its result (tests, image test, bench).

    python3 tests/jobd_client.py URL [--script 'echo hi'] [--expect-stdout hi] [--timeout 60]

Every wait is bounded in time; talk only to addresses of this machine.
"""
import argparse
import base64
import io
import json
import sys
import time
import urllib.error
import urllib.request
import zipfile


def job_zip(run_sh, files=None):
    """Base64 of a zip holding run.sh (mode 755) and optional extra files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("run.sh", date_time=(2024, 1, 1, 0, 0, 0))
        info.external_attr = 0o100755 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, run_sh)
        for name, data in (files or {}).items():   # extra files are stored executable (755)
            extra = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            extra.external_attr = 0o100755 << 16
            extra.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(extra, data)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def request(method, url, body=None, timeout=10.0):
    """(status, parsed JSON body or raw bytes) of one HTTP request; HTTP errors are answers too."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def wait_until_up(url, timeout=10.0):
    """Poll url until any HTTP answer arrives; returns seconds waited."""
    start = time.monotonic()
    while True:
        try:
            request("GET", url, timeout=1.0)
            return time.monotonic() - start
        except OSError:
            if time.monotonic() - start > timeout:
                raise TimeoutError("no HTTP answer from %s within %.0f s" % (url, timeout))
            time.sleep(0.02)


def run_job(base_url, job_id, run_sh, files=None, timeout=60.0):
    """Upload a job and poll until it is done: (job object, {name: bytes} of its output zip)."""
    status, body = request("POST", base_url + "/api/upload",
                           {"id": job_id, "input": job_zip(run_sh, files)})
    if status != 201:
        raise AssertionError("upload of %s answered %s: %r" % (job_id, status, body))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = request("GET", base_url + "/api/get/" + job_id)
        if status in (200, 206):
            out = zipfile.ZipFile(io.BytesIO(base64.b64decode(body["Output"])))
            return body, {name: out.read(name) for name in out.namelist()}
        if status != 202:
            raise AssertionError("get of %s answered %s: %r" % (job_id, status, body))
        time.sleep(0.05)
    raise TimeoutError("job %s not finished within %.0f s" % (job_id, timeout))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--id", default="smoke-%d" % int(time.time() * 1000))
    ap.add_argument("--script", default="#!/bin/sh\necho hello from jobd\n")
    ap.add_argument("--expect-stdout", default="hello from jobd")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    wait_until_up(args.url, timeout=args.timeout)
    job, files = run_job(args.url.rstrip("/"), args.id, args.script, timeout=args.timeout)
    stdout = files.get("jobd.stdout", b"").decode(errors="replace")
    print("job %s: %s (%s); stdout: %r" % (job["ID"], job["Status"], job.get("Message"), stdout))
    if job["Status"] != "SUCCESS" or args.expect_stdout not in stdout:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

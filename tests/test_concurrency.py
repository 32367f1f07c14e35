"""Races: uploads of one id, many jobs at once, prompt starts, a pool of one worker.

Jobs report to a shared file whose path reaches them through the environment jobd was
started with (JOBD_TEST_SHARED), so the tests see what actually ran, and how often.
"""

import os
import statistics
import threading
import time

import pytest

from conftest import make_zip
from helpers import upload_body


def shared_jobd(make_jobd, tmp_path, args=()):
    shared = tmp_path / "shared.log"
    shared.touch()
    server = make_jobd(args=list(args), env={**os.environ, "JOBD_TEST_SHARED": str(shared)})
    return server, shared


def race(count, action):
    """Run action(n) for n in range(count) in threads released together; the results."""
    barrier = threading.Barrier(count)
    results = [None] * count

    def run(n):
        barrier.wait(10)
        try:
            results[n] = action(n)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            results[n] = e

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.parametrize("round_", range(3))
def test_racing_uploads_of_one_id_give_exactly_one_201(make_jobd, tmp_path, round_):
    server, shared = shared_jobd(make_jobd, tmp_path, ["--workers", "4"])
    bodies = [upload_body("same", make_zip({"run.sh": f'echo "run {n}" >> "$JOBD_TEST_SHARED"\n'}))
              for n in range(16)]
    results = race(16, lambda n: server.request("POST", "/api/upload", bodies[n]))
    statuses = sorted(r.status for r in results)
    assert statuses == [201] + [409] * 15, results
    winner = next(n for n, r in enumerate(results) if r.status == 201)
    for r in results:
        if r.status == 409:
            assert list(r.json()) == ["error", "message", "status"]
            assert r.json()["error"] == "conflict" and r.json()["status"] == 409
    job, files = server.output("same")
    assert job["Status"] == "SUCCESS"
    assert files["run.sh"] == f'echo "run {winner}" >> "$JOBD_TEST_SHARED"\n'.encode()
    assert shared.read_text() == f"run {winner}\n"  # the winner's input, run once


def test_50_concurrent_jobs_each_run_exactly_once(make_jobd, tmp_path):
    server, shared = shared_jobd(make_jobd, tmp_path, ["--workers", "8"])
    ids = [f"job-{n:02d}" for n in range(50)]
    script = 'echo "$(basename "$PWD")" >> "$JOBD_TEST_SHARED"\n'
    bodies = {job_id: upload_body(job_id, make_zip({"run.sh": script, "n": job_id}))
              for job_id in ids}
    results = race(50, lambda n: server.request("POST", "/api/upload", bodies[ids[n]]))
    assert [r.status for r in results] == [201] * 50, [r for r in results if r.status != 201]
    deadline = time.monotonic() + 60
    for job_id in ids:
        job, files = server.output(job_id, timeout=max(1, deadline - time.monotonic()))
        assert job["Status"] == "SUCCESS", (job_id, job["Message"])
        assert files["n"] == job_id.encode()
    lines = shared.read_text().splitlines()
    assert sorted(lines) == ids  # each id once: none lost, none twice


def test_a_job_starts_at_once_not_on_a_poll(make_jobd, tmp_path):
    # Go polls every second, so a trivial job takes ~1 s. Ours starts when accepted.
    server, _ = shared_jobd(make_jobd, tmp_path)
    latencies = []
    for n in range(12):
        started = time.monotonic()
        assert server.upload(f"quick{n}", {"run.sh": "true\n"}).status == 201
        server.wait(f"quick{n}", timeout=10)
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)  # let the workers go idle again between jobs
    # A 1 s poll would put the median near 0.5 s and few below 0.1 s; allow for a loaded
    # machine in the slowest ones.
    latencies.sort()
    assert statistics.median(latencies) < 0.25, latencies
    assert latencies[len(latencies) // 4] < 0.1, latencies


def test_one_worker_runs_jobs_one_at_a_time_in_order(make_jobd, tmp_path):
    server, shared = shared_jobd(make_jobd, tmp_path, ["--workers", "1"])
    script = ('echo "start $(basename "$PWD") $(date +%s.%N)" >> "$JOBD_TEST_SHARED"\n'
              "sleep 0.25\n"
              'echo "end $(basename "$PWD") $(date +%s.%N)" >> "$JOBD_TEST_SHARED"\n')
    ids = [f"serial{n}" for n in range(4)]
    for job_id in ids:
        assert server.upload(job_id, {"run.sh": script}).status == 201
    for job_id in ids:
        assert server.output(job_id, timeout=30)[0]["Status"] == "SUCCESS"
    events = [line.split() for line in shared.read_text().splitlines()]
    assert [(kind, job) for kind, job, _ in events] == [
        (kind, job_id) for job_id in ids for kind in ("start", "end")]
    times = [float(t) for _, _, t in events]
    assert times == sorted(times)  # each ends before the next starts


def test_two_workers_do_run_jobs_side_by_side(make_jobd, tmp_path):
    # The other side of the test above: it would pass for a daemon that never overlaps.
    server, shared = shared_jobd(make_jobd, tmp_path, ["--workers", "2"])
    gate = tmp_path / "both-started"
    script = ('echo started >> "$JOBD_TEST_SHARED"\n'
              f'i=0; while [ "$(wc -l < "$JOBD_TEST_SHARED")" -lt 2 ] && [ $i -lt 200 ]; do '
              "sleep 0.05; i=$((i+1)); done\n"
              f'[ "$(wc -l < "$JOBD_TEST_SHARED")" -ge 2 ] && touch "{gate}"\n')
    for n in range(2):
        assert server.upload(f"pair{n}", {"run.sh": script}).status == 201
    for n in range(2):
        assert server.output(f"pair{n}", timeout=30)[0]["Status"] == "SUCCESS"
    assert gate.exists()


@pytest.mark.parametrize("clients", [8])
def test_keep_alive_clients_upload_concurrently(make_jobd, tmp_path, clients):
    # The bench pattern: several clients, each on one kept-alive connection.
    import http.client
    server, shared = shared_jobd(make_jobd, tmp_path)
    per_client = 10
    zip_bytes = make_zip({"run.sh": 'echo "$(basename "$PWD")" >> "$JOBD_TEST_SHARED"\n'})

    def client(n):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        statuses = []
        for k in range(per_client):
            conn.request("POST", "/api/upload", upload_body(f"ka{n}-{k}", zip_bytes))
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        conn.close()
        return statuses

    results = race(clients, client)
    assert all(r == [201] * per_client for r in results), results
    ids = [f"ka{n}-{k}" for n in range(clients) for k in range(per_client)]
    for job_id in ids:
        assert server.wait(job_id, timeout=30).json()["Status"] == "SUCCESS"
    assert sorted(shared.read_text().split()) == sorted(ids)

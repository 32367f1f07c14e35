"""pytest fixtures for the Slurm executor's tests: a real Slurm cluster and a slurml stand-in.

Use them by importing into a test module (or into tests/conftest.py):

    from slurm_fixtures import slurm_cluster, make_slurm_cluster, slurml  # noqa: F401

slurm_cluster        one real cluster for the whole session (MinJobAge=300, 16 CPUs);
                     each test gets it with an empty queue, and any job a test leaves
                     behind is cancelled when the test ends. Skips without root/Slurm.
make_slurm_cluster   factory for a private cluster with other settings, for example
                     make_slurm_cluster(min_job_age=2); stopped when the test ends.
slurml               a SlurmlStandin on 127.0.0.1 (token "test-token"), stopped after.
"""

import pytest

from slurm_cluster import SlurmCluster, SlurmError, skip_reason
from slurml_standin import SlurmlStandin


def _require_slurm():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_session_cluster():
    """The session's shared cluster; prefer the `slurm_cluster` fixture in tests."""
    _require_slurm()
    cluster = SlurmCluster(min_job_age=300)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.leftover_pids(), "Slurm processes left behind"


@pytest.fixture
def slurm_cluster(slurm_session_cluster):
    """The shared cluster, with an empty queue at the start and the end of the test."""
    cluster = slurm_session_cluster
    if not cluster.daemons_alive():
        pytest.fail("the session's Slurm daemons died:\n" + cluster.logs())
    cluster.cancel_all()
    yield cluster
    try:
        cluster.cancel_all()
    except SlurmError as e:  # do not hide the test's own failure behind this one
        print("slurm_cluster teardown:", e)


@pytest.fixture
def make_slurm_cluster():
    """Factory: make_slurm_cluster(**SlurmCluster kwargs) -> a started private cluster."""
    _require_slurm()
    clusters = []

    def make(**kwargs):
        cluster = SlurmCluster(**kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def slurml():
    """A running slurml stand-in; script it with .plan(...) before the job is submitted."""
    with SlurmlStandin(token="test-token") as server:
        yield server

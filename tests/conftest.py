"""Shared fixtures: one Prefect test server, one warm Dask cluster and the object-store servers
(tests/objectstores.py) for the whole session."""

from __future__ import annotations

import logging

import pytest

import flows  # noqa: F401  (sets Prefect's environment before Prefect is imported)

# Object-store servers (S3, GCS, Azure) and their fresh-bucket fixtures.
pytest_plugins = ["tests.objectstores"]


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()  # the harness sets a setting, not the environment


@pytest.fixture(scope="session")
def dask_address(prefect_server):
    """A real process-based LocalCluster shared by the end-to-end tests, so worker start-up
    (importing torch) is paid once per session rather than once per flow run."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.WARNING
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def prefect_home(tmp_path):
    """A PREFECT_HOME of the test's own, without a configured API: a run started in it starts the
    shared local server there (flows/server.py), which is stopped when the test ends."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.server import stop_server

    home = tmp_path / "prefect-home"
    with temporary_settings(updates={PREFECT_HOME: home}, restore_defaults={PREFECT_API_URL}):
        try:
            yield home
        finally:
            stop_server()

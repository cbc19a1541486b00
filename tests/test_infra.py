"""Docker cannot run on CI; lint what can be linted: the Dockerfile with hadolint and the compose
file against the compose specification."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from compose_spec.compose_spec import PyOptions

ROOT = Path(__file__).parents[1]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(ROOT / "images" / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_and_locked():
    text = (ROOT / "images" / "Dockerfile").read_text()
    assert "FROM runtime AS cpu" in text and "FROM runtime AS cuda" in text
    assert text.count("uv sync --locked") >= 3 and "USER 1000" in text
    # The Dask workers' settings, which tests/test_deployment.py gives its workers the same way.
    assert "COPY infra/dask.yaml /etc/dask/" in text


def test_compose_file_is_valid_and_has_the_topology():
    compose = PyOptions(apply_merge=True).from_yaml((ROOT / "infra" / "compose.yaml").read_text())
    compose.validate()
    assert set(compose.service_names()) >= {
        "postgres",
        "prefect-server",
        "dask-scheduler",
        "dask-worker-cpu",
        "dask-worker-gpu",
        "prefect-worker",
        "minio",
    }
    gpu = compose.get_service("dask-worker-gpu")
    assert "GPU=1" in gpu["command"] and gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    server = yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())["services"]["prefect-server"]
    assert server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")

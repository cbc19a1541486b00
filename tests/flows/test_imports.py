import json
import subprocess
import sys

import pytest

# Libraries of single stages, each seconds to import: the embedding's model, the report's plots,
# PDF and projections.
STAGE_LIBRARIES = ("torch", "torchvision", "timm", "matplotlib", "weasyprint", "umap", "numba", "scipy")


def test_the_command_line_and_the_flow_import_no_stage_library_before_a_stage_needs_it(tmp_path):
    # What `thresher run` does before its first log line, and what each Dask worker process does at
    # its start: it imports the command line as its main module.
    script = f"""
import json, sys
from flows.cli import main
from flows.curate import pipeline
from flows.overrides import config_from_overrides
from flows.stages import embedding_model
config = config_from_overrides(["input_dir={tmp_path}", "output_dir={tmp_path}", "stopping_condition.n_samples=0.3"])
embedding_model(config)  # the model's name and size, which a datapool is checked against
print(json.dumps(sorted(name for name in {STAGE_LIBRARIES!r} if name in sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_selection_device_auto_and_the_reports_machine_find_no_gpu_without_torch_where_there_is_no_driver():
    script = """
import sys

import pytest
from tasks.report.numbers import machine
from tasks.selection.backends import nvidia_driver_present, resolve_backend
backend = resolve_backend("auto")
print(nvidia_driver_present(), backend.is_gpu, machine()["gpu"], "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    driver, gpu, gpu_name, torch_imported = done.stdout.split()
    if driver == "True":
        pytest.skip("this machine has an NVIDIA driver: 'auto' asks CUDA")
    assert (gpu, gpu_name, torch_imported) == ("False", "None", "False")


def test_a_run_imports_the_reports_libraries_in_the_background_from_its_start():
    script = """
import json, sys, threading
from flows.stages import REPORT_LIBRARIES, import_report_libraries
before = [name for name in REPORT_LIBRARIES if name in sys.modules]
import_report_libraries()
(loading,) = [thread for thread in threading.enumerate() if thread.name == "report-imports"]
loading.join(timeout=240)
print(json.dumps([before, [name for name in REPORT_LIBRARIES if name in sys.modules]]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == [] and after == ["tasks.report.build", "sklearn.linear_model", "weasyprint"]

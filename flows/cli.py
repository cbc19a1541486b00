"""`thresher run key=value ...`: the command line of the curate flow.

It validates the config, plans the Dask cluster (flows/cluster.py) and starts the pipeline flow
on it itself (`flows.curate.pipeline`); deployments start it through `flows.curate.curate`.

Without `PREFECT_API_URL`, one temporary Prefect server is started for the run and every Dask
worker talks to it (Prefect's ephemeral mode would otherwise start one server per worker
process). With `PREFECT_API_URL` set, the run shows up in that server's UI.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

from flows.config import ConfigError, ThresherConfig
from flows.overrides import all_keys, config_from_overrides, field_help
from tasks.datapool import DatapoolError
from tasks.storage import StorageError

USAGE = "thresher run input_dir=PATH output_dir=PATH [key=value ...]"


def keys_help() -> str:
    lines = []
    for key in all_keys():
        default, description = field_help(key)
        shown = "(required)" if default is None and key in {"input_dir", "output_dir"} else f"= {default!r}"
        lines.append(f"  {key} {shown}")
        lines.extend(textwrap.wrap(description, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thresher", description="Curate image datasets: embed, clean, select.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the curate flow. Keys and defaults follow the Lightly Worker:\n\n" + keys_help(),
    )
    run.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


@contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured Prefect API (PREFECT_API_URL, a profile, a test harness); without one,
    one temporary local server shared by all workers."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.logging.handlers import APILogHandler
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=120)
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by the local Dask worker processes
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        # Send the run's last log lines while the server is still there to take them.
        APILogHandler().flush()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def sanity_check(config: ThresherConfig) -> None:
    """Check the installation without curating: folders, the model and one forward pass."""
    import numpy as np

    from tasks.embedding import default_device, load_backbone
    from tasks.storage import describe, write_text

    source = config.location(config.input_dir)
    if not source.exists() or source.is_file():
        raise ConfigError(f"input_dir={describe(source)!r} is not a folder or bucket prefix with files.")
    probe = config.location(config.output_dir) / ".thresher-sanity-check"
    write_text("", probe)  # output_dir is writable (credentials, permissions, the bucket exists)
    probe.unlink()
    device = default_device()
    model = load_backbone(config.lightly.model.name, config.lightly.model.num_ftrs, None, config.lightly.seed, device)
    import torch

    with torch.inference_mode():
        size = config.lightly.collate.input_size
        dim = model(torch.from_numpy(np.zeros((1, 3, size, size), np.float32)).to(device)).shape[1]
    print(
        f"Sanity check passed: {config.lightly.model.name} on {device} gives {dim}-d embeddings; "
        f"input_dir and output_dir are usable."
    )


def quiet_console() -> None:
    """Terminal output shows the flow's messages and the progress bars; per-task state lines
    still reach the Prefect UI, and Dask's INFO chatter is dropped."""
    import logging

    logging.getLogger("prefect.task_runs").propagate = False
    logging.getLogger("distributed").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_from_overrides(args.overrides)
        if config.sanity_check:
            sanity_check(config)
            return 0
        from flows.cluster import cluster_plan
        from flows.curate import frozen_modules, no_heartbeats, pipeline

        quiet_console()
        plan = cluster_plan(config)
        with prefect_api(), no_heartbeats(), frozen_modules():
            result = pipeline.with_options(task_runner=plan.task_runner())(config, plan)
    except ConfigError as error:
        print(f"thresher: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, DatapoolError, StorageError) as error:  # OSError: a missing folder, a full disk
        print(f"thresher: {error}", file=sys.stderr)
        return 1
    print(f"Results: {result['run_directory']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`thresher run key=value ...`: the command line of the curate flow; `thresher server stop|status`.

It validates the config, plans the Dask cluster (flows/cluster.py) and starts the pipeline flow
on it itself (`flows.curate.pipeline`); deployments start it through `flows.curate.curate`.

Without `PREFECT_API_URL`, the runs share a local Prefect server that the first one starts in the
background (flows/server.py), and every Dask worker talks to it (Prefect's ephemeral mode would
otherwise start one server per worker process); when it cannot be started, the run starts a
temporary one of its own. With `PREFECT_API_URL` set, the run shows up in that server's UI.

The terminal shows the progress bars and a few lines: where the results are, what was removed and
the run's page in the UI. Everything else the run's processes write (Dask, Prefect, the workers'
libraries) goes to `log.txt` in the run directory; `-v` shows it on the terminal instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from upath import UPath

from flows.config import ConfigError, ThresherConfig
from flows.overrides import all_keys, config_from_overrides, field_help
from tasks.datapool import DatapoolError
from tasks.storage import StorageError, describe, is_local, write_text

USAGE = "thresher run input_dir=PATH output_dir=PATH [key=value ...] [-v]"
LOG_NAME = "log.txt"


def keys_help() -> str:
    from pydantic_core import PydanticUndefined

    lines = []
    for key in all_keys():
        default, description = field_help(key)
        shown = "(required)" if default is PydanticUndefined else f"= {default!r}"
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
    run.add_argument(
        "-v", "--verbose", action="store_true", help=f"show Dask's and Prefect's logs here, not in {LOG_NAME}"
    )
    server = commands.add_parser("server", help="the local Prefect server that runs share")
    server.add_argument("action", choices=["stop", "status"])
    return parser


@contextmanager
def api_at(api_url: str) -> Iterator[None]:
    """The run, and the local Dask worker processes it starts, report to the server at api_url."""
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = api_url  # inherited by the local Dask worker processes
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield
    finally:
        # Send the run's last log lines while the server is still there to take them.
        APILogHandler().flush()
        os.environ.pop("PREFECT_API_URL", None)


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Use the configured Prefect API (PREFECT_API_URL, a profile, a test harness); without one,
    the local server the runs share, or a temporary one if that cannot start. Yields the UI's
    URL, if there is a UI."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from flows.server import ServerError, free_port, shared_server

    if PREFECT_API_URL.value():
        yield PREFECT_UI_URL.value()
        return
    try:
        state, started = shared_server()
    except (ServerError, OSError) as error:
        print(f"No shared Prefect server ({error}): this run starts a temporary one, without a UI.")
        from prefect.server.api.server import SubprocessASGIServer

        # On a port of its own: Prefect keeps one server per port, and the one without a port may
        # be Prefect's own temporary server of this process (a test harness's), which this would stop.
        server = SubprocessASGIServer(port=free_port())
        server.start(timeout=120)
        try:
            with api_at(server.api_url):
                yield None
        finally:
            server.stop()
        return
    how = "started in the background" if started else "running"
    print(f"Prefect UI: {state.url} ({how}; `thresher server stop` stops it)")
    with api_at(state.api_url):
        yield state.url


def sanity_check(config: ThresherConfig) -> None:
    """Check the installation without curating: folders, the model and one forward pass."""
    import numpy as np

    from tasks.backbones import default_device, load_backbone

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


class UserWarnings(logging.Filter):
    """Warnings, not errors: a run's error reaches the terminal as one line of `main`'s, naming the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return logging.WARNING <= record.levelno < logging.ERROR


# Loggers whose warnings a user can act on: our modules' and the flow run's (a skipped file, a
# missing checkpoint). Prefect's and Dask's own warnings are about their internals.
USER_LOGGERS = ("flows", "tasks", "prefect.flow_runs")


@contextmanager
def internals_to(log: Path) -> Iterator[None]:
    """Whatever this process and the processes it starts (Dask workers, a temporary Prefect
    server) write to their stderr goes to `log`: they inherit the file descriptor, and Prefect's
    and Dask's log handlers hold the stream. sys.stderr, which the progress bars write to, stays on
    the terminal, and so do our warnings."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    with open(log, "ab") as file:
        os.dup2(file.fileno(), 2)
    saved = sys.stderr
    sys.stderr = console = open(os.dup(terminal), "w", buffering=1)  # noqa: SIM115 (closed below)
    shown = logging.StreamHandler(console)
    shown.addFilter(UserWarnings())
    for name in USER_LOGGERS:
        logging.getLogger(name).addHandler(shown)
    logging.captureWarnings(True)  # libraries' warnings: to the log, through the logging handlers
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for name in USER_LOGGERS:
            logging.getLogger(name).removeHandler(shown)
        sys.stderr = saved
        console.close()
        os.dup2(terminal, 2)
        os.close(terminal)


@contextmanager
def run_log(run_dir: UPath, verbose: bool) -> Iterator[str | None]:
    """The run's log file in its run directory (see internals_to); None with -v. A run directory
    in a bucket gets the log at the end of the run, written locally until then."""
    if verbose:
        yield None
        return
    if is_local(run_dir):
        path = Path(run_dir) / LOG_NAME
        with internals_to(path):
            yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="thresher-log-") as folder:
        path = Path(folder) / LOG_NAME
        try:
            with internals_to(path):
                yield f"{describe(run_dir / LOG_NAME)} (at the end of the run; until then {path})"
        finally:
            write_text(path.read_text(errors="replace"), run_dir / LOG_NAME)


def summary(counts: dict[str, int], run_dir: str) -> list[str]:
    """The lines a finished run ends with: what it kept, what it removed and why, where."""
    return [
        f"Done: {counts['n_input_files']} files, {counts['n_sampled']} selected. Removed: "
        f"{counts['n_corrupt']} corrupt, {counts['n_duplicate']} exact duplicates, "
        f"{counts['n_removed']} not selected (lists in filenames/, reasons in the report).",
        f"Results: {run_dir}",
    ]


def curate(config: ThresherConfig, verbose: bool) -> None:
    from flows.cluster import cluster_plan
    from flows.curate import frozen_modules, no_heartbeats, pipeline
    from flows.run import run_directory

    plan = cluster_plan(config)
    started = datetime.now(UTC)
    run_dir = run_directory(config, started)
    # The log is opened first: a temporary Prefect server, if the run needs one, writes to it.
    with run_log(run_dir, verbose) as log:
        if log:
            print(f"Log: {log}")  # printed first: it explains a run that fails
        with prefect_api() as ui, no_heartbeats(), frozen_modules():
            state = pipeline.with_options(task_runner=plan.task_runner())(config, plan, started, return_state=True)
            result = state.result()
    print("\n".join(summary(result, result["run_directory"])))
    if ui:
        print(f"The run in the Prefect UI: {ui}/runs/flow-run/{state.state_details.flow_run_id}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "server":
        from flows.server import server_status, stop_server

        print(stop_server() if args.action == "stop" else server_status())
        return 0
    try:
        config = config_from_overrides(args.overrides)
        if config.sanity_check:
            sanity_check(config)
        else:
            curate(config, args.verbose)
    except ConfigError as error:
        print(f"thresher: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, DatapoolError, StorageError) as error:  # OSError: a missing folder, a full disk
        print(f"thresher: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `thresher` command.

`thresher run` starts the server its Dask workers will fork from (flows/worker_server.py) before
it imports anything else: the server's imports (seconds) then overlap the command's own. A run on
an existing cluster (`dask.address=...`) has no workers of its own, so it starts none.
"""

from __future__ import annotations

import gc
import sys

from flows.worker_server import start_worker_server


def starts_own_workers(arguments: list[str]) -> bool:
    """Whether the command is a run on workers of its own: `run`, naming no scheduler. Overrides are
    read as flows/overrides.py reads them (spaces around a key do not count, the last of a key wins,
    an empty `dask.address` is a local cluster), but without its imports, which would hold up the
    server's start."""
    if arguments[:1] != ["run"]:
        return False
    address = ""
    for argument in arguments[1:]:
        key, sep, value = argument.partition("=")
        if sep and key.strip() == "dask.address":
            address = value
    return not address.strip().strip("'\"")  # '' and "" are YAML's empty strings


def entry() -> None:
    """`flows.cli.main`, then the process's end."""
    if starts_own_workers(sys.argv[1:]):
        start_worker_server()
    from flows.cli import main

    code = main()
    # The collector need not walk the run's millions of objects once more on the way out (a second
    # of every run's end; see flows/worker_setup.py). Not in `main`: a caller such as a test goes on.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()

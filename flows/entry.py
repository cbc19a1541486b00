"""The `thresher` command.

`thresher run` starts the server its Dask workers will fork from (flows/worker_server.py) before
it imports anything else: the server's imports (seconds) then overlap the command's own. A run on
an existing cluster (`dask.address=...`) has no workers of its own, so it starts none.
"""

from __future__ import annotations

import gc
import sys

from flows.worker_server import start_worker_server


def entry() -> None:
    """`flows.cli.main`, then the process's end."""
    arguments = sys.argv[1:]
    if arguments[:1] == ["run"] and not any(a.startswith("dask.address=") for a in arguments):
        start_worker_server()
    from flows.cli import main

    code = main()
    # The collector need not walk the run's millions of objects once more on the way out (a second
    # of every run's end; see flows/worker_setup.py). Not in `main`: a caller such as a test goes on.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()

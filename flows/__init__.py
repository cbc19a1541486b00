"""Thresher's flows and their command line.

Prefect reads these settings when it is first imported, so they are set here, before any flow
module imports it (explicit environment variables still win)."""

import os

# Our modules' log records reach the Prefect run logs (and the UI) as well as the terminal.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,flows")
# The stage functions also log outside flow runs (tests, sanity_check); that is not an error.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# The temporary server must not try to phone home: it has no network and dies on the error.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

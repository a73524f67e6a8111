"""The real-server helpers for tests/api; they live in tests/server_process.py, shared with tests/deploy."""

from server_process import (  # noqa: F401
    ROOT,
    START_TIMEOUT,
    RunningServer,
    Scrape,
    free_port,
    launch,
    scrape,
    sse_events,
    wait_idle,
)

"""Browser-test fixtures: Debian's Chromium driven by Playwright, and real servers on loopback.

Chromium comes from the distribution (install_browser.sh, `apt-get install chromium` when we are root);
Playwright never downloads a browser of its own. Where Chromium cannot be had, the tests are skipped with
the reason, and a warning repeats it in pytest's summary so the skip is never silent.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench.harness import RunningServer, launch

HERE = Path(__file__).resolve().parent

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # we run as root in a container; the sandbox refuses to start there
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
API_KEY = "ui-test-key"


def _skip(reason: str) -> None:
    warnings.warn(f"browser tests skipped: {reason}", pytest.PytestWarning, stacklevel=2)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        try:
            result = subprocess.run(
                ["bash", str(HERE / "install_browser.sh")], capture_output=True, text=True, timeout=900
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            _skip(f"{CHROMIUM} is missing and installing it failed: {exc}")
        if result.returncode != 0 or not CHROMIUM.exists():
            detail = " / ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            _skip(f"{CHROMIUM} is missing and could not be installed: {detail or result.returncode}")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator[Any]:
    """Per module, not per session: while Playwright's sync API is open it runs an event loop in the
    main thread, and every other test's asyncio.run() would fail until it closes."""
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _skip("the 'playwright' package is missing: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def ui_servers(
    long_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningServer]]:
    """`open`: no key, one sequence and one queue slot (easy to overload); `keyed`: needs API_KEY;
    `killed`: like `keyed`, for the one test that kills its server mid-reply (whatever runs after it).
    All three open the page in chat mode (`--ui-mode chat`): the test checkpoint is a base model, for
    which `auto` would open it in completion mode (test_ui_completion.py).

    Started side by side: each spends seconds importing torch, and they overlap.
    """
    chat = ("--ui-mode", "chat", "--threads", "1", "--enforce-eager")  # the page, not the decode path
    flags = {
        "open": ("--max-num-seqs", "1", "--max-waiting", "1", *chat),
        "keyed": ("--api-key", API_KEY, *chat),
        "killed": ("--api-key", API_KEY, *chat),
    }
    with ThreadPoolExecutor(len(flags)) as pool:
        futures = {
            name: pool.submit(launch, long_checkpoint, tmp_path_factory.mktemp(name) / "server.log", *args)
            for name, args in flags.items()
        }
        servers: dict[str, RunningServer] = {}
        failures = []
        for name, future in futures.items():
            try:
                servers[name] = future.result()
            except Exception as exc:
                failures.append(exc)
    if failures:  # one did not start: do not leave the others running
        for server in servers.values():
            server.stop()
        raise failures[0]
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def ui_api_key() -> str:
    return API_KEY


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (empty storage) per test; uncaught page errors fail the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 720}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"

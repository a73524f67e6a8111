"""Dependencies flow one way (server/api -> server/engine -> model; tests -> bench), and nothing unpickles.

Source files are parsed with `ast`, never imported, so the guard holds for files that do not import
cleanly yet and costs nothing. It covers `import x`, `from x import y`, relative imports, and
`importlib.import_module("x")` / `__import__("x")` with a constant name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ENGINE_FORBIDDEN = ("fastapi", "starlette", "pydantic", "sse_starlette", "prometheus_client", "server.api")
PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib")


@dataclass(frozen=True)
class Finding:
    line: int
    what: str  # a module name, or "torch.load"


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve_relative(module: str | None, level: int, path: Path, root: Path) -> str:
    name, is_package = _module_name(path, root)
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, module] if module else base)


def imports_and_loads(source: str, path: Path, root: Path) -> list[Finding]:
    """Modules `source` imports (absolute; `from a import b` gives a and a.b) and its torch.load calls."""
    tree = ast.parse(source, filename=str(path))
    found: list[Finding] = []
    torch_aliases = {"torch"}
    load_aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Finding(node.lineno, alias.name))
                if alias.name == "torch":
                    torch_aliases.add(alias.asname or "torch")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(node.module, node.level, path, root)
            found.append(Finding(node.lineno, base))
            for alias in node.names:
                found.append(Finding(node.lineno, f"{base}.{alias.name}" if base else alias.name))
                if base in ("torch", "torch.serialization") and alias.name == "load":
                    load_aliases.add(alias.asname or "load")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "load":
            owner = func.value
            on_torch = isinstance(owner, ast.Name) and owner.id in torch_aliases
            on_serialization = isinstance(owner, ast.Attribute) and owner.attr == "serialization"
            if on_torch or on_serialization:
                found.append(Finding(node.lineno, "torch.load"))
        elif isinstance(func, ast.Name) and func.id in load_aliases:
            found.append(Finding(node.lineno, "torch.load"))
        dynamic = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
            isinstance(func, ast.Name) and func.id in ("__import__", "import_module")
        )
        if (
            dynamic
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Finding(node.lineno, node.args[0].value))
    return found


def _matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(path: Path, root: Path) -> list[str]:
    rel = path.relative_to(root).as_posix()
    rules: list[tuple[tuple[str, ...], str]] = [(PICKLE_MODULES, "no pickle under server/ and model/")]
    if rel.startswith("model/"):
        rules.append((("server",), "model/ must not import server"))
    if rel.startswith("server/engine/"):
        rules.append((ENGINE_FORBIDDEN, "server/engine/ must not import HTTP, schema or metrics libraries"))
    if rel.startswith("bench/"):
        rules.append((("tests",), "bench/ must not import tests (tests import bench's harness)"))
    out = []
    for finding in imports_and_loads(path.read_text(encoding="utf-8"), path, root):
        if finding.what == "torch.load":
            out.append(f"{rel}:{finding.line}: calls torch.load (no pickle: use safetensors)")
        for prefixes, rule in rules:
            if _matches(finding.what, prefixes):
                out.append(f"{rel}:{finding.line}: imports {finding.what} ({rule})")
    return out


def sources(root: Path) -> list[Path]:
    return sorted(
        p
        for top in ("model", "server", "bench")
        for p in (root / top).rglob("*.py")
        if ".venv" not in p.parts
    )


def test_import_direction_and_no_pickle() -> None:
    files = sources(ROOT)
    # Not vacuous: the scan must see the model package that exists from the start.
    assert ROOT / "model" / "transformer.py" in files and ROOT / "model" / "checkpoint.py" in files
    assert ROOT / "bench" / "harness.py" in files
    problems = [v for path in files for v in violations(path, ROOT)]
    assert not problems, "\n".join(problems)


# The checker itself must catch what it is meant to catch.
BAD_SOURCES: list[tuple[str, str, str]] = [
    ("model/a.py", "import server.engine.runner", "imports server.engine.runner"),
    ("model/a.py", "from server import settings", "imports server"),
    ("model/sub/a.py", "from ...server import x", "imports server"),
    ("server/engine/a.py", "import fastapi", "imports fastapi"),
    ("server/engine/a.py", "from starlette.responses import Response", "imports starlette.responses"),
    ("server/engine/a.py", "from pydantic import BaseModel", "imports pydantic"),
    ("server/engine/a.py", "import sse_starlette.sse as s", "imports sse_starlette.sse"),
    ("server/engine/a.py", "from prometheus_client import Counter", "imports prometheus_client"),
    ("server/engine/a.py", "from server.api.schemas import X", "imports server.api"),
    ("server/engine/a.py", "from server import api", "imports server.api"),
    ("server/engine/a.py", "from ..api import schemas", "imports server.api"),
    ("server/engine/sub/a.py", "from ...api.errors import E", "imports server.api.errors"),
    ("server/engine/a.py", "import importlib\nm = importlib.import_module('fastapi')", "imports fastapi"),
    ("server/engine/a.py", "def f():\n    import pydantic", "imports pydantic"),
    ("server/api/a.py", "import pickle", "imports pickle"),
    ("model/a.py", "from pickle import loads", "imports pickle"),
    ("model/a.py", "import _pickle as p", "imports _pickle"),
    ("model/a.py", "import torch\nsd = torch.load('x.pt')", "calls torch.load"),
    ("model/a.py", "import torch as T\nsd = T.load(f, weights_only=True)", "calls torch.load"),
    ("model/a.py", "from torch import load\nsd = load(f)", "calls torch.load"),
    ("server/a.py", "import torch\nsd = torch.serialization.load(f)", "calls torch.load"),
    ("bench/a.py", "from tests.support import wait_idle", "imports tests.support"),
    ("bench/serve/a.py", "import tests", "imports tests"),
]

GOOD_SOURCES: list[tuple[str, str]] = [
    ("model/a.py", "import torch\nfrom safetensors.torch import load_file\nx = load_file('m.safetensors')"),
    ("model/a.py", "import json\ndata = json.load(open('config.json'))"),
    ("server/engine/a.py", "from server.engine import scheduler\nfrom model.transformer import Transformer"),
    ("server/engine/a.py", "from . import sampler\nfrom .kv_cache import KVCache"),
    ("server/api/a.py", "import fastapi\nfrom pydantic import BaseModel\nfrom server.engine import engine"),
    ("server/metrics.py", "import prometheus_client"),
    ("model/a.py", "import serverless_helpers"),
    ("bench/a.py", "from bench.harness import launch\nfrom server.settings import parse_settings"),
]


@pytest.mark.parametrize(("rel", "source", "expected"), BAD_SOURCES)
def test_checker_flags_forbidden_source(rel: str, source: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    problems = violations(path, tmp_path)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(("rel", "source"), GOOD_SOURCES)
def test_checker_allows_permitted_source(rel: str, source: str, tmp_path: Path) -> None:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert violations(path, tmp_path) == []

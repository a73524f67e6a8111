"""Our CPU kernels: C++ in `model/csrc/`, built at first use for the machine that runs them.

They serve our own ops (`tinyserve::paged_decode_attention` in `model/attention.py`; `tinyserve::linear`,
`tinyserve::pack_linear` and `tinyserve::packed_linear` in `model/linear.py`; `tinyserve::linear_int8` in
`model/quantization.py`).
Each op has a plain PyTorch body for every device; the kernels register the CPU implementation,
which the dispatcher then prefers. Where they cannot be built (no C++ compiler), the plain bodies
serve, with the same results, more slowly.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("model.kernels")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(str(p) for p in _CSRC.glob("*.cpp"))
_lock = threading.Lock()
_loaded: list[bool] = []


def load_cpu_kernels() -> bool:
    """Build (once per machine; cached in torch's extensions folder) and load the kernels.

    Returns False, after one warning that says why, when they cannot be built.
    """
    import model.attention  # noqa: F401 - the ops' schemas, before their CPU kernels register
    import model.linear  # noqa: F401
    import model.quantization  # noqa: F401

    with _lock:
        if not _loaded:
            try:
                _build_and_load()
                _loaded.append(True)
            except Exception as exc:  # no compiler, no headers: the plain bodies serve
                log.warning("CPU kernels unavailable (%s); using plain PyTorch bodies", exc)
                _loaded.append(False)
        return _loaded[0]


def kernel_build_directory() -> Path:
    """Where the kernels are built: torch's extensions folder (TORCH_EXTENSIONS_DIR overrides it), one
    folder per checkout. The build names its sources by path, so two checkouts sharing a folder would
    each rebuild (and wait on each other) every time the other had built."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    checkout = hashlib.sha256(str(_CSRC.resolve()).encode()).hexdigest()[:12]
    return Path(base) / f"tinyserve_cpu_kernels-{checkout}"


def _build_and_load() -> None:
    """Build under an OS file lock, which the kernel drops when its holder dies.

    torch's own build lock is a file that outlives a builder killed mid-build (a server stopped
    during its first start), after which every later build waits for it forever. Holding ours, no
    one else can be building, so a leftover torch lock is stale and is removed.
    """
    from torch.utils.cpp_extension import load

    build_directory = kernel_build_directory()
    build_directory.mkdir(parents=True, exist_ok=True)
    with build_directory.with_suffix(".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building the CPU kernels")
            fcntl.flock(lock, fcntl.LOCK_EX)
        (build_directory / "lock").unlink(missing_ok=True)
        load(
            name="tinyserve_cpu_kernels",
            sources=_SOURCES,
            build_directory=str(build_directory),
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )

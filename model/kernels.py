"""Our CPU kernels: C++ in `model/csrc/`, built at first use for the machine that runs them.

They serve three ops of our own (`tinyserve::paged_decode_attention` in `model/attention.py`,
`tinyserve::linear` in `model/linear.py`, `tinyserve::linear_int8` in `model/quantization.py`).
Each op has a plain PyTorch body for every device; the kernels register the CPU implementation,
which the dispatcher then prefers. Where they cannot be built (no C++ compiler), the plain bodies
serve, with the same results, more slowly.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

log = logging.getLogger("model.kernels")

_SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))
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
                from torch.utils.cpp_extension import load

                load(
                    name="tinyserve_cpu_kernels",
                    sources=_SOURCES,
                    extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
                    is_python_module=False,
                    verbose=False,
                )
                _loaded.append(True)
            except Exception as exc:  # no compiler, no headers: the plain bodies serve
                log.warning("CPU kernels unavailable (%s); using plain PyTorch bodies", exc)
                _loaded.append(False)
        return _loaded[0]

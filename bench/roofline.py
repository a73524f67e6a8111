"""The machine's roofline for one decode step: measured bandwidth and matmul rate, model bytes and FLOPs.

A decode step must at least stream every weight once (plus each sequence's keys and values) and do
2 FLOPs per weight per row. With the machine's measured weight-streaming bandwidth and matmul rate
that gives a floor on the step time no engine can beat, so "ours / roofline" says how much is left to
win. Everything is measured with torch on this machine at the model's shapes: the matmul rate in the
model's dtype, the bandwidth in float32 (see measure_read_bandwidth and `Machine.bandwidth_gbs`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up: the least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class Machine:
    """What torch achieves here: GB/s streaming weights and copying a buffer past the caches, GFLOP/s."""

    read_gbs: float
    """Weight streaming: float32 matrix-vector products over the model's shapes, far past the LLC."""
    sum_gbs: float
    """A plain read of the same weights (torch's sum over each), far past the LLC."""
    copy_gbs: float
    """A float32 copy counted as read + write: context only, a decode step's bytes are reads."""
    streamed_bytes: int
    llc_bytes: int | None
    """The last-level cache, from sysfs (None where it is not exposed)."""
    matmul_gflops: float
    """FLOP-weighted rate of torch.mm at the model's weight shapes with many rows (compute-bound)."""
    matmul_gflops_by_shape: dict[str, float]
    matmul_rows: int
    dtype: str
    threads: int

    @property
    def bandwidth_gbs(self) -> float:
        """The roofline's bandwidth: the faster of the two reads of the weights. torch's one-row product
        was once the faster kernel a decode step could use here; our packed kernels now stream 2-3x
        faster than it, near what a plain sum reads (2026-12-01: 25-36 GB/s against the sum's 31-49)."""
        return max(self.read_gbs, self.sum_gbs)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "bandwidth_gbs": self.bandwidth_gbs}


def last_level_cache_bytes(cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the highest-level data or unified cache cpu0 sees, from sysfs ("32768K", "36M")."""
    best: tuple[int, int] | None = None
    for index in cpu.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
        num = int(size.rstrip("KMGkmg")) * scale
        best = max(best or (level, num), (level, num))
    return best and best[1]


def stream_weights(shapes: list[tuple[int, int]], num_bytes: int) -> list[Tensor]:
    """float32 matrices cycling through a step's `shapes` until they hold `num_bytes`: no reuse."""
    weights: list[Tensor] = []
    total = 0
    while total < num_bytes:
        for shape in shapes:
            weights.append(torch.ones(shape))  # ones, not empty: the pages must really exist
            total += weights[-1].nbytes
    return weights


def measure_read_bandwidth(
    shapes: list[tuple[int, int]], llc_bytes: int | None, repeats: int = 5
) -> tuple[float, float, int]:
    """GB/s of one-row F.linear, and of a plain sum, over float32 weights of the model's shapes, 512 MiB
    or 8x the LLC; and the bytes streamed.

    float32 whatever the model's dtype: torch's bf16 matrix-vector kernel is compute-bound on some CPUs
    (0.3 GB/s measured on an AVX2 box), so in bf16 it would time the kernel, not the memory; the bytes
    per step still count the model's dtype.
    """
    weights = stream_weights(shapes, max(512 << 20, 8 * (llc_bytes or 0)))
    xs = {w.shape[1]: torch.ones(1, w.shape[1]) for w in weights}

    def product() -> None:
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    def read() -> None:
        for w in weights:
            w.sum()

    with torch.inference_mode():
        num_bytes = sum(w.nbytes for w in weights)
        return (
            num_bytes / _best_seconds(product, repeats) / 1e9,
            num_bytes / _best_seconds(read, repeats) / 1e9,
            num_bytes,
        )


def measure_copy_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Copy GB/s counting read + write over `num_bytes` float32 buffers."""
    src = torch.ones(num_bytes // 4)
    dst = torch.zeros_like(src)
    return 2 * num_bytes / _best_seconds(lambda: dst.copy_(src), repeats) / 1e9


def linear_weights(model: nn.Module) -> list[Tensor]:
    """Every matmul weight a decode step reads, in execution order (layers, then lm_head)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def measure_matmul(
    weights: list[Tensor], rows: int = 512, repeats: int = 3
) -> tuple[float, dict[str, float]]:
    """torch.mm rate at each distinct weight shape with `rows` rows; FLOP-weighted total in GFLOP/s."""
    first: dict[tuple[int, int], Tensor] = {}
    counts: dict[tuple[int, int], int] = {}
    for w in weights:
        key = (w.shape[0], w.shape[1])
        first.setdefault(key, w)
        counts[key] = counts.get(key, 0) + 1
    by_shape: dict[str, float] = {}
    flops_total = seconds_total = 0.0
    for (out, inp), n in counts.items():
        w = first[(out, inp)]
        x = torch.randn(rows, inp, dtype=w.dtype)
        with torch.inference_mode():
            seconds = _best_seconds(lambda x=x, w=w: torch.mm(x, w.t()), repeats)
        flops = 2.0 * rows * out * inp
        by_shape[f"{rows}x{inp} @ {inp}x{out}"] = flops / seconds / 1e9
        flops_total += n * flops
        seconds_total += n * seconds
    return flops_total / seconds_total / 1e9, by_shape


def measure_machine(weights: list[Tensor], threads: int, rows: int = 512) -> Machine:
    llc = last_level_cache_bytes()
    read, summed, streamed = measure_read_bandwidth([(w.shape[0], w.shape[1]) for w in weights], llc)
    copy = measure_copy_bandwidth()
    rate, by_shape = measure_matmul(weights, rows)
    dtype = str(weights[0].dtype).removeprefix("torch.")
    return Machine(read, summed, copy, streamed, llc, rate, by_shape, rows, dtype, threads)


def matmul_step_seconds(weights: list[Tensor], batch: int, repeats: int = 3) -> float:
    """Time of just the step's matmuls at `batch` rows, each weight once (the eager torch.mm floor)."""
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}

    def step() -> None:
        for w in weights:
            torch.mm(xs[w.shape[1]], w.t())

    with torch.inference_mode():
        return _best_seconds(step, repeats)


@dataclass(frozen=True)
class StepCost:
    """Bytes and FLOPs of one decode step of `batch` sequences at context length `context`."""

    weight_bytes: float
    kv_bytes: float
    flops: float


def step_cost(
    config: ModelConfig,
    element_size: int,
    batch: int,
    context: float,
    weight_element_size: float | None = None,
) -> StepCost:
    """Weights (every linear layer, lm_head and the norms) read once; each row reads its cache.

    `weight_element_size` is the linear weights' bytes each where they are stored otherwise than the
    activations (1 for int8; default: `element_size`)."""
    h, d, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    linear = layers * per_layer + config.vocab_size * h
    norms = (2 * layers + 1) * h
    kv_per_token = 2 * layers * kv * element_size
    attention_flops = layers * 4 * q * context  # q.k and p.v over the context, per row
    return StepCost(
        weight_bytes=linear * (weight_element_size or element_size) + norms * element_size,
        kv_bytes=batch * (context + 1) * kv_per_token,  # read the context, write the new token
        flops=batch * (2.0 * linear + attention_flops),
    )


@dataclass(frozen=True)
class Roofline:
    step_ms: float
    tokens_per_s: float
    bound: str
    """"memory" or "compute": which term sets the floor."""
    weight_ms: float
    kv_ms: float
    compute_ms: float


def roofline(cost: StepCost, machine: Machine, batch: int) -> Roofline:
    """max(weights / bandwidth + KV / bandwidth, FLOPs / matmul rate), and the tokens/s it allows."""
    bandwidth = machine.bandwidth_gbs * 1e9
    weight_ms = cost.weight_bytes / bandwidth * 1e3
    kv_ms = cost.kv_bytes / bandwidth * 1e3
    compute_ms = cost.flops / (machine.matmul_gflops * 1e9) * 1e3
    memory_ms = weight_ms + kv_ms
    step_ms = max(memory_ms, compute_ms)
    bound = "memory" if memory_ms >= compute_ms else "compute"
    return Roofline(step_ms, batch / step_ms * 1e3, bound, weight_ms, kv_ms, compute_ms)

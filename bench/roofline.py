"""The machine's roofline for one decode step: measured bandwidth and matmul rate, model bytes and FLOPs.

A decode step must at least stream every weight once (plus each sequence's keys and values) and do
2 FLOPs per weight per row. With the machine's measured memory bandwidth and matmul rate that gives
a floor on the step time no engine can beat, so "ours / roofline" says how much is left to win.
Everything is measured with torch on this machine, in the model's dtype, at the model's shapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
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
    """What torch achieves here: GB/s reading and copying a buffer far larger than the caches, GFLOP/s."""

    read_gbs: float
    copy_gbs: float
    matmul_gflops: float
    """FLOP-weighted rate of torch.mm at the model's weight shapes with many rows (compute-bound)."""
    matmul_gflops_by_shape: dict[str, float]
    matmul_rows: int
    dtype: str
    threads: int

    @property
    def bandwidth_gbs(self) -> float:
        """The best measured rate: a roofline is an optimistic bound."""
        return max(self.read_gbs, self.copy_gbs)

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "bandwidth_gbs": self.bandwidth_gbs}


def measure_bandwidth(num_bytes: int = 512 << 20, repeats: int = 5) -> tuple[float, float]:
    """(read GB/s of a float32 sum, copy GB/s counting read + write) over `num_bytes` buffers."""
    src = torch.ones(num_bytes // 4)  # ones, not empty: the pages must really exist
    dst = torch.zeros_like(src)
    read = _best_seconds(src.sum, repeats)
    copy = _best_seconds(lambda: dst.copy_(src), repeats)
    return num_bytes / read / 1e9, 2 * num_bytes / copy / 1e9


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
    read, copy = measure_bandwidth()
    rate, by_shape = measure_matmul(weights, rows)
    return Machine(read, copy, rate, by_shape, rows, str(weights[0].dtype).removeprefix("torch."), threads)


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


def step_cost(config: ModelConfig, element_size: int, batch: int, context: float) -> StepCost:
    """Weights (every linear layer, lm_head and the norms) read once; each row reads its cache."""
    h, d, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    linear = layers * per_layer + config.vocab_size * h
    norms = (2 * layers + 1) * h
    kv_per_token = 2 * layers * kv * element_size
    attention_flops = layers * 4 * q * context  # q.k and p.v over the context, per row
    return StepCost(
        weight_bytes=(linear + norms) * element_size,
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

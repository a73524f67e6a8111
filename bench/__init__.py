"""Benchmarks, run from the repository root as modules (`python -m bench.serve`, `python -m bench.engine`).

`bench.harness` holds what the benchmarks and the tests share: starting a real server, free ports,
resident memory, percentiles and /metrics parsing.
"""

"""The serving benchmark, `python -m bench.serve` (flags and method in cli.py's docstring).

load.py generates requests and times their streams, stats.py turns them into one row per level,
launch.py starts the servers under test, report.py and plots.py write what a run found.
"""

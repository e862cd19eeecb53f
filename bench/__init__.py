"""ktfed benchmarks: `python -m bench [NAMES...] [--quick]` (see bench/README.md).

Benchmarks print tables and write bench/results/<name>.json (and .png); they never assert on time.
"""
BENCHMARKS = ("overhead", "bytes", "waffle", "waffle_grid", "secagg", "dp", "audit", "distill", "vln", "vln_fed", "load", "scale", "fuzz", "soak")

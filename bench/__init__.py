"""Throughput benchmarks (installed as gpu_momentum.bench; `python -m bench` in a checkout)."""

"""Methods × seeds × datasets studies (``anomorph benchmark``) and the one-command demo."""
from .runner import BenchmarkConfig, load_benchmark_config, run_benchmark

__all__ = ["BenchmarkConfig", "load_benchmark_config", "run_benchmark"]

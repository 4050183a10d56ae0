"""Shared by the benchmarks: one CPU thread for every framework (set on import, before jax or
torch is imported), medians, the conflicting test matrices, writing a table."""

from __future__ import annotations

import os
import statistics
import time

# One thread for CPU comparisons (these flags only touch the CPU client; on a GPU machine the
# host side of TorchJD's projector runs on one thread too, as a user's would by default there).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    " intra_op_parallelism_threads=1"
)
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402


def median_time(fn, repeats, min_total=0.2):
    """Median wall time of ``fn()`` after one warm-up call (compilation excluded)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_total and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def median_times(fns, repeats=15, min_total=0.5):
    """Medians of several functions timed round-robin (one call of each per round, after one
    warm-up each), so that a slow patch of the machine hits them all alike: the ratios between
    them are steadier than those of separate ``median_time`` runs."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_total and rounds < 200):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def conflicting(m, n, seed=0):
    """Gaussian rows sharing a direction with random signs: many conflicting pairs."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n)
    return rng.standard_normal((m, n)) + rng.choice([-1.5, 1.0], size=(m, 1)) * base


def device_name():
    """Which device the numbers come from, in words."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return "CPU, one thread"
    return f"{dev.platform.upper()} {getattr(dev, 'device_kind', '')}".strip()


def torch_device():
    """'cuda' when JAX runs on a GPU and torch sees one, else 'cpu'."""
    import jax

    if jax.default_backend() == "gpu":
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def emit(lines, row):
    print(row, flush=True)
    lines.append(row)


def write_table(lines, out):
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as fh:
            fh.write("\n".join(lines) + "\n")

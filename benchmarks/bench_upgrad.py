"""UPGrad speed: jaxjd (each solver) vs the floor (J J^T and J^T w alone) vs TorchJD 0.18.

One thread for both frameworks (set by _common, before importing either), medians over repeats,
ratios taken in the same run. TorchJD is optional:
pip install torch==2.13.0 "torchjd[full]==0.18.0".

    python benchmarks/bench_upgrad.py [--quick] [--sizes 64x1000,...]
        [--out benchmarks/results/upgrad.md]
"""

from __future__ import annotations

import argparse

import _common  # noqa: F401  (one thread: must come before jax and torch)
import jax
import jax.numpy as jnp
from _common import conflicting, emit, median_time, median_times, write_table

import jaxjd as jd

SIZES = [
    (2, 10),
    (5, 50),
    (10, 100),
    (20, 500),
    (32, 1000),
    (64, 1000),
    (128, 10000),
    (8, 1_000_000),
    (32, 100_000),
    (256, 1000),
]


def torchjd_fn(a, dtype):
    try:
        import torch
        from torchjd.aggregation import UPGrad
    except ImportError:
        return None
    torch.set_num_threads(1)
    t = torch.tensor(a, dtype=torch.float64 if dtype == "float64" else torch.float32)
    agg = UPGrad()
    return lambda: agg(t)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--solvers", default="bpp,nesterov_pgd")
    parser.add_argument("--sizes", default=None, help="e.g. 64x1000,128x10000")
    args = parser.parse_args()
    sizes = SIZES[:5] if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    solvers = args.solvers.split(",")
    lines = [
        f"jax {jax.__version__}, one CPU thread, medians. Conflicting Gaussian Jacobians. "
        "floor = jit(gramian + combine with fixed weights); ratios are time / floor and "
        "TorchJD time / jaxjd bpp time.",
        "",
        "| dtype | m | n | floor ms | "
        + " | ".join(f"{s} ms" for s in solvers)
        + " | bpp / floor | TorchJD ms | TorchJD / bpp |",
        "|---|---|---|---|" + "---|" * len(solvers) + "---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for dtype in args.dtypes.split(","):
        with jax.enable_x64(dtype == "float64"):
            for m, n in sizes:
                a = conflicting(m, n).astype(dtype)
                J = jnp.asarray(a)
                w = jnp.full((m,), 1.0 / m, J.dtype)
                floor = jax.jit(lambda J: (jd.gramian(J), jd.combine(w, J)))
                fns = {"floor": lambda: jax.block_until_ready(floor(J))}
                for s in solvers:
                    f = jax.jit(jd.upgrad(solver=s))
                    fns[s] = lambda f=f: f(J).block_until_ready()
                # Each solver round-robin with the floor (a slow patch of the machine hits both
                # alike), but apart from the other solvers and from TorchJD: interleaving a much
                # slower function (nesterov_pgd is 20x bpp in float64 at m = 64) was measured to
                # slow the fast one down by ~70% (cache and thread-pool state).
                times, floors = {}, []
                for s in solvers:
                    pair = median_times(
                        {"floor": fns["floor"], s: fns[s]}, repeats=3 if m >= 256 else 7
                    )
                    times[s] = pair[s]
                    floors.append(pair["floor"])
                t_floor = min(floors)
                tj = torchjd_fn(a, dtype)
                t_torch = median_time(tj, 3) if tj is not None else float("nan")
                row = (
                    f"| {dtype} | {m} | {n} | {t_floor * 1e3:.3f} | "
                    + " | ".join(f"{times[s] * 1e3:.3f}" for s in solvers)
                    + f" | {times['bpp'] / t_floor:.2f} | {t_torch * 1e3:.2f} | "
                    f"{t_torch / times['bpp']:.1f} |"
                )
                emit(lines, row)
    write_table(lines, args.out)


if __name__ == "__main__":
    main()

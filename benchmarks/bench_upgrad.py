"""UPGrad speed over matrix families: jaxjd's solvers vs the floor (J J^T and J^T w alone) vs
TorchJD 0.18, median and worst case per size, ratios taken in the same run.

Runs unchanged on any JAX backend; on the CPU with one thread for both frameworks (set by
_common before either is imported). On a GPU TorchJD's tensors live on the GPU (its quadprog
projector still solves on the host). TorchJD is optional:
pip install torch==2.13.0 "torchjd[full]==0.18.0".

    python benchmarks/bench_upgrad.py [--quick] [--sizes 64x1000,...] [--dtypes float32]
        [--solvers auto,bpp_gather,nesterov_pgd,qpax] [--torchjd-max-m 256]
        [--out benchmarks/results/upgrad.md]

A solver name is a ``jd.solvers`` alias (``qpax``: the interior point and its crossover, needs
the ``qpax`` extra), or ``bpp_gather`` / ``bpp_dense`` for BPP with its pending-lane gather on or
off. Families: ``jaxjd._families`` (the conflicting family with three
seeds). ``worst / median`` is the spread of the first solver's times over the family matrices.
"""

from __future__ import annotations

import argparse
import statistics

import _common  # noqa: F401  (one thread: must come before jax and torch)
import jax
import jax.numpy as jnp
from _common import device_name, emit, median_time, median_times, torch_device, write_table

import jaxjd as jd
from jaxjd._families import family_matrices

SIZES = [(5, 50), (20, 500), (32, 1000), (64, 1000), (128, 10000), (256, 1000), (8, 1_000_000)]


def solver_of(name):
    if name == "bpp_gather":
        return jd.solvers.BPP(gather=True)
    if name == "bpp_dense":
        return jd.solvers.BPP(gather=False)
    return jd.solvers.as_solver(name)


def torchjd_fn(a, dtype):
    try:
        import torch
        from torchjd.aggregation import UPGrad
    except ImportError:
        return None
    torch.set_num_threads(1)
    dev = torch_device()
    t = torch.tensor(a, dtype=torch.float64 if dtype == "float64" else torch.float32, device=dev)
    agg = UPGrad()
    if dev == "cuda":
        return lambda: (agg(t), torch.cuda.synchronize())
    return lambda: agg(t)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--solvers", default="auto,nesterov_pgd")
    parser.add_argument("--sizes", default=None, help="e.g. 64x1000,128x10000")
    parser.add_argument("--torchjd-max-m", type=int, default=1024)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the conflicting family")
    args = parser.parse_args()
    sizes = SIZES[:4] if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    solvers = args.solvers.split(",")
    first = solvers[0]
    lines = [
        f"jax {jax.__version__}, {device_name()}. Medians per matrix over 7 families "
        f"({args.seeds} seeds of the conflicting one); per size the median and the worst over "
        "the matrices. floor = jit(gramian + combine with fixed weights). Ratios: time / floor "
        f"and TorchJD time / jaxjd time, per matrix in the same run, then median / worst. "
        f"'{first}' is the first solver.",
        "",
        "| dtype | m | n | floor ms | "
        + " | ".join(f"{s} ms median / worst" for s in solvers)
        + f" | {first} worst / median | {first} / floor worst | TorchJD ms median / worst"
        f" | TorchJD / {first} worst (lowest ratio) | all converged |",
        "|---|---|---|---|" + "---|" * len(solvers) + "---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for dtype in args.dtypes.split(","):
        with jax.enable_x64(dtype == "float64"):
            for m, n in sizes:
                per = {s: [] for s in solvers}
                floors, torch_times, ratios_floor, ratios_torch = [], [], [], []
                converged = True
                aggs = {s: jax.jit(jd.upgrad(solver=solver_of(s))) for s in solvers}
                check = jax.jit(jd.upgrad_weighting(solver=solver_of(first)).solve)
                floor = jax.jit(lambda J, w: (jd.gramian(J), jd.combine(w, J)))
                for _name, _seed, a in family_matrices(m, n, tuple(range(args.seeds))):
                    J = jnp.asarray(a.astype(dtype))
                    w = jnp.full((m,), 1.0 / m, J.dtype)
                    fns = {"floor": lambda: jax.block_until_ready(floor(J, w))}
                    converged &= bool(check(jd.gramian(J))[1].converged.all())
                    times, fl = {}, []
                    for s in solvers:
                        # Each solver round-robin with the floor, apart from the others (a
                        # much slower neighbour was measured to slow the fast one by ~70%).
                        pair = median_times(
                            {"floor": fns["floor"], s: lambda f=aggs[s]: f(J).block_until_ready()},
                            repeats=3 if m >= 256 else 7,
                            min_total=0.2,
                        )
                        times[s] = pair[s]
                        fl.append(pair["floor"])
                    t_floor = min(fl)
                    floors.append(t_floor)
                    for s in solvers:
                        per[s].append(times[s])
                    ratios_floor.append(times[first] / t_floor)
                    if m <= args.torchjd_max_m:
                        tj = torchjd_fn(a, dtype)
                        if tj is not None:
                            t_torch = median_time(tj, 1 if m >= 128 else 3, min_total=0.0)
                            torch_times.append(t_torch)
                            ratios_torch.append(t_torch / times[first])
                med = {s: statistics.median(per[s]) for s in solvers}
                worst = {s: max(per[s]) for s in solvers}
                if torch_times:
                    tj_txt = (
                        f"{statistics.median(torch_times) * 1e3:.2f} / {max(torch_times) * 1e3:.2f}"
                    )
                    tj_ratio = f"{min(ratios_torch):.1f}"
                else:
                    why = "m > --torchjd-max-m" if m > args.torchjd_max_m else "not installed"
                    tj_txt, tj_ratio = f"not run ({why})", "-"
                row = (
                    f"| {dtype} | {m} | {n} | {statistics.median(floors) * 1e3:.3f} | "
                    + " | ".join(f"{med[s] * 1e3:.3f} / {worst[s] * 1e3:.3f}" for s in solvers)
                    + f" | {worst[first] / med[first]:.2f} | {max(ratios_floor):.2f} | {tj_txt}"
                    f" | {tj_ratio} | {converged} |"
                )
                emit(lines, row)
    write_table(lines, args.out)


if __name__ == "__main__":
    main()

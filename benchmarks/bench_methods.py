"""Every aggregator: jaxjd vs TorchJD 0.18 (when installed) vs the floor, one CPU thread.

The floor is what any Gramian method must do anyway: form ``J J^T`` and ``J^T w`` (jit). Stateful
methods are timed on ``update(J, state)`` with a fixed state (jit); TorchJD's objects are called
repeatedly (their state evolves, which does not change their cost). Medians, ratios taken in the
same run.

    python benchmarks/bench_methods.py [--quick] [--dtype float32] [--methods upgrad,nash_mtl]
        [--out benchmarks/results/methods.md]
"""

from __future__ import annotations

import argparse
import warnings

import _common  # noqa: F401  (one thread: must come before jax and torch)
import jax
import jax.numpy as jnp
import numpy as np
from _common import conflicting, emit, median_time, write_table

import jaxjd as jd

SIZES = [(2, 10), (5, 50), (10, 100), (20, 500), (32, 1000), (64, 1000), (128, 10000)]

# name -> (jaxjd builder(m), TorchJD builder(m, torchjd.aggregation, torch), kind)
# kind: "agg" (stateless aggregator on J), "stateful" (aggregator with init/update),
# "cross" (weighting of a cross Gramian, state).
METHODS = {
    "upgrad": (lambda m: jd.upgrad(), lambda m, a, t: a.UPGrad(), "agg"),
    "dualproj": (lambda m: jd.dualproj(), lambda m, a, t: a.DualProj(), "agg"),
    "mgda": (lambda m: jd.mgda(), lambda m, a, t: a.MGDA(), "agg"),
    "mean": (lambda m: jd.mean(), lambda m, a, t: a.Mean(), "agg"),
    "sum": (lambda m: jd.sum_rows(), lambda m, a, t: a.Sum(), "agg"),
    "constant": (
        lambda m: jd.constant(weights=np.linspace(-1, 2, m)),
        lambda m, a, t: a.Constant(t.linspace(-1, 2, m)),
        "agg",
    ),
    "random": (lambda m: jd.rlw(), lambda m, a, t: a.Random(), "agg"),
    "imtl_g": (lambda m: jd.imtl_g(), lambda m, a, t: a.IMTLG(), "agg"),
    "aligned_mtl": (lambda m: jd.aligned_mtl(), lambda m, a, t: a.AlignedMTL(), "agg"),
    "config": (lambda m: jd.config(), lambda m, a, t: a.ConFIG(), "agg"),
    "krum": (lambda m: jd.krum(n_byzantine=1), lambda m, a, t: a.Krum(n_byzantine=1), "agg"),
    "trimmed_mean": (
        lambda m: jd.trimmed_mean(trim_number=1),
        lambda m, a, t: a.TrimmedMean(trim_number=1),
        "agg",
    ),
    "pcgrad": (lambda m: jd.pcgrad(), lambda m, a, t: a.PCGrad(), "agg"),
    "graddrop": (lambda m: jd.graddrop(), lambda m, a, t: a.GradDrop(), "agg"),
    "fairgrad": (lambda m: jd.fairgrad(alpha=1.0), lambda m, a, t: a.FairGrad(alpha=1.0), "agg"),
    "cagrad": (lambda m: jd.cagrad(c=0.5), lambda m, a, t: a.CAGrad(c=0.5), "agg"),
    "gradvac": (lambda m: jd.gradvac(), lambda m, a, t: a.GradVac(), "stateful"),
    "pcd": (lambda m: jd.pcd(), lambda m, a, t: a.PCD(), "stateful"),
    "nash_mtl": (lambda m: jd.nash_mtl(), lambda m, a, t: a.NashMTL(n_tasks=m), "stateful"),
    "excess_mtl": (lambda m: jd.excess_mtl(), lambda m, a, t: a.ExcessMTL(), "stateful"),
    "crmogm_upgrad": (
        lambda m: jd.crmogm_weighting(jd.upgrad_weighting()),
        lambda m, a, t: a.GramianWeightedAggregator(a.CRMOGMWeighting(a.UPGradWeighting())),
        "gramian_stateful",
    ),
    "modo": (lambda m: jd.modo_weighting(), lambda m, a, t: a.MoDoWeighting(), "cross"),
    "sdmgrad": (lambda m: jd.sdmgrad_weighting(), lambda m, a, t: a.SDMGradWeighting(), "cross"),
}


def jaxjd_fn(name, m, J):
    build, _, kind = METHODS[name]
    obj = build(m)
    key = jax.random.key(0)
    if kind == "agg":
        f = jax.jit(lambda J, k: obj(J, key=k))
        return lambda: f(J, key).block_until_ready()
    if kind == "stateful":
        state = obj.init(J)
        f = jax.jit(lambda J, s, k: obj.update(J, s, key=k)[0])
        return lambda: f(J, state, key).block_until_ready()
    state = obj.init(m, J.dtype)
    if kind == "gramian_stateful":
        f = jax.jit(lambda J, s: jd.combine(obj.update(jd.gramian(J), s)[0], J))
        return lambda: f(J, state).block_until_ready()
    G = jd.gramian(J)  # "cross": the weighting of an m x m matrix alone
    f = jax.jit(lambda G, s: obj.update(G, s)[0])
    return lambda: f(G, state).block_until_ready()


def torchjd_fn(name, m, a, dtype):
    try:
        import torch
        import torchjd.aggregation as agg
    except ImportError:
        return None
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    t = torch.tensor(a, dtype=tdtype)
    with torch.no_grad():
        obj = METHODS[name][1](m, agg, torch)
        if METHODS[name][2] == "cross":
            G = t @ t.T
            return lambda: obj(G)
        if name == "constant":
            obj = agg.Constant(torch.linspace(-1, 2, m, dtype=tdtype))
    return lambda: obj(t)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="sizes up to (20, 500)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-torchjd", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sizes = SIZES[:4] if args.quick else SIZES
    names = args.methods.split(",")
    warnings.filterwarnings("ignore")
    lines = [
        f"jax {jax.__version__}, {args.dtype}, one CPU thread, medians. Conflicting Gaussian "
        "Jacobians. floor = jit(gramian + combine); TorchJD / jaxjd > 1 means jaxjd is faster.",
        "",
        "| method | m | n | floor ms | jaxjd ms | jaxjd / floor | TorchJD ms | TorchJD / jaxjd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    with jax.enable_x64(args.dtype == "float64"):
        for m, n in sizes:
            a = conflicting(m, n).astype(args.dtype)
            J = jnp.asarray(a)
            w = jnp.full((m,), 1.0 / m, J.dtype)
            floor = jax.jit(lambda J, w=w: (jd.gramian(J), jd.combine(w, J)))
            t_floor = median_time(lambda: jax.block_until_ready(floor(J)), 5)
            for name in names:
                if (name == "krum" and m < 5) or (name == "trimmed_mean" and m < 3):
                    continue
                t_jax = median_time(jaxjd_fn(name, m, J), 3)
                tj = None if args.no_torchjd else torchjd_fn(name, m, a, args.dtype)
                t_torch = float("nan")
                if tj is not None:
                    try:
                        t_torch = median_time(tj, 3, min_total=0.1)
                    except Exception as err:  # TorchJD's own failures are reported, not hidden
                        print(f"TorchJD {name} ({m}, {n}) failed: {err}", flush=True)
                row = (
                    f"| {name} | {m} | {n} | {t_floor * 1e3:.3f} | {t_jax * 1e3:.3f} | "
                    f"{t_jax / t_floor:.1f} | {t_torch * 1e3:.2f} | {t_torch / t_jax:.1f} |"
                )
                emit(lines, row)
    write_table(lines, args.out)


if __name__ == "__main__":
    main()

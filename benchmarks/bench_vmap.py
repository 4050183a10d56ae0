"""Vmapped UPGrad weighting over batches of Gramians (per-sample weighting, the design card's
third usage): ``jax.jit(jax.vmap(jd.upgrad_weighting()))``, median and worst over families.

Each batch holds B Gramians of size m x m built from the matrix families of ``jaxjd._families``
(a family per Gramian, cycling). The floor is one batched ``G @ w`` (the least any weighting
reads). Runs unchanged on any JAX backend (one thread on the CPU).

    python benchmarks/bench_vmap.py [--batches 1024x16,256x32,64x64,16x128]
        [--dtypes float32] [--unroll-max 16] [--accelerator-program]
        [--out benchmarks/results/vmap.md]

``--unroll-max`` (a list) times the solver with each value of the order up to which BPP
solves its small systems by unrolled elimination instead of library Cholesky calls (private
constants, ``jaxjd.solvers._bpp._UNROLL_MAX``, and on the CPU ``_UNROLL_ON_CPU``): the
measurement that chose the defaults.

"steps in sequence" is what a vmapped batch costs on an accelerator, where every pivoting step
is a loop iteration that all lanes take (a string of kernel launches): the most pivoting steps
of a lane of the half-size path plus, when some Gramian of the batch takes the full-size path,
the most of a lane there (the two loops run one after the other). ``--accelerator-program`` on
the CPU: run the program an accelerator runs (dense loops, unrolled small solves, the batched
ADMM count), to count its steps here.
"""

from __future__ import annotations

import argparse
import statistics

import _common  # noqa: F401  (one thread: must come before jax)
import jax
import jax.numpy as jnp
import numpy as np
from _common import device_name, emit, median_times, write_table

import jaxjd as jd
import jaxjd.solvers._bpp as bpp_module
from jaxjd._families import gramian_batch
from jaxjd.aggregation import _dual_cone
from jaxjd.solvers import _equilibrated


def _half_size_ok(G):
    """Whether BPP takes the half-size path for UPGrad's default conditioning of ``G``."""
    d, Ge, _ = _equilibrated(_dual_cone.conditioned(jd.upgrad_weighting(), G)[0])
    return bpp_module._plan(jnp.diag(d), Ge, batched=True)[2]


def steps_in_sequence(Gs, iterations):
    """The pivoting steps a vmapped batch runs in sequence (see the module's docstring)."""
    m = Gs.shape[-1]
    most = np.asarray(iterations).max(axis=1)
    if m < bpp_module._COMPACT_MIN_M:
        return int(most.max())
    ok = np.asarray(jax.jit(jax.vmap(_half_size_ok))(Gs))
    return int(most[ok].max(initial=0)) + int(most[~ok].max(initial=0))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1024x16,256x32,64x64,16x128")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=200, help="columns of each Jacobian")
    parser.add_argument("--unroll-max", default=None, help="comma-separated list, see above")
    parser.add_argument("--accelerator-program", action="store_true", help="see above")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.accelerator_program:
        bpp_module._UNROLL_ON_CPU = True
        bpp_module._BATCHED_WARM_ON_CPU = True
    solver = jd.solvers.BPP(gather=False) if args.accelerator_program else "auto"
    unroll = [None] if args.unroll_max is None else [int(x) for x in args.unroll_max.split(",")]
    lines = [
        f"jax {jax.__version__}, {device_name()}"
        + (" running the accelerators' program" if args.accelerator_program else "")
        + ". jit(vmap(upgrad_weighting())) on B Gramians "
        f"of m x m (families cycling over the batch, J with n = {args.n}); medians per batch, "
        f"median and worst over {args.seeds} batches. floor = one batched G @ w.",
        "",
        "| dtype | B | m | unroll max | floor ms | ms median / worst | worst / median "
        "| all converged | most iterations | steps in sequence (worst batch) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for dtype in args.dtypes.split(","):
        with jax.enable_x64(dtype == "float64"):
            for spec, u in [(s, u) for s in args.batches.split(",") for u in unroll]:
                B, m = (int(x) for x in spec.split("x"))
                if u is not None:
                    jax.clear_caches()  # the constant is read when a solve is traced
                    bpp_module._UNROLL_MAX = u
                    bpp_module._UNROLL_ON_CPU = True
                u_txt = bpp_module._UNROLL_MAX
                weigh = jax.jit(jax.vmap(jd.upgrad_weighting(solver=solver)))
                solve = jax.jit(jax.vmap(jd.upgrad_weighting(solver=solver).solve))
                floor = jax.jit(lambda G: jnp.einsum("bij,bj->bi", G, G[:, 0]))
                times, floors, ok, its, steps = [], [], True, 0, 0
                for seed in range(args.seeds):
                    G = jnp.asarray(gramian_batch(B, m, args.n, seed).astype(dtype))
                    info = solve(G)[1]
                    ok &= bool(info.converged.all())
                    its = max(its, int(info.iterations.max()))
                    steps = max(steps, steps_in_sequence(G, info.iterations))
                    t = median_times(
                        {
                            "floor": lambda: floor(G).block_until_ready(),
                            "w": lambda: weigh(G).block_until_ready(),
                        },
                        repeats=7,
                        min_total=0.2,
                    )
                    times.append(t["w"])
                    floors.append(t["floor"])
                med, worst = statistics.median(times), max(times)
                emit(
                    lines,
                    f"| {dtype} | {B} | {m} | {u_txt} | {statistics.median(floors) * 1e3:.3f} | "
                    f"{med * 1e3:.3f} / {worst * 1e3:.3f} | {worst / med:.2f} | {ok} | {its} | "
                    f"{steps} |",
                )
    write_table(lines, args.out)


if __name__ == "__main__":
    main()

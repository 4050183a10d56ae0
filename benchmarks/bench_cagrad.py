"""CAGrad's inner solve over the matrix families, worst case: the exact solve on a face (block
pivoting, KKT test) before and inside the accelerated projected gradient loop, against that loop
alone, in the same run; and the aggregator against the floor. One CPU thread.

What a GPU pays for is the number of loop steps run one after the other (each a string of kernel
launches, ~20 us on an H100): the table counts them (loop iterations, backtracking steps,
pivoting steps) next to the CPU times.

    python benchmarks/bench_cagrad.py [--dtype float64] [--quick]
        [--out benchmarks/results/cagrad.md]
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
from jaxjd._families import family_matrices
from jaxjd.aggregation._cagrad import _minimize, _of_factor

SIZES = [(3, 1000), (8, 1000), (16, 1000), (32, 1000), (64, 1000)]
CS = (0.5, 2.0)


def _solver(on_support, tol):
    """The aggregator's solve on J's triangular factor, as ``jd.cagrad`` runs it."""

    @jax.jit
    def solve(R, c):
        with jax.default_matmul_precision("highest"):
            apply, norm, gram = _of_factor(R / jnp.linalg.norm(R))
            phi = c * norm(jnp.full((R.shape[1],), 1.0 / R.shape[1], R.dtype))
            return _minimize(apply, norm, gram, phi, tol, 20_000, on_support)

    return solve


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quick", action="store_true", help="m up to 16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = np.dtype(args.dtype)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    exact, alone = _solver(True, tol), _solver(False, tol)
    lines = []
    emit(lines, f"jax {jax.__version__}, {args.dtype}, {device_name()}. Families:")
    emit(lines, "jaxjd._families (9 matrices per size), c in {0.5, 2}; worst over the 18 cases.")
    emit(lines, "floor = jit(gramian + combine); solve times: the inner solve alone (R given).")
    emit(lines, "")
    head = (
        "| m | n | floor ms | cagrad median ms | cagrad worst ms | worst / floor "
        "| solve median ms: exact / loop alone | solve worst ms: exact / loop alone "
        "| steps in sequence, worst: exact / loop alone "
        "| iterations, median: exact / loop alone |"
    )
    emit(lines, head)
    emit(lines, "|" + "---|" * 10)
    sizes = [s for s in SIZES if not args.quick or s[0] <= 16]
    for m, n in sizes:
        agg_times, floors, solve_exact, solve_alone = [], [], [], []
        steps_exact, steps_alone, it_exact, it_alone = [], [], [], []
        for _, _, a in family_matrices(m, n):
            J = jnp.asarray(a, dtype)
            R = jnp.asarray(np.linalg.qr(np.asarray(a, np.float64).T, mode="r"), dtype)
            for c in CS:
                cagrad = jax.jit(lambda J, c=c: jd.cagrad(J, c=c))
                w = jnp.ones(m, dtype)
                floor = jax.jit(lambda J, w=w: (jd.gramian(J), jd.combine(w, J)))
                cc = jnp.asarray(c, dtype)
                times = median_times(
                    {
                        "agg": lambda: cagrad(J).block_until_ready(),
                        "floor": lambda: jax.block_until_ready(floor(J)),
                        "exact": lambda: exact(R, cc)[0].block_until_ready(),
                        "alone": lambda: alone(R, cc)[0].block_until_ready(),
                    },
                    repeats=5,
                    min_total=0.05,
                )
                agg_times.append(times["agg"])
                floors.append(times["floor"])
                solve_exact.append(times["exact"])
                solve_alone.append(times["alone"])
                _, i1, s1 = exact(R, cc)
                _, i0, s0 = alone(R, cc)
                it_exact.append(int(i1))
                it_alone.append(int(i0))
                steps_exact.append(int(s1))
                steps_alone.append(int(s0))
        ms = 1e3
        floor = statistics.median(floors)
        emit(
            lines,
            f"| {m} | {n} | {floor * ms:.3f} | {statistics.median(agg_times) * ms:.3f} "
            f"| {max(agg_times) * ms:.3f} | {max(agg_times) / floor:.1f} "
            f"| {statistics.median(solve_exact) * ms:.3f} "
            f"/ {statistics.median(solve_alone) * ms:.3f} "
            f"| {max(solve_exact) * ms:.3f} / {max(solve_alone) * ms:.3f} "
            f"| {max(steps_exact)} / {max(steps_alone)} "
            f"| {statistics.median(it_exact):.0f} / {statistics.median(it_alone):.0f} |",
        )
    write_table(lines, args.out)


if __name__ == "__main__":
    main()

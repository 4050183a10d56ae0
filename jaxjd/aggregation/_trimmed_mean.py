"""Coordinate-wise trimmed mean (Yin et al. 2018): needs coordinates, not a Gramian."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._tree import num_objectives
from ._abstract import AbstractAggregator, Aggregation
from ._fields import spelling, static_int


class TrimmedMean(AbstractAggregator):
    """Per coordinate, drop the ``trim_number`` smallest and largest entries of the m rows and
    average the rest. Needs the Jacobian's coordinates (works leaf by leaf on a pytree) and
    ``m >= 2 trim_number + 1``.

    Args:
        trim_number: how many of the smallest and of the largest entries are dropped.

    Reference: Yin et al., "Byzantine-robust distributed learning: towards optimal statistical
    rates", ICML 2018.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.trimmed_mean(jnp.array([[1.0, -5.0], [2.0, 0.0], [90.0, 1.0]]), trim_number=1)
    Array([2., 0.], dtype=float32)
    """

    trim_number: int = static_int("trim_number", minimum=0)

    def _aggregate(self, jacobian, state, key):
        m = num_objectives(jacobian)
        if m < 2 * self.trim_number + 1:
            raise ValueError(
                f"TrimmedMean(trim_number={self.trim_number}) needs at least "
                f"{2 * self.trim_number + 1} rows; got m = {m}."
            )
        t = self.trim_number

        def one(leaf):
            if t == 0:
                return jnp.mean(leaf, axis=0).astype(leaf.dtype)
            # XLA's sort is slow on CPU. The t largest and t smallest entries of each coordinate
            # are masked out (disjoint even with ties) and the kept ones summed as they are (no
            # cancellation against huge outliers); a NaN in a coordinate gives NaN.
            if m <= 32:
                # Small m: each entry's rank among its coordinate's m values (ties broken by
                # row), accumulated row by row in (m, n) memory; fused elementwise work.
                x = jnp.reshape(leaf, (m, -1))
                rows_idx = jnp.arange(m)[:, None]

                def count(j, rank):
                    xj = x[j]
                    below = (xj[None] < x) | ((xj[None] == x) & (j < rows_idx))
                    return rank + below.astype(jnp.int32)

                rank = jax.lax.fori_loop(0, m, count, jnp.zeros(x.shape, jnp.int32))
                keep = (rank >= t) & (rank < m - t)
                kept = jnp.sum(jnp.where(keep, x, 0), axis=0) / (m - 2 * t)
                kept = jnp.where(jnp.any(jnp.isnan(x), axis=0), jnp.nan, kept)
                return jnp.reshape(kept, leaf.shape[1:]).astype(leaf.dtype)
            rows = jnp.reshape(leaf, (m, -1)).T
            positions = jnp.arange(m, dtype=jnp.int32)[None, None, :]

            def hit(idx):  # (n, t) indices -> (n, m) mask, fused (no scatter)
                return jnp.any(idx.astype(jnp.int32)[:, :, None] == positions, axis=1)

            drop = hit(jax.lax.top_k(rows, t)[1])
            drop = drop | hit(jax.lax.top_k(-jnp.where(drop, jnp.inf, rows), t)[1])
            kept = jnp.sum(jnp.where(drop, 0, rows), axis=1) / (m - 2 * t)
            kept = jnp.where(jnp.any(jnp.isnan(rows), axis=1), jnp.nan, kept)
            return jnp.reshape(kept, leaf.shape[1:]).astype(leaf.dtype)

        return Aggregation(jax.tree_util.tree_map(one, jacobian), None, state)


trimmed_mean = spelling(TrimmedMean, "trimmed_mean", reads="jacobian")

"""Coordinate-wise trimmed mean (Yin et al. 2018): needs coordinates, not a Gramian."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import num_objectives
from ._base import Aggregator, build_or_apply


class TrimmedMean(Aggregator):
    """Per coordinate, drop the ``trim_number`` smallest and largest entries of the m rows and
    average the rest. Needs the Jacobian's coordinates (works leaf by leaf on a pytree) and
    ``m >= 2 trim_number + 1``."""

    trim_number: int = eqx.field(static=True)

    def __init__(self, trim_number: int):
        if int(trim_number) != trim_number or trim_number < 0:
            raise ValueError(f"trim_number must be a non-negative integer; got {trim_number}.")
        self.trim_number = int(trim_number)

    def __call__(self, jacobian, /, *, key=None):
        m = num_objectives(jacobian)
        if m < 2 * self.trim_number + 1:
            raise ValueError(
                f"TrimmedMean({self.trim_number}) needs at least {2 * self.trim_number + 1} "
                f"rows; got m = {m}."
            )
        t = self.trim_number

        def one(leaf):
            if t == 0:
                return jnp.mean(leaf, axis=0).astype(leaf.dtype)
            # XLA's sort is slow on CPU; two top_k give the t largest and the t smallest entries
            # of each coordinate (disjoint even with ties), which are masked out, so that the
            # kept entries are summed as they are (no cancellation against huge outliers).
            rows = jnp.reshape(leaf, (m, -1)).T
            cols = jnp.arange(rows.shape[0])[:, None]
            _, top = jax.lax.top_k(rows, t)
            drop = jnp.zeros(rows.shape, bool).at[cols, top].set(True)
            _, bottom = jax.lax.top_k(-jnp.where(drop, jnp.inf, rows), t)
            drop = drop.at[cols, bottom].set(True)
            kept = jnp.sum(jnp.where(drop, 0, rows), axis=1) / (m - 2 * t)
            return jnp.reshape(kept, leaf.shape[1:]).astype(leaf.dtype)

        return jax.tree_util.tree_map(one, jacobian)


def trimmed_mean(jacobian=None, /, *, trim_number):
    """Trimmed mean: ``trimmed_mean(J, trim_number=t)`` returns the update,
    ``trimmed_mean(trim_number=t)`` a :class:`TrimmedMean`."""
    return build_or_apply(TrimmedMean(trim_number), jacobian)

"""Aggregators whose weights can be read off J's triangular factor instead of its Gramian."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._spmd import replicated, varying_axes
from .._tree import accumulation_dtype_of, combine, triangular_factor
from ._abstract import Aggregation, GramianWeightedAggregator, _per_device


class FactorWeightedAggregator(GramianWeightedAggregator):
    r"""``J^T w`` with the weights computed from ``R``, the triangular factor of
    ``2^-e J^T = Q R`` (so ``R^T R = 2^-2e J J^T``), when the weighting's ``factor`` is
    ``"qr"``: a QR of J's rows (leaf by leaf) instead of the product ``J J^T``. The weights are
    the same function of the Gramian; they keep ``cond(J)`` where ``G`` has ``cond(J)^2``,
    which float32 resolves only to about ``1e7``. With ``factor="gramian"`` (or a weighting of
    another class) this is :class:`GramianWeightedAggregator`.

    A weighting used here has a ``factor`` field and ``_weigh_factor(R, log2_scale, state)``
    returning ``(w, state)`` (as ``_weigh`` does from ``G``), with ``log2_scale = -2 e``.
    """

    def _aggregate(self, jacobian, state, key, losses=None):
        weighting = self.weighting
        cls = type(self).weighting_class
        own = cls is not None and isinstance(weighting, cls)
        if not own or getattr(weighting, "factor", "gramian") != "qr":
            return super()._aggregate(jacobian, state, key, losses)
        leaves = jax.tree_util.tree_leaves(jax.lax.stop_gradient(jacobian))
        dtype = accumulation_dtype_of(*leaves)
        R, e = triangular_factor(leaves, dtype)  # of J scaled by 2^-e
        w, state = _weigh_factor(weighting, R, (-2 * e).astype(dtype), state)
        return Aggregation(combine(w, jacobian), w, state)


@eqx.filter_jit
def _weigh_factor(weighting, R, log2_scale, state):
    # Jitted so that eager calls compile the solve once per (m, dtype) (a loop op by op takes
    # seconds); inside a user's jit this inlines. As the Gramian's path (_weigh_jit): sharded
    # inputs are solved whole on every device, and device-varying ones under shard_map (each
    # device its own J) through _per_device.
    R, state, log2_scale = replicated((R, state, log2_scale))
    axes = varying_axes(R, state, log2_scale)
    with jax.default_matmul_precision("highest"):
        if axes:
            w, state = _per_device(weighting, axes, R, state, None, None, log2_scale, _of_factor)
        else:
            w, state = _of_factor(weighting, R, state, None, None, log2_scale)
    w, state = replicated((w, state))
    return jnp.where(jnp.all(jnp.isfinite(R)), w, jnp.nan), state  # a non-finite J: NaN


def _of_factor(weighting, R, state, key, losses, log2_scale):
    """:func:`_per_device`'s ``weigh`` for a factor (no key, no losses)."""
    return weighting._weigh_factor(R, log2_scale, state)

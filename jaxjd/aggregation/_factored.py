"""Aggregators whose weights can be read off J's triangular factor instead of its Gramian."""

from __future__ import annotations

import jax

from .._tree import accumulation_dtype_of, combine, triangular_factor
from ._abstract import Aggregation, GramianWeightedAggregator, _weigh_jit


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
        # the Gramian path's jit, sharding and value policy, with R in place of G
        w, state = _weigh_jit(weighting, R, state, None, None, (-2 * e).astype(dtype), _of_factor)
        return Aggregation(combine(w, jacobian), w, state)


def _of_factor(weighting, R, state, key, losses, log2_scale):
    """``_weigh_jit``'s ``weigh`` for a factor ``R`` given in place of ``G``."""
    return weighting._weigh_factor(R, log2_scale, state)

"""PCGrad (Yu et al. 2020): projecting conflicting gradients, from the Gramian."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ._base import GramianWeightedAggregator, Weighting, build_or_apply


class PCGradWeighting(Weighting):
    r"""Weights of PCGrad: each ``g_i`` is kept as coefficients ``c`` over the rows
    (``g_i^PC = J^T c``, ``c = e_i``); for the other rows ``j`` in a random order,
    if ``g_i^PC . g_j < 0`` then ``c_j -= (G c)_j / G_jj``. The weights are ``sum_i c^(i)`` (the
    sum of the projected gradients). The order comes from the PRNG ``key`` (one permutation per
    i); for m <= 2 it cannot matter and the key may be omitted. A ``lax.fori_loop`` over j,
    vmapped over i."""

    needs_key = True

    def _weigh(self, gramian, key):
        m = check_gramian(gramian)
        G = jax.lax.stop_gradient(jnp.asarray(gramian, accumulation_dtype(gramian.dtype)))
        if key is None:
            if m > 2:
                raise ValueError("PCGrad with m > 2 needs a PRNG key for its random task order.")
            key = jax.random.key(0)
        keys = jax.random.split(key, m)
        diag = jnp.diagonal(G)
        safe = jnp.where(diag > 0, diag, 1.0)

        def project(i, k):
            order = jax.random.permutation(k, m)

            def body(t, c):
                j = order[t]
                s = G[j] @ c
                hit = (j != i) & (s < 0) & (diag[j] > 0)
                return c.at[j].add(jnp.where(hit, -s / safe[j], 0.0))

            return jax.lax.fori_loop(0, m, body, jax.nn.one_hot(i, m, dtype=G.dtype))

        return jnp.sum(jax.vmap(project)(jnp.arange(m), keys), axis=0)


class PCGrad(GramianWeightedAggregator):
    """PCGrad aggregator: ``J^T w`` with :class:`PCGradWeighting` weights; call with ``key=``."""

    weighting: PCGradWeighting

    def __init__(self):
        self.weighting = PCGradWeighting()


def pcgrad(jacobian=None, /, *, key=None):
    """PCGrad (Yu et al. 2020): ``pcgrad(J, key=key)`` returns the update, ``pcgrad()`` a
    :class:`PCGrad` to call with ``key=``."""
    return build_or_apply(PCGrad(), jacobian, key=key)


def pcgrad_weighting(gramian=None, /, *, key=None):
    """:class:`PCGradWeighting`: weights from a Gramian, or the weighting itself."""
    return build_or_apply(PCGradWeighting(), gramian, key=key)

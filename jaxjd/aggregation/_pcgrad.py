"""PCGrad (Yu et al. 2020): projecting conflicting gradients, from the Gramian."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import spelling


class PCGradWeighting(AbstractWeighting):
    r"""Weights of PCGrad: each ``g_i`` is kept as coefficients ``c`` over the rows
    (``g_i^PC = J^T c``, ``c = e_i``); for the other rows ``j`` in a random order,
    if ``g_i^PC . g_j < 0`` then ``c_j -= (G c)_j / G_jj``. The weights are ``sum_i c^(i)`` (the
    sum of the projected gradients). The order comes from the PRNG ``key`` (one permutation per
    i); for m <= 2 it cannot matter and the key may be omitted. A ``lax.fori_loop`` over j,
    vmapped over i.

    Reference: Yu et al., "Gradient surgery for multi-task learning", NeurIPS 2020.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.pcgrad_weighting(G), float), 4)
    array([2.2222, 1.5789])
    """

    scale_degree = 0.0

    draws_key = True

    def _weigh(self, G, state, key):
        m = G.shape[0]
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

        return jnp.sum(jax.vmap(project)(jnp.arange(m), keys), axis=0), state


class PCGrad(GramianWeightedAggregator):
    """PCGrad aggregator: ``J^T w`` with :class:`PCGradWeighting` weights (TorchJD's ``PCGrad``);
    call with ``key=`` when m > 2."""

    weighting_class = PCGradWeighting


pcgrad = spelling(PCGrad, "pcgrad", reads="jacobian")
pcgrad_weighting = spelling(PCGradWeighting, "pcgrad_weighting", reads="gramian")

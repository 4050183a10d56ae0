"""IMTL-G (Liu et al., ICLR 2021), in the Gramian form of the JD paper."""

from __future__ import annotations

import jax.numpy as jnp

from .._linalg import pinv_psd, power_of_two_scaled
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import spelling


class IMTLGWeighting(AbstractWeighting):
    r"""Weights of IMTL-G: ``v = G^+ sqrt(diag G)``, ``w = v / sum(v)`` (zeros when
    ``|sum v| < 1e-12`` once G is divided by its largest diagonal entry), so the update has
    equal projections on every unit gradient. ``G`` is first scaled by a power of two (exact:
    the weights do not depend on its scale); a Gramian whose largest entry is not 0 but below
    ``tiny / eps`` (9.9e-32 in float32, 2.0e-292 in float64) has lost precision (its products
    were subnormal) and gives NaN.

    Reference: Liu et al., "Towards impartial multi-task learning", ICLR 2021.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.imtl_g_weighting(G), float), 4)
    array([0.5923, 0.4077])
    """

    scale_degree = 0.0

    def _weigh(self, G, state, key):
        G, _, usable = power_of_two_scaled(G)
        # The weights do not depend on the scale of G, but v does (as 1 / |g|): G is divided by
        # its largest diagonal entry first, so that the 1e-12 test is relative (a fixed
        # threshold on v gave zero weights for gradients of norm 1e13).
        c = jnp.max(jnp.diagonal(G))
        G = G / jnp.where(c > 0, c, 1.0).astype(G.dtype)
        d = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
        v = pinv_psd(G) @ d
        total = jnp.sum(v)
        small = jnp.abs(total) < 1e-12
        w = jnp.where(small, 0.0, v / jnp.where(small, 1.0, total))
        return jnp.where(usable, w, jnp.nan), state


class IMTLG(GramianWeightedAggregator):
    """IMTL-G aggregator: ``J^T w`` with :class:`IMTLGWeighting` weights (TorchJD's ``IMTLG``)."""

    weighting_class = IMTLGWeighting


imtl_g = spelling(IMTLG, "imtl_g", reads="jacobian")
imtl_g_weighting = spelling(IMTLGWeighting, "imtl_g_weighting", reads="gramian")

"""IMTL-G (Liu et al., ICLR 2021), in the Gramian form of the JD paper."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._linalg import factor_eigen, gramian_eigen, power_of_two_scaled
from ._abstract import AbstractWeighting
from ._factored import FactorWeightedAggregator
from ._fields import choice, spelling


class IMTLGWeighting(AbstractWeighting):
    r"""Weights of IMTL-G: ``v = G^+ sqrt(diag G)``, ``w = v / sum(v)`` (zeros when
    ``|sum v| < 1e-12`` once G is divided by its largest diagonal entry), so the update has
    equal projections on every unit gradient. ``G^+`` keeps the eigenvalues above
    ``m eps max(l)`` (``torch.linalg.pinv``'s cut-off). ``G`` is first scaled by a power of
    two (exact: the weights do not depend on its scale); a Gramian whose largest entry is not 0
    but below ``tiny / eps`` (9.9e-32 in float32, 2.0e-292 in float64) has lost precision (its
    products were subnormal) and gives NaN.

    Args:
        factor: for the aggregator: ``"qr"`` (default) computes the same weights from J's
            triangular factor ``R`` (``G = R^T R``, eigenpairs from the SVD of ``R``): float32
            then resolves J's singular values down to ``m eps`` of the largest, where the
            Gramian loses those below ``sqrt(m eps)`` (7e-4 at m = 4), and keeps float64's
            cut-off ``m eps_64`` on the eigenvalues where it can (:class:`IMTLG`);
            ``"gramian"``: ``J J^T``, one matrix product instead of a QR. A weighting given a
            Gramian uses it, and so does the aggregator inside an engine that forms only the
            Gramian (``mtl_value_and_grad`` with ``method="layerwise"``).

    Reference: Liu et al., "Towards impartial multi-task learning", ICLR 2021.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.imtl_g_weighting(G), float), 4)
    array([0.5923, 0.4077])
    """

    scale_degree = 0.0

    factor: str = choice("factor", "qr", ("qr", "gramian"))

    def _weigh(self, G, state, key):
        G, _, usable = power_of_two_scaled(G)
        # The weights do not depend on the scale of G, but v does (as 1 / |g|): G is divided by
        # its largest diagonal entry first, so that the 1e-12 test is relative (a fixed
        # threshold on v gave zero weights for gradients of norm 1e13).
        c = jnp.max(jnp.diagonal(G))
        G = G / jnp.where(c > 0, c, 1.0).astype(G.dtype)
        d = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
        w = _imtl_g(*gramian_eigen(G), d)
        return jnp.where(usable, w, jnp.nan), state

    def _weigh_factor(self, R: Float[Array, "m m"], log2_scale: Float[Array, ""], state):
        """The weights from ``R`` with ``R^T R = 2^log2_scale J J^T`` (scale-free: the scale is
        not read): ``R`` divided by its largest column norm, as ``G`` by its largest diagonal
        entry."""
        norms = jnp.sqrt(jnp.sum(R * R, axis=0))  # |g_i|, scaled
        c = jnp.max(norms)
        c = jnp.where(c > 0, c, 1.0)
        return _imtl_g(*factor_eigen(R / c), norms / c), state


def _imtl_g(lam, V, keep, d):
    """``v = V diag(1 / l) V^T d`` over the kept eigenpairs, ``w = v / sum(v)`` (0 when
    ``|sum v| < 1e-12``)."""
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    v = V @ (inv * (V.T @ d))
    total = jnp.sum(v)
    small = jnp.abs(total) < 1e-12
    return jnp.where(small, 0.0, v / jnp.where(small, 1.0, total))


class IMTLG(FactorWeightedAggregator):
    """IMTL-G aggregator: ``J^T w`` with :class:`IMTLGWeighting` weights (TorchJD's ``IMTLG``),
    computed from J's triangular factor (``factor="qr"``, the default)."""

    weighting_class = IMTLGWeighting


imtl_g = spelling(IMTLG, "imtl_g", reads="jacobian")
imtl_g_weighting = spelling(IMTLGWeighting, "imtl_g_weighting", reads="gramian")

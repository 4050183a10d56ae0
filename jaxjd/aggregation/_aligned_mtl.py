"""Aligned-MTL (Senushkin et al., CVPR 2023): align the gradients by an eigen-rescaling."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._linalg import factor_eigen, gramian_eigen, power_of_two_scaled
from .._typing import VectorLike
from ._abstract import AbstractWeighting
from ._factored import FactorWeightedAggregator
from ._fields import choice, sized, spelling, vector


class AlignedMTLWeighting(AbstractWeighting):
    r"""Weights of Aligned-MTL: with ``G = V diag(l) V^T`` restricted to its rank
    (``l > max(l) m eps``), ``B = sqrt(s) V diag(l)^{-1/2} V^T`` and ``w = B p`` (``B = I`` when
    the rank is 0). ``G`` is first scaled by a power of two (exact: the weights do not depend
    on its scale); a Gramian whose largest entry is not 0 but below ``tiny / eps`` (9.9e-32 in
    float32, 2.0e-292 in float64) has lost precision (its products were subnormal) and gives
    NaN.

    Args:
        pref_vector: the preference ``p`` (default ``1/m``).
        scale_mode: ``s`` is the smallest kept eigenvalue (``"min"``), their lower median
            (``"median"``) or mean (``"rmse"``).
        factor: for the aggregator: ``"qr"`` (default) takes the eigenpairs from the SVD of
            J's triangular factor ``R`` (``G = R^T R``): float32 then resolves J's singular
            values down to ``m eps`` of the largest, where the Gramian loses those below
            ``sqrt(m eps)`` (7e-4 at m = 4), and keeps float64's cut-off ``m eps_64`` on the
            eigenvalues where it can (:class:`AlignedMTL`); ``"gramian"``: ``J J^T``, one
            matrix product instead of a QR. A weighting given a Gramian uses it, and so does the
            aggregator inside an engine that forms only the Gramian (``mtl_value_and_grad``
            with ``method="layerwise"``).

    Reference: Senushkin et al., "Independent component alignment for multi-task learning",
    CVPR 2023.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.aligned_mtl_weighting(G), float), 4)
    array([0.5591, 0.4083])
    """

    scale_degree = 0.0

    pref_vector: VectorLike | None = vector("pref_vector")
    scale_mode: str = choice("scale_mode", "min", ("min", "median", "rmse"))
    factor: str = choice("factor", "qr", ("qr", "gramian"))

    def _weigh(self, G, state, key):
        G, _, usable = power_of_two_scaled(G)
        w = _aligned(*gramian_eigen(G), self._preference(G.shape[0], G.dtype), self.scale_mode)
        return jnp.where(usable, w, jnp.nan), state

    def _weigh_factor(self, R: Float[Array, "m m"], log2_scale: Float[Array, ""], state):
        """The weights from ``R`` with ``R^T R = 2^log2_scale J J^T`` (scale-free: the scale is
        not read)."""
        m = R.shape[1]
        w = _aligned(*factor_eigen(R), self._preference(m, R.dtype), self.scale_mode)
        return w, state

    def _preference(self, m, dtype):
        if self.pref_vector is None:
            return jnp.full((m,), 1.0 / m, dtype)
        return sized(self.pref_vector, m, dtype, "pref_vector")


def _aligned(lam, V, keep, p, scale_mode):
    """``w = sqrt(s) V diag(l)^{-1/2} V^T p`` over the kept eigenpairs (``p`` when none is
    kept), with ``s`` chosen by ``scale_mode``."""
    m = lam.shape[0]
    rank = jnp.sum(keep)
    if scale_mode == "min":
        scale = jnp.min(jnp.where(keep, lam, jnp.inf))
    elif scale_mode == "rmse":
        scale = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1).astype(lam.dtype)
    else:
        ordered = jnp.sort(jnp.where(keep, lam, jnp.inf))
        scale = ordered[jnp.maximum(rank - 1, 0) // 2]
    inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    B = jnp.sqrt(scale) * (V * inv_sqrt[None, :]) @ V.T
    B = jnp.where(rank == 0, jnp.eye(m, dtype=lam.dtype), B)
    return B @ p


class AlignedMTL(FactorWeightedAggregator):
    """Aligned-MTL aggregator: ``J^T w`` with :class:`AlignedMTLWeighting` weights (TorchJD's
    ``AlignedMTL``), computed from J's triangular factor (``factor="qr"``, the default)."""

    weighting_class = AlignedMTLWeighting


aligned_mtl = spelling(AlignedMTL, "aligned_mtl", reads="jacobian")
aligned_mtl_weighting = spelling(AlignedMTLWeighting, "aligned_mtl_weighting", reads="gramian")

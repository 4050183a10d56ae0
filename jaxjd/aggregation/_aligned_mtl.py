"""Aligned-MTL (Senushkin et al., CVPR 2023): align the gradients by an eigen-rescaling."""

from __future__ import annotations

import jax.numpy as jnp

from .._linalg import power_of_two_scaled
from .._spmd import eigh
from .._typing import VectorLike
from ._abstract import AbstractWeighting, GramianWeightedAggregator
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

    def _weigh(self, G, state, key):
        G, _, usable = power_of_two_scaled(G)
        m = G.shape[0]
        if self.pref_vector is None:
            p = jnp.full((m,), 1.0 / m, G.dtype)
        else:
            p = sized(self.pref_vector, m, G.dtype, "pref_vector")
        lam, V = eigh(0.5 * (G + G.T))
        tol = jnp.max(lam) * m * jnp.finfo(G.dtype).eps
        keep = lam > tol
        rank = jnp.sum(keep)
        if self.scale_mode == "min":
            scale = jnp.min(jnp.where(keep, lam, jnp.inf))
        elif self.scale_mode == "rmse":
            scale = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1).astype(lam.dtype)
        else:
            ordered = jnp.sort(jnp.where(keep, lam, jnp.inf))
            scale = ordered[jnp.maximum(rank - 1, 0) // 2]
        inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
        B = jnp.sqrt(scale) * (V * inv_sqrt[None, :]) @ V.T
        B = jnp.where(rank == 0, jnp.eye(m, dtype=G.dtype), B)
        return jnp.where(usable, B @ p, jnp.nan), state


class AlignedMTL(GramianWeightedAggregator):
    """Aligned-MTL aggregator: ``J^T w`` with :class:`AlignedMTLWeighting` weights (TorchJD's
    ``AlignedMTL``)."""

    weighting_class = AlignedMTLWeighting


aligned_mtl = spelling(AlignedMTL, "aligned_mtl", reads="jacobian")
aligned_mtl_weighting = spelling(AlignedMTLWeighting, "aligned_mtl_weighting", reads="gramian")

"""Aligned-MTL (Senushkin et al., CVPR 2023): align the gradients by an eigen-rescaling."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ._base import (
    GramianWeightedAggregator,
    Weighting,
    as_static_vector,
    build_or_apply,
    vector_for,
)

_MODES = ("min", "median", "rmse")


class AlignedMTLWeighting(Weighting):
    r"""Weights of Aligned-MTL: with ``G = V diag(l) V^T`` restricted to its rank
    (``l > max(l) m eps``), ``B = sqrt(s) V diag(l)^{-1/2} V^T`` and ``w = B p`` (``p`` the
    preference, default ``1/m``; ``B = I`` when the rank is 0). ``s`` is the smallest kept
    eigenvalue (``"min"``), their lower median (``"median"``) or mean (``"rmse"``)."""

    pref_vector: tuple[float, ...] | None = eqx.field(static=True)
    scale_mode: str = eqx.field(static=True)

    def __init__(self, pref_vector=None, scale_mode: str = "min"):
        if scale_mode not in _MODES:
            raise ValueError(f"Invalid scale_mode={scale_mode!r}; expected one of {_MODES}.")
        self.pref_vector = as_static_vector(pref_vector, "pref_vector")
        self.scale_mode = scale_mode

    def _weigh(self, gramian, key):
        m = check_gramian(gramian)
        G = jax.lax.stop_gradient(jnp.asarray(gramian, accumulation_dtype(gramian.dtype)))
        if self.pref_vector is None:
            p = jnp.full((m,), 1.0 / m, G.dtype)
        else:
            p = vector_for(self.pref_vector, m, G.dtype, "pref_vector")
        lam, V = jnp.linalg.eigh(0.5 * (G + G.T))
        tol = jnp.max(lam) * m * jnp.finfo(G.dtype).eps
        keep = lam > tol
        rank = jnp.sum(keep)
        if self.scale_mode == "min":
            scale = jnp.min(jnp.where(keep, lam, jnp.inf))
        elif self.scale_mode == "rmse":
            scale = jnp.sum(jnp.where(keep, lam, 0.0)) / jnp.maximum(rank, 1)
        else:
            ordered = jnp.sort(jnp.where(keep, lam, jnp.inf))
            scale = ordered[jnp.maximum(rank - 1, 0) // 2]
        inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
        B = jnp.sqrt(scale) * (V * inv_sqrt) @ V.T
        B = jnp.where(rank == 0, jnp.eye(m, dtype=G.dtype), B)
        return B @ p


class AlignedMTL(GramianWeightedAggregator):
    """Aligned-MTL aggregator: ``J^T w`` with :class:`AlignedMTLWeighting` weights."""

    weighting: AlignedMTLWeighting

    def __init__(self, pref_vector=None, scale_mode: str = "min"):
        self.weighting = AlignedMTLWeighting(pref_vector, scale_mode)


def aligned_mtl(jacobian=None, /, *, pref_vector=None, scale_mode="min"):
    """Aligned-MTL: ``aligned_mtl(J)`` returns the update, ``aligned_mtl(**hyper)`` an
    :class:`AlignedMTL`."""
    return build_or_apply(AlignedMTL(pref_vector, scale_mode), jacobian)


def aligned_mtl_weighting(gramian=None, /, *, pref_vector=None, scale_mode="min"):
    """:class:`AlignedMTLWeighting`: weights from a Gramian, or the weighting itself."""
    return build_or_apply(AlignedMTLWeighting(pref_vector, scale_mode), gramian)

"""IMTL-G (Liu et al., ICLR 2021), in the Gramian form of the JD paper."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ._base import GramianWeightedAggregator, Weighting, build_or_apply


def pinv_psd(G, rtol=None):
    """Pseudo-inverse of a symmetric PSD matrix by eigendecomposition (cut-off ``rtol * max|l|``,
    default ``m * eps``, as ``torch.linalg.pinv``)."""
    m = G.shape[0]
    lam, V = jnp.linalg.eigh(G)
    rtol = m * jnp.finfo(G.dtype).eps if rtol is None else rtol
    keep = jnp.abs(lam) > rtol * jnp.max(jnp.abs(lam))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    return (V * inv) @ V.T


class IMTLGWeighting(Weighting):
    r"""Weights of IMTL-G: ``v = G^+ sqrt(diag G)``, ``w = v / sum(v)`` (zeros when
    ``|sum v| < 1e-12``), so the update has equal projections on every unit gradient."""

    def _weigh(self, gramian, key):
        check_gramian(gramian)
        G = jax.lax.stop_gradient(jnp.asarray(gramian, accumulation_dtype(gramian.dtype)))
        d = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
        v = pinv_psd(G) @ d
        total = jnp.sum(v)
        small = jnp.abs(total) < 1e-12
        return jnp.where(small, 0.0, v / jnp.where(small, 1.0, total))


class IMTLG(GramianWeightedAggregator):
    """IMTL-G aggregator: ``J^T w`` with :class:`IMTLGWeighting` weights."""

    weighting: IMTLGWeighting

    def __init__(self):
        self.weighting = IMTLGWeighting()


def imtl_g(jacobian=None, /):
    """IMTL-G (Liu et al. 2021): ``imtl_g(J)`` returns the update, ``imtl_g()`` an
    :class:`IMTLG`."""
    return build_or_apply(IMTLG(), jacobian)


def imtl_g_weighting(gramian=None, /):
    """:class:`IMTLGWeighting`: weights from a Gramian, or the weighting itself."""
    return build_or_apply(IMTLGWeighting(), gramian)

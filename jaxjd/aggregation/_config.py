"""ConFIG (Liu et al. 2024), from a QR factor of J built leaf by leaf: pytrees work without
concatenating, and float32 keeps J's condition number (not the Gramian's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._spmd import eigh, svd
from .._tree import (
    accumulation_dtype_of,
    combine,
    gramian,
    num_objectives,
    triangular_factor,
)
from .._typing import VectorLike
from ._abstract import (
    AbstractAggregator,
    Aggregation,
    gramian_in_range,
)
from ._fields import choice, sized, spelling, vector


class ConFIG(AbstractAggregator):
    r"""ConFIG: with unit rows ``U = D^{-1} J`` (zero rows stay 0) and preference ``p`` (default
    ones), the direction ``u = pinv(U) p / |pinv(U) p|`` and the update ``(sum_i g_i . u) u``.

    Since ``pinv(U) p = U^T (U U^T)^+ p`` the update is ``J^T w``. The weights come from the
    triangular factor ``R`` of ``J^T = Q R`` (a QR of each leaf's rows, then of the stacked
    factors: no concatenated matrix, no Gramian) and the SVD of ``R diag(1/|g_i|)``, whose right
    singular vectors and values are those of ``U`` on the left: the rounding is that of
    ``cond(U)`` (an eigendecomposition of ``U U^T`` squares it, 4e-4 off TorchJD's float32
    tolerance of 1e-4). The pseudo-inverse's cut-off is ``torch.linalg.pinv``'s: singular values
    below ``max(m, n) eps`` times the largest are dropped. TorchJD needs the matrix; here a
    pytree Jacobian is fine. When ``p`` is orthogonal to the rows of ``U`` to rounding (its
    share in their span at most ``max(m, n) eps``, e.g. rows ``+-q`` in equal numbers and ``p``
    = ones), the direction is undefined (0 / 0) and the update is 0; TorchJD returns NaN or
    rounding noise divided by rounding noise there.

    Args:
        pref_vector: the preference ``p`` (default ones).
        factor: ``"qr"`` (default: exact to ``cond(U)``) or ``"gramian"``: the
            eigendecomposition of ``U U^T`` from the Gramian, 2-6 times faster on a CPU
            (measured at m = 8-128, n = 1e4-1e5, float32, one thread; one matrix product
            instead of a QR), whose rounding is ``eps cond(U)^2``: where that exceeds
            ``eps^(2/3)`` (``cond(U) > 14`` in float32, ``> 400`` in float64) the weights come
            from the QR instead (both run under ``vmap``).

    Reference: Liu et al., "ConFIG: towards conflict-free training of physics informed neural
    networks", ICLR 2025.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> np.round(np.asarray(jd.config(J), float), 4)
    array([0.1588, 2.0706, 2.0706])
    """

    pref_vector: VectorLike | None = vector("pref_vector")
    factor: str = choice("factor", "qr", ("qr", "gramian"))

    def _aggregate(self, jacobian, state, key):
        w = self._weights(jacobian)
        return Aggregation(combine(w, jacobian), w, state)

    def _weights(self, jacobian):
        m = num_objectives(jacobian)
        leaves = jax.tree_util.tree_leaves(jax.lax.stop_gradient(jacobian))
        n = sum(leaf[0].size for leaf in leaves)
        dtype = accumulation_dtype_of(*leaves)
        eps = jnp.finfo(dtype).eps
        if self.pref_vector is None:
            p = jnp.ones((m,), dtype)
        else:
            p = sized(self.pref_vector, m, dtype, "pref_vector")
        if self.factor == "qr":
            norms, inv_norm, S, V, keep = _unit_rows_spectrum_qr(leaves, dtype, n)
        else:
            # G from J scaled by a power of two if J J^T overflowed or underflowed (the weights
            # are scale-invariant)
            G, _ = gramian_in_range(*jax.lax.stop_gradient((jacobian, gramian(jacobian))))
            G = G.astype(dtype)
            norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
            inv_norm = _inverse_or_zero(norms)
            Gu = G * inv_norm[:, None] * inv_norm[None, :]
            lam, V = eigh(0.5 * (Gu + Gu.T))
            S = jnp.sqrt(jnp.maximum(lam, 0.0))
            # the eigenvalues of a rounded U U^T are accurate to about m eps max(lam) only
            rtol = max((max(m, n) * float(eps)) ** 2, m * float(eps))
            keep = lam > rtol * jnp.max(lam)
            # the weights' rounding is about eps cond(U U^T) on the kept part: where that is
            # above eps^(2/3), the factor's SVD instead (cond(U) only)
            smallest = jnp.min(jnp.where(keep, lam, jnp.inf))
            trusted = ~(eps * jnp.max(lam) > float(eps) ** (2 / 3) * smallest)
            norms, inv_norm, S, V, keep = jax.lax.cond(
                trusted,
                lambda: (norms, inv_norm, S, V, keep),
                lambda: _unit_rows_spectrum_qr(leaves, dtype, n),
            )
        # pinv(U) p = U^T alpha with alpha = V S^-2 V^T p (kept singular values)
        Sk = jnp.where(keep, S, 1.0)
        c = jnp.where(keep, V.T @ p, 0.0)
        alpha = V @ (c / (Sk * Sk))
        norm_d2 = jnp.sum((c / Sk) ** 2)  # |U^T alpha|^2
        defined = c @ c > max(m, n) * eps * (p @ p)  # p's share in the span of U's rows
        denom = jnp.sqrt(jnp.where(defined, norm_d2, 1.0))
        beta = jnp.where(defined, inv_norm * alpha, 0.0)  # J^T beta = U^T alpha
        # sum_i g_i . U^T alpha = sum_i |g_i| (U U^T alpha)_i, and U U^T alpha = V V^T p (kept)
        length = jnp.sum(norms * (V @ c)) / denom
        return length / denom * beta


def _unit_rows_spectrum_qr(leaves, dtype, n):
    """``(|g_i|, 1 / |g_i|, S, V, keep)``: the singular values and left singular vectors of the
    unit rows ``U`` from J's triangular factor (J scaled by a power of two), and the kept ones
    (``torch.linalg.pinv``'s cut-off, ``max(m, n) eps``)."""
    R, _ = triangular_factor(leaves, dtype)  # J^T = Q R
    m = R.shape[1]
    norms = jnp.sqrt(jnp.sum(R * R, axis=0))  # |g_i|
    inv_norm = _inverse_or_zero(norms)
    # U^T = Q R diag(1 / |g_i|): U's left singular vectors V and values S are those of
    # R diag(1 / |g_i|) on the right
    _, S, Vt = svd(R * inv_norm[None, :])
    keep = S > max(m, n) * jnp.finfo(dtype).eps * jnp.max(S)
    return norms, inv_norm, S, Vt.T, keep


def _inverse_or_zero(norms):
    """``1 / |g_i|``, 0 for a zero row (it stays 0 in U)."""
    return jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)


config = spelling(ConFIG, "config", reads="jacobian")

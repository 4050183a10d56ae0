"""ConFIG (Liu et al. 2024), computed in the Gramian: works on pytrees without concatenating."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._tree import combine, gramian, num_objectives
from .._typing import VectorLike
from ._abstract import AbstractAggregator, Aggregation, gramian_in_range
from ._fields import sized, spelling, vector


class ConFIG(AbstractAggregator):
    r"""ConFIG: with unit rows ``U = D^{-1} J`` (zero rows stay 0) and preference ``p`` (default
    ones), the direction ``u = pinv(U) p / |pinv(U) p|`` and the update ``(sum_i g_i . u) u``.

    Since ``pinv(U) p = U^T (U U^T)^+ p`` the update is ``J^T w`` with weights computed from the
    Gramian alone (the pseudo-inverse cut-off follows ``torch.linalg.pinv``: singular values below
    ``max(m, n) eps`` times the largest are dropped, or eigenvalues below ``m eps`` times the
    largest, whichever is larger). TorchJD needs the matrix; here a pytree Jacobian is fine.
    When ``p`` is orthogonal to the rows of ``U`` to rounding (``|pinv(U) p|^2 max eig(U U^T)``
    at most that cut-off times ``|p|^2``, e.g. rows ``+-q`` in equal numbers and ``p`` = ones),
    the direction is undefined (0 / 0) and the update is 0; TorchJD returns NaN or rounding
    noise divided by rounding noise there.

    Args:
        pref_vector: the preference ``p`` (default ones).

    Reference: Liu et al., "ConFIG: towards conflict-free training of physics informed neural
    networks", ICLR 2025.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> np.round(np.asarray(jd.config(J), float), 4)
    array([0.1588, 2.0706, 2.0706])
    """

    pref_vector: VectorLike | None = vector("pref_vector")

    def _aggregate(self, jacobian, state, key):
        w = self._weights(jacobian)
        return Aggregation(combine(w, jacobian), w, state)

    def _weights(self, jacobian):
        m = num_objectives(jacobian)
        n = sum(leaf[0].size for leaf in jax.tree_util.tree_leaves(jacobian))
        # ConFIG's weights are scale-invariant: G from J scaled by a power of two if J J^T
        # overflowed or underflowed
        G = gramian_in_range(*jax.lax.stop_gradient((jacobian, gramian(jacobian))))
        if self.pref_vector is None:
            p = jnp.ones((m,), G.dtype)
        else:
            p = sized(self.pref_vector, m, G.dtype, "pref_vector")
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
        inv_norm = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
        Gu = G * inv_norm[:, None] * inv_norm[None, :]
        lam, V = jnp.linalg.eigh(0.5 * (Gu + Gu.T))
        eps = jnp.finfo(G.dtype).eps
        rtol = jnp.maximum((max(m, n) * eps) ** 2, m * eps)
        keep = lam > rtol * jnp.max(lam)
        inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
        alpha = (V * inv[None, :]) @ (V.T @ p)
        norm_d2 = jnp.maximum(alpha @ Gu @ alpha, 0.0)
        # the share of p in the row space of U is at least |U^T alpha|^2 max(lam) / |p|^2
        defined = norm_d2 * jnp.max(lam) > rtol * (p @ p)
        denom = jnp.maximum(jnp.sqrt(norm_d2), 1e-12)
        beta = jnp.where(defined, inv_norm * alpha, 0.0)  # J^T beta = U^T alpha
        length = jnp.sum(G @ beta) / denom
        return length / denom * beta


config = spelling(ConFIG, "config", reads="jacobian")

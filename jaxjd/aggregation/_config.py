"""ConFIG (Liu et al. 2024), computed in the Gramian: works on pytrees without concatenating."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import combine, gramian, num_objectives
from ._base import Aggregator, as_static_vector, build_or_apply, vector_for


class ConFIG(Aggregator):
    r"""ConFIG: with unit rows ``U = D^{-1} J`` (zero rows stay 0) and preference ``p`` (default
    ones), the direction ``u = pinv(U) p / |pinv(U) p|`` and the update ``(sum_i g_i . u) u``.

    Since ``pinv(U) p = U^T (U U^T)^+ p`` the update is ``J^T w`` with weights computed from the
    Gramian alone (the pseudo-inverse cut-off follows ``torch.linalg.pinv``: singular values below
    ``max(m, n) eps`` times the largest are dropped, or eigenvalues below ``m eps`` times the
    largest, whichever is larger). TorchJD needs the matrix; here a pytree Jacobian is fine.
    """

    pref_vector: tuple[float, ...] | None = eqx.field(static=True)

    def __init__(self, pref_vector=None):
        self.pref_vector = as_static_vector(pref_vector, "pref_vector")

    def weights(self, jacobian, /, *, key=None):
        m = num_objectives(jacobian)
        n = sum(leaf[0].size for leaf in jax.tree_util.tree_leaves(jacobian))
        G = jax.lax.stop_gradient(gramian(jacobian))
        if self.pref_vector is None:
            p = jnp.ones((m,), G.dtype)
        else:
            p = vector_for(self.pref_vector, m, G.dtype, "pref_vector")
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
        inv_norm = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
        Gu = G * inv_norm[:, None] * inv_norm[None, :]
        lam, V = jnp.linalg.eigh(0.5 * (Gu + Gu.T))
        eps = jnp.finfo(G.dtype).eps
        rtol = jnp.maximum((max(m, n) * eps) ** 2, m * eps)
        keep = lam > rtol * jnp.max(lam)
        alpha = (V * jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)) @ (V.T @ p)
        norm_d = jnp.sqrt(jnp.maximum(alpha @ Gu @ alpha, 0.0))
        denom = jnp.maximum(norm_d, 1e-12)
        beta = inv_norm * alpha  # J^T beta = U^T alpha
        length = jnp.sum(G @ beta) / denom
        return length / denom * beta

    def __call__(self, jacobian, /, *, key=None):
        return combine(self.weights(jacobian), jacobian)


def config(jacobian=None, /, *, pref_vector=None):
    """ConFIG (Liu et al. 2024): ``config(J)`` returns the update, ``config(**hyper)`` a
    :class:`ConFIG`."""
    return build_or_apply(ConFIG(pref_vector), jacobian)

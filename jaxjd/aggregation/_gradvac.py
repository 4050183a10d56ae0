"""GradVac (Wang et al., ICLR 2021): gradient vaccine with EMA cosine targets, from the Gramian."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._typing import Scalar
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import as_dtype, number, spelling


class GradVacState(NamedTuple):
    """The EMA targets ``phi_hat`` (m x m, zeros at first; the diagonal is never used)."""

    targets: jax.Array


class GradVacWeighting(AbstractWeighting):
    r"""Weights of GradVac, from the Gramian alone.

    Each ``g_i`` is kept as coefficients ``c`` over the rows (``g_i^PC = J^T c``, ``c = e_i``).
    For the other rows ``j`` in a random order: ``phi = (G c)_j / (|g_i^PC| |g_j| + eps)``; if
    ``phi < phi_hat_ij``, ``c_j += |g_i^PC| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
    / (|g_j| sqrt(1 - phi_hat^2) + eps)``; then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``.
    The weights are ``sum_i c^(i)``. With zero targets (the first call) this is PCGrad.

    State: :class:`GradVacState`, m x m. The order comes from the PRNG ``key`` (one permutation
    per i); for m <= 2 it cannot matter and the key may be omitted. A ``lax.fori_loop`` over j,
    vmapped over i.

    Args:
        beta: the EMA rate of the cosine targets.
        eps: added to the norms' products.

    Reference: Wang et al., "Gradient vaccine: investigating and improving multi-task
    optimization in massively multilingual models", ICLR 2021.

    >>> import jax, jax.numpy as jnp, jaxjd as jd
    >>> weighting = jd.gradvac_weighting()
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> w, state = weighting.update(G, weighting.init(2), key=jax.random.key(0))
    >>> state.targets.shape
    (2, 2)
    """

    beta: Scalar = number("beta", 0.5, check="unit")
    eps: Scalar = number("eps", 1e-8, check="nonnegative")
    draws_key = True
    has_state = True

    def _init(self, m, dtype):
        return GradVacState(jnp.zeros((m, m), dtype))

    def _weigh(self, G, state, key):
        return self._weigh_at_scale(G, jnp.zeros((), G.dtype), state, key)

    def _weigh_at_scale(self, G, log2_t, state, key):
        # G is 2^log2_t times the true Gramian: the coefficients (ratios of norms) and the
        # cosine targets are scale-free once eps is taken at the same scale (eps t on the
        # products of norms, eps sqrt(t) on a norm).
        m = G.shape[0]
        dtype = state.targets.dtype
        G = G.astype(dtype)
        if key is None:
            if m > 2:
                raise ValueError("GradVac with m > 2 needs a PRNG key for its random task order.")
            key = jax.random.key(0)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
        beta, eps = as_dtype(self.beta, dtype), as_dtype(self.eps, dtype)
        log2_t = log2_t.astype(dtype)
        eps_prod, eps_norm = eps * jnp.exp2(log2_t), eps * jnp.exp2(log2_t / 2)

        def vaccinate(i, k, targets):
            order = jax.random.permutation(k, m)

            def body(t, carry):
                c, cG, phi_hat = carry
                j = order[t]
                other = j != i
                norm_i = jnp.sqrt(jnp.maximum(cG @ c, 0.0))
                phi = cG[j] / (norm_i * norms[j] + eps_prod)
                hat = phi_hat[j]
                root_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
                root_hat = jnp.sqrt(jnp.maximum(1.0 - hat * hat, 0.0))
                step = norm_i * (hat * root_phi - phi * root_hat) / (norms[j] * root_hat + eps_norm)
                step = jnp.where(other & (phi < hat), step, 0.0)
                c = c.at[j].add(step)
                cG = cG + step * G[j]
                phi_hat = phi_hat.at[j].set(jnp.where(other, (1 - beta) * hat + beta * phi, hat))
                return c, cG, phi_hat

            c0 = jax.nn.one_hot(i, m, dtype=dtype)
            c, _, phi_hat = jax.lax.fori_loop(0, m, body, (c0, G[i], targets))
            return c, phi_hat

        keys = jax.random.split(key, m)
        C, targets = jax.vmap(vaccinate)(jnp.arange(m), keys, state.targets)
        return jnp.sum(C, axis=0), GradVacState(targets)


class GradVac(GramianWeightedAggregator):
    """GradVac aggregator (stateful; TorchJD's ``GradVac``): ``state = agg.init(J)``, then
    ``update, state = agg.update(J, state, key=key)``."""

    weighting_class = GradVacWeighting


gradvac = spelling(GradVac, "gradvac", reads="jacobian")
gradvac_weighting = spelling(GradVacWeighting, "gradvac_weighting", reads="gramian")

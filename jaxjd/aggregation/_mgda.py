"""MGDA: the minimum-norm point of the convex hull of the gradients (Désidéri 2012)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ._base import GramianWeightedAggregator, Weighting, build_or_apply, check_positive


class MGDAWeighting(Weighting):
    r"""Weights of MGDA: ``argmin_{a in simplex} a^T G a`` by Frank–Wolfe (Algorithm 2 of Sener &
    Koltun 2018), exactly as TorchJD runs it: start at ``1/m``, move toward the vertex of
    smallest ``(G a)_t`` with the exact line-search step ``gamma``, stop when ``gamma < epsilon``
    or after ``max_iters`` iterations. A ``lax.while_loop``; weights are constants under
    differentiation.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.mgda_weighting()(G), float), 4)
    array([0.6, 0.4])
    """

    epsilon: float = eqx.field(static=True)
    max_iters: int = eqx.field(static=True)

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100):
        self.epsilon = check_positive(epsilon, "epsilon")
        if int(max_iters) != max_iters or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer; got {max_iters}.")
        self.max_iters = int(max_iters)

    def _weigh(self, gramian, key):
        m = check_gramian(gramian)
        G = jax.lax.stop_gradient(jnp.asarray(gramian, accumulation_dtype(gramian.dtype)))
        alpha0 = jnp.full((m,), 1.0 / m, G.dtype)

        def cond(state):
            _, it, gamma = state
            return (it < self.max_iters) & ~(gamma < self.epsilon)

        def body(state):
            alpha, it, _ = state
            G_alpha = G @ alpha
            t = jnp.argmin(G_alpha)
            a = alpha @ G[:, t]
            b = alpha @ G_alpha
            c = G[t, t]
            gamma = jnp.where(c <= a, 1.0, jnp.where(b <= a, 0.0, (b - a) / (b + c - 2 * a)))
            gamma = gamma.astype(G.dtype)
            e_t = jax.nn.one_hot(t, m, dtype=G.dtype)
            return (1 - gamma) * alpha + gamma * e_t, it + 1, gamma

        init = (alpha0, jnp.asarray(0), jnp.asarray(jnp.inf, G.dtype))
        alpha, _, _ = jax.lax.while_loop(cond, body, init)
        return alpha


class MGDA(GramianWeightedAggregator):
    """MGDA aggregator: ``J^T w`` with :class:`MGDAWeighting` weights."""

    weighting: MGDAWeighting

    def __init__(self, epsilon: float = 1e-3, max_iters: int = 100):
        self.weighting = MGDAWeighting(epsilon, max_iters)


def mgda(jacobian=None, /, *, epsilon=1e-3, max_iters=100):
    """MGDA (Désidéri 2012; Frank–Wolfe of Sener & Koltun 2018): ``mgda(J)`` returns the update,
    ``mgda(**hyper)`` a reusable :class:`MGDA`.

    Args:
        epsilon: stop when the Frank–Wolfe step falls below it.
        max_iters: iteration cap.
    """
    return build_or_apply(MGDA(epsilon, max_iters), jacobian)


def mgda_weighting(gramian=None, /, *, epsilon=1e-3, max_iters=100):
    """:class:`MGDAWeighting`: weights from a Gramian, or the weighting itself."""
    return build_or_apply(MGDAWeighting(epsilon, max_iters), gramian)

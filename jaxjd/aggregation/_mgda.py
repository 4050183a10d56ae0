"""MGDA: the minimum-norm point of the convex hull of the gradients (Désidéri 2012)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._typing import Scalar
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import as_dtype, choice, number, spelling, static_int


class MGDAWeighting(AbstractWeighting):
    r"""Weights of MGDA: ``argmin_{a in simplex} a^T G a`` by Frank–Wolfe (Algorithm 2 of Sener &
    Koltun 2018), exactly as TorchJD runs it: start at ``1/m``, move toward the vertex of
    smallest ``(G a)_t`` with the exact line-search step ``gamma``, stop when ``gamma < epsilon``
    or after ``max_iters`` iterations. A ``lax.while_loop``; weights are constants under
    differentiation.

    ``method="exact"`` solves the same problem exactly instead: with ``s >= 0`` solving
    ``min 1/2 s^T G s - 1^T s`` (a linear complementarity problem, ``G s >= 1`` with equality
    where ``s > 0``, solved by the QP layer's block principal pivoting on the equilibrated
    Gramian), ``a = s / sum(s)``, and ``J^T a`` is the minimum-norm point: ``g_i . d >= |d|^2``
    for every row, so the update conflicts with no objective. Frank–Wolfe stops at
    ``epsilon`` and is the default for parity with TorchJD; on ill-conditioned inputs (rows
    scaled 1e-8 and 1e8) its answer conflicts (cos(g_i, d) = -0.30) where the exact one does
    not. A weighting that is not finite (NaN) means the solve failed.

    ``normalizer`` (LibMTL's ``mgda_gn``) runs MGDA on the rows ``g_i / n_i`` and returns
    ``w_i = a_i / n_i``, so that ``J^T w`` is LibMTL's update: ``"l2"`` ``n_i = |g_i|`` (a zero
    row keeps ``n_i = 1``: the update is then 0, as without normalising); ``"loss"``
    ``n_i = L_i``; ``"loss+"`` ``n_i = L_i |g_i|``. The two loss normalisers read the losses
    (``losses=``; they must be positive, else the weights are NaN). ``"none"`` (default) is
    TorchJD's MGDA.

    Args:
        epsilon: stop when the Frank–Wolfe step falls below it.
        max_iters: iteration cap.
        method: ``"frank_wolfe"`` (default, TorchJD's) or ``"exact"``.
        normalizer: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"`` (LibMTL's).

    Reference: Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", C. R. Math. 2012; Sener & Koltun, NeurIPS 2018.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.mgda_weighting()(G), float), 4)
    array([0.6, 0.4])
    """

    epsilon: Scalar = number("epsilon", 1e-3, check="positive")
    max_iters: int = static_int("max_iters", 100)
    method: str = choice("method", "frank_wolfe", ("frank_wolfe", "exact"))
    normalizer: str = choice("normalizer", "none", ("none", "l2", "loss", "loss+"))

    @property
    def reads_losses(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.normalizer in ("loss", "loss+")

    @property
    def scale_degree(self) -> float:  # pyright: ignore[reportIncompatibleVariableOverride]
        # w(t G) = w(G), or t^(-1/2) w(G) when the weights are divided by the rows' norms
        return 0.0 if self.normalizer in ("none", "loss") else -0.5

    def _weigh(self, G, state, key, losses=None):
        n = None
        if self.normalizer in ("l2", "loss+"):
            norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
            n = jnp.where(norms > 0, norms, 1.0)
        if self.normalizer in ("loss", "loss+"):
            assert losses is not None  # update() refuses a call without them
            L = losses.astype(G.dtype)
            L = jnp.where(L > 0, L, jnp.nan)  # a non-positive loss cannot normalise
            n = L if n is None else n * L
        if n is not None:
            G = G / (n[:, None] * n[None, :])
        a = _exact_minimum_norm(G) if self.method == "exact" else self.minimum_norm(G)
        return (a if n is None else a / n), state

    def minimum_norm(self, G: Float[Array, "m m"]) -> Float[Array, " m"]:
        """The Frank–Wolfe loop on a prepared Gramian (also Nash-MTL's start certificate)."""
        m = G.shape[0]
        epsilon = as_dtype(self.epsilon, G.dtype)
        alpha0 = jnp.full((m,), 1.0 / m, G.dtype)

        def cond(state):
            _, it, gamma = state
            return (it < self.max_iters) & ~(gamma < epsilon)

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


def _exact_minimum_norm(G):
    """``argmin_{a in simplex} a^T G a`` through ``s = argmin_{s >= 0} 1/2 s^T G s - 1^T s``,
    ``a = s / sum(s)`` (``G s >= 1``, with equality on the support, makes ``J^T s`` a positive
    multiple of the minimum-norm point). Solved with ``s = D t`` on ``D G D`` (unit diagonal,
    ``D = diag(G)^{-1/2}``); a zero row puts 0 in the hull: all the weight goes on it."""
    from ..solvers._bpp import lcp

    m = G.shape[0]
    diag = jnp.diagonal(G)
    zero = ~(diag > 0)
    d = jnp.where(zero, 0.0, 1.0 / jnp.sqrt(jnp.where(zero, 1.0, diag)))
    Ge = G * d[:, None] * d[None, :] + jnp.diag(zero.astype(G.dtype))
    t, ok, _ = lcp(-d, Ge)
    s = d * t
    a = s / jnp.sum(s)
    first_zero = jax.nn.one_hot(jnp.argmax(zero), m, dtype=G.dtype)
    a = jnp.where(jnp.any(zero), first_zero, a)
    return jnp.where(ok | jnp.any(zero), a, jnp.nan)


class MGDA(GramianWeightedAggregator):
    """MGDA aggregator: ``J^T w`` with :class:`MGDAWeighting` weights (TorchJD's ``MGDA``).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> np.round(np.asarray(jd.mgda(jnp.array([[2.0, 0.0], [0.0, 2.0]])), float), 4)
    array([1., 1.])
    """

    weighting_class = MGDAWeighting


mgda = spelling(MGDA, "mgda", reads="jacobian")
mgda_weighting = spelling(MGDAWeighting, "mgda_weighting", reads="gramian")

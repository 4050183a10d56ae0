"""CAGrad (Liu et al., NeurIPS 2021, Algorithm 1), solved in-graph (no cvxpy)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ..solvers import normalize_regularize
from ._base import GramianWeightedAggregator, Weighting, build_or_apply, check_nonnegative


def project_onto_simplex(y):
    """Euclidean projection onto the probability simplex (sort-based, jit-friendly)."""
    m = y.shape[0]
    u = jnp.sort(y)[::-1]
    # Sequential partial sums (not a parallel prefix): the same rounding as a running sum.
    css = jax.lax.scan(lambda c, x: (c + x, c + x), jnp.zeros((), y.dtype), u)[1]
    k = jnp.arange(1, m + 1, dtype=y.dtype)
    ok = u - (css - 1.0) / k > 0
    rho = jnp.max(jnp.where(ok, jnp.arange(m), 0))
    theta = jnp.where(rho == m - 1, (jnp.sum(y) - 1.0) / m, (css[rho] - 1.0) / (rho + 1.0))
    return jnp.maximum(y - theta, 0.0)


def _project_onto_simplex_pairwise(y):
    """The same projection without a sort (slow in XLA on CPU): with ``S_i`` the sum and ``c_i``
    the number of entries ``>= y_i``, ``theta = max_i (S_i - 1) / c_i`` (the maximum of the
    sorted partial-sum criterion is reached at the end of a group of ties). O(m^2), vectorised."""
    ge = (y[None, :] >= y[:, None]).astype(y.dtype)
    theta = jnp.max((ge @ y - 1.0) / jnp.sum(ge, axis=1))
    return jnp.maximum(y - theta, 0.0)


class CAGradWeighting(Weighting):
    r"""Weights of CAGrad, as TorchJD computes them: with ``G_n = G / tr(G)`` (zeros when the
    trace is below ``norm_eps``), ``b = G_n 1/m`` and ``phi = c sqrt(1^T G_n 1) / m``, solve
    ``min_{w in simplex} b^T w + phi sqrt(w^T G_n w)``, then ``weights = 1/m + (phi / q) w`` with
    ``q = sqrt(w^T G_n w)`` (zeros when ``q < norm_eps``).

    The convex problem is solved by accelerated projected gradient on the simplex (FISTA with
    backtracking and adaptive restart; a sort-free O(m^2) projection) until the gradient mapping
    is below ``tol`` (default 1e-12 in float64, 1e-6 in float32) or its rounding floor, or
    ``max_iter`` iterations.
    """

    c: float = eqx.field(static=True)
    norm_eps: float = eqx.field(static=True)
    tol: float | None = eqx.field(static=True)
    max_iter: int = eqx.field(static=True)

    def __init__(self, c: float, norm_eps: float = 1e-4, tol=None, max_iter: int = 20_000):
        self.c = check_nonnegative(c, "c")
        self.norm_eps = check_nonnegative(norm_eps, "norm_eps")
        self.tol = tol
        self.max_iter = int(max_iter)

    def _weigh(self, gramian, key):
        m = check_gramian(gramian)
        G = jax.lax.stop_gradient(jnp.asarray(gramian, accumulation_dtype(gramian.dtype)))
        Gn = normalize_regularize(G, self.norm_eps, 0.0)
        ones = jnp.full((m,), 1.0 / m, G.dtype)
        b = Gn @ ones
        phi = self.c * jnp.sqrt(jnp.maximum(ones @ Gn @ ones, 0.0))
        tiny = jnp.finfo(G.dtype).tiny
        tol = self.tol if self.tol is not None else (1e-12 if G.dtype == jnp.float64 else 1e-6)

        def f(w):
            return b @ w + phi * jnp.sqrt(jnp.maximum(w @ Gn @ w, 0.0))

        def grad(w):
            q = jnp.sqrt(jnp.maximum(w @ Gn @ w, tiny))
            return b + phi * (Gn @ w) / q

        def cond(state):
            _, _, _, _, it, gap = state
            return (gap > tol) & (it < self.max_iter)

        def body(state):
            w, y, t, L, it, _ = state
            gy, fy = grad(y), f(y)

            def bt_cond(L):
                z = _project_onto_simplex_pairwise(y - gy / L)
                d = z - y
                return (f(z) > fy + gy @ d + 0.5 * L * d @ d + 1e-15 * jnp.abs(fy)) & (L < 1e30)

            L = jax.lax.while_loop(bt_cond, lambda L: 2.0 * L, L)
            w_new = _project_onto_simplex_pairwise(y - gy / L)
            restart = f(w_new) > f(w)
            t_new = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)))
            y_new = jnp.where(restart, w, w_new + ((t - 1.0) / t_new) * (w_new - w))
            w_new = jnp.where(restart, w, w_new)
            step = _project_onto_simplex_pairwise(w_new - grad(w_new) / L)
            gap = jnp.max(jnp.abs(w_new - step)) * L
            # The gradient mapping cannot fall below the rounding of the projection (an ulp of
            # w, times L): stop there too (float32 would otherwise run max_iter iterations).
            gap = jnp.where(gap <= 16 * jnp.finfo(G.dtype).eps * L, 0.0, gap)
            return w_new, y_new, jnp.where(restart, 1.0, t_new), 0.9 * L, it + 1, gap

        L0 = jnp.asarray(1.0, G.dtype)
        one = jnp.asarray(1.0, G.dtype)
        init = (ones, ones, one, L0, jnp.asarray(0), jnp.asarray(jnp.inf, G.dtype))
        w, *_ = jax.lax.while_loop(cond, body, init)
        q = jnp.sqrt(jnp.maximum(w @ Gn @ w, 0.0))
        ok = q >= self.norm_eps
        return jnp.where(ok, ones + (phi / jnp.where(ok, q, 1.0)) * w, 0.0)


class CAGrad(GramianWeightedAggregator):
    """CAGrad aggregator: ``J^T w`` with :class:`CAGradWeighting` weights."""

    weighting: CAGradWeighting

    def __init__(self, c: float, norm_eps: float = 1e-4, tol=None, max_iter: int = 20_000):
        self.weighting = CAGradWeighting(c, norm_eps, tol, max_iter)


def cagrad(jacobian=None, /, *, c, norm_eps=1e-4, tol=None, max_iter=20_000):
    """CAGrad (Liu et al. 2021): ``cagrad(J, c=0.5)`` returns the update, ``cagrad(c=0.5)`` a
    :class:`CAGrad`."""
    return build_or_apply(CAGrad(c, norm_eps, tol, max_iter), jacobian)


def cagrad_weighting(gramian=None, /, *, c, norm_eps=1e-4, tol=None, max_iter=20_000):
    """:class:`CAGradWeighting`: weights from a Gramian, or the weighting itself."""
    return build_or_apply(CAGradWeighting(c, norm_eps, tol, max_iter), gramian)

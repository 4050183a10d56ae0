"""FairGrad (Ban & Ji, ICML 2024): alpha-fair weights, solved in-graph by damped Newton."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.core import Tracer

from .._linalg import power_of_two_scaled
from .._spmd import solve
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import spelling, static_int, static_tol


def _alpha(value):
    if isinstance(value, Tracer):
        raise TypeError("FairGrad's alpha sets the form of the problem: it must be concrete.")
    if not float(value) >= 0:
        raise ValueError(f"alpha must be >= 0; got {value}.")
    return float(value)


class FairGradWeighting(AbstractWeighting):
    r"""Weights of FairGrad: the positive solution of ``G x = x^{-1/alpha}`` (element-wise), so
    that ``g_i . d = x_i^{-1/alpha} > 0`` for every objective (non-conflicting). ``alpha = 0`` gives
    the uniform ``1/m``.

    The solution minimises the convex ``phi(x) = x^T G x / 2 - sum_i h(x_i)`` over ``x > 0``
    (``h = log`` for ``alpha = 1``, ``h(t) = t^{1 - 1/alpha} / (1 - 1/alpha)`` otherwise),
    written in ``y = x / d`` with ``d_i = G_ii^{-1/2}`` (the rows at unit norm, so that rows of
    any spread of norms stay in float32's reach): Newton steps, a fraction-to-the-boundary rule
    and backtracking to Armijo's decrease or a shorter gradient, from the minimiser of ``phi``
    on the ray of ``1/m``, until the rows' residual ``|d_i ((G x)_i - x_i^{-1/alpha})|`` is at
    most ``tol`` relative to its largest term, a step below the dtype's precision, or
    ``max_iters`` Newton steps (TorchJD uses scipy's least squares).
    When no positive solution exists (a positive ``v`` with ``J^T v = 0``, e.g. ``J = 0``),
    ``phi`` is unbounded below; the iterate after ``max_iters`` steps (or the last finite one)
    is returned: finite, positive, and large.

    The solve runs on ``G_s = 2^-e G``, scaled by a power of two (exact) so that its largest
    entry is about 1, and ``x(G) = 2^(e p) x(G_s)`` (``p = -alpha / (alpha + 1)``; exact for
    ``alpha = 1``, one rounding otherwise); a Gramian whose largest entry is not 0 but below
    ``tiny / eps`` (9.9e-32 in float32, 2.0e-292 in float64) has lost precision (its products
    were subnormal) and gives NaN.

    Args:
        alpha: the fairness exponent (static: it sets the form of the problem; 0 gives the mean,
            1 proportional fairness).
        max_iters: Newton steps at most.
        tol: relative residual to stop at (default 1e-12 in float64, 1e-6 in float32).

    Reference: Ban & Ji, "Fair resource allocation in multi-task learning", ICML 2024.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.fairgrad_weighting(G, alpha=1.0), float), 4)
    array([0.5915, 0.4071])
    """

    alpha: float = eqx.field(static=True, converter=_alpha)
    max_iters: int = static_int("max_iters", 100)
    tol: float | None = static_tol("tol")

    @property
    def scale_degree(self) -> float:  # pyright: ignore[reportIncompatibleVariableOverride]
        # x(t G) = t^p x(G) with p = -alpha / (alpha + 1): then
        # t G (t^p x) = t^(1 + p) G x and (t^p x)^(-1/alpha) = t^(-p / alpha) x^(-1/alpha) agree
        return -self.alpha / (self.alpha + 1.0)

    def _weigh(self, G, state, key):
        G, e, usable = power_of_two_scaled(G, even=True)
        x = self._solve(G)
        # x(2^e G_s) = 2^(e p) x(G_s): a power of two times exp2 of the fractional part
        ep = e.astype(G.dtype) * self.scale_degree
        whole = jnp.floor(ep)
        x = jnp.ldexp(x * jnp.exp2(ep - whole), whole.astype(e.dtype))
        return jnp.where(usable, x, jnp.nan), state

    def _solve(self, G):
        m = G.shape[0]
        uniform = jnp.full((m,), 1.0 / m, G.dtype)
        if self.alpha == 0:
            return uniform
        a = self.alpha
        tol = self.tol if self.tol is not None else (1e-12 if G.dtype == jnp.float64 else 1e-6)
        # Solved in y = x / d, d_i = 1 / sqrt(G_ii) (1 for a zero row): the gradients at unit
        # norm, C = D G D with unit diagonal. phi(D y) = y^T C y / 2 - sum_i c_i h(y_i) + const
        # with c_i = d_i^(1 - 1/alpha) (1 for alpha = 1), so the same problem, but Newton's
        # Hessian no longer carries the spread of the rows' norms (rows of norms 1e-8 and 1e8:
        # cond 1e32, float32's update 0.8 from float64's).
        diag = jnp.diagonal(G)
        d = jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
        C = G * d[:, None] * d[None, :]
        c = jnp.ones_like(d) if a == 1 else d ** (1 - 1 / a)

        def power(y):
            return c * y ** (-1.0 / a)

        def phi(y):
            h = jnp.log(y) if a == 1 else y ** (1 - 1 / a) / (1 - 1 / a)
            return 0.5 * y @ C @ y - c @ h

        def residual(y):
            p = power(y)
            return jnp.max(jnp.abs(C @ y - p)) / jnp.maximum(jnp.max(p), 1e-300)

        def cond(state):
            _, it, res = state
            return (res > tol) & (it < self.max_iters)

        def body(state):
            y, it, _ = state
            grad = C @ y - power(y)
            hess = C + jnp.diag(power(y) / (a * y))
            step = -solve(hess, grad)
            ratio = jnp.where(step < 0, -y / jnp.where(step < 0, step, -1.0), jnp.inf)
            t0 = jnp.minimum(1.0, 0.99 * jnp.min(ratio))
            f0 = phi(y)
            slope = grad @ step
            size = jnp.linalg.norm(grad)

            # Armijo on phi, or a shorter gradient: near the solution phi's decrease is below
            # its rounding in float32 (the search shrank a step of residual 3e-4 to 2e-3 and
            # the solve stopped 1e-4 from float64's answer), where Newton's full step still
            # shortens the gradient.
            def ls_cond(t):
                new = y + t * step
                armijo = phi(new) <= f0 + 1e-4 * t * slope
                shorter = jnp.linalg.norm(C @ new - power(new)) <= (1 - 1e-4 * t) * size
                return ~armijo & ~shorter & (t > 1e-12)

            t = jax.lax.while_loop(ls_cond, lambda t: 0.5 * t, t0)
            new = y + t * step
            res = residual(new)
            # Diverging (no positive root): keep the last finite iterate and stop.
            ok = jnp.all(jnp.isfinite(new)) & jnp.isfinite(res) & jnp.isfinite(phi(new))
            # Stagnating at the dtype's precision (a float32 residual cannot always reach tol):
            # stop too.
            moved = jnp.max(jnp.abs(t * step)) > 4 * jnp.finfo(G.dtype).eps * jnp.max(jnp.abs(y))
            y = jnp.where(ok, new, y)
            it = jnp.where(ok & moved, it + 1, self.max_iters)
            return y, it, jnp.where(ok, res, residual(y))

        # Start on the ray of 1/m at the minimiser of phi along it:
        # s^(1 + 1/alpha) = sum_i c_i u_i^(1 - 1/alpha) / u^T C u.
        curvature = uniform @ C @ uniform
        scale = (c @ uniform ** (1 - 1 / a) / jnp.where(curvature > 0, curvature, 1.0)) ** (
            1 / (1 + 1 / a)
        )
        start = jnp.where((curvature > 0) & jnp.isfinite(scale), scale * uniform, uniform)
        y, _, _ = jax.lax.while_loop(cond, body, (start, jnp.asarray(0), residual(start)))
        return d * y


class FairGrad(GramianWeightedAggregator):
    """FairGrad aggregator: ``J^T w`` with :class:`FairGradWeighting` weights (TorchJD's
    ``FairGrad``)."""

    weighting_class = FairGradWeighting


fairgrad = spelling(FairGrad, "fairgrad", reads="jacobian")
fairgrad_weighting = spelling(FairGradWeighting, "fairgrad_weighting", reads="gramian")

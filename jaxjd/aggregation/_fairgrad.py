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
    (``h = log`` for ``alpha = 1``, ``h(t) = t^{1 - 1/alpha} / (1 - 1/alpha)`` otherwise): Newton
    steps with the Hessian ``G + diag(x^{-1/alpha - 1}) / alpha``, a fraction-to-the-boundary rule
    and Armijo backtracking, from the minimiser of ``phi`` on the ray of ``1/m``, until
    ``|G x - x^{-1/alpha}|_inf <= tol`` relative to ``max(x^{-1/alpha})``, a step below the
    dtype's precision, or ``max_iters`` Newton steps (TorchJD uses scipy's least squares).
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

        def power(x):
            return x ** (-1.0 / a)

        def phi(x):
            h = jnp.log(x) if a == 1 else x ** (1 - 1 / a) / (1 - 1 / a)
            return 0.5 * x @ G @ x - jnp.sum(h)

        def residual(x):
            r = G @ x - power(x)
            return jnp.max(jnp.abs(r)) / jnp.maximum(jnp.max(power(x)), 1e-300)

        def cond(state):
            _, it, res = state
            return (res > tol) & (it < self.max_iters)

        def body(state):
            x, it, _ = state
            grad = G @ x - power(x)
            hess = G + jnp.diag(power(x) / (a * x))
            d = -solve(hess, grad)
            ratio = jnp.where(d < 0, -x / jnp.where(d < 0, d, -1.0), jnp.inf)
            t0 = jnp.minimum(1.0, 0.99 * jnp.min(ratio))
            f0 = phi(x)
            slope = grad @ d

            def ls_cond(t):
                return (phi(x + t * d) > f0 + 1e-4 * t * slope) & (t > 1e-12)

            t = jax.lax.while_loop(ls_cond, lambda t: 0.5 * t, t0)
            new = x + t * d
            res = residual(new)
            # Diverging (no positive root): keep the last finite iterate and stop.
            ok = jnp.all(jnp.isfinite(new)) & jnp.isfinite(res) & jnp.isfinite(phi(new))
            # Stagnating at the dtype's precision (a float32 residual cannot always reach tol):
            # stop too.
            moved = jnp.max(jnp.abs(t * d)) > 4 * jnp.finfo(G.dtype).eps * jnp.max(jnp.abs(x))
            x = jnp.where(ok, new, x)
            it = jnp.where(ok & moved, it + 1, self.max_iters)
            return x, it, jnp.where(ok, res, residual(x))

        # Start on the ray of 1/m at the minimiser of phi along it:
        # s^(1 + 1/alpha) = sum(u^(1 - 1/alpha)) / u^T G u.
        curvature = uniform @ G @ uniform
        scale = (jnp.sum(uniform ** (1 - 1 / a)) / jnp.where(curvature > 0, curvature, 1.0)) ** (
            1 / (1 + 1 / a)
        )
        start = jnp.where((curvature > 0) & jnp.isfinite(scale), scale * uniform, uniform)
        x, _, _ = jax.lax.while_loop(cond, body, (start, jnp.asarray(0), residual(start)))
        return x


class FairGrad(GramianWeightedAggregator):
    """FairGrad aggregator: ``J^T w`` with :class:`FairGradWeighting` weights (TorchJD's
    ``FairGrad``)."""

    weighting_class = FairGradWeighting


fairgrad = spelling(FairGrad, "fairgrad", reads="jacobian")
fairgrad_weighting = spelling(FairGradWeighting, "fairgrad_weighting", reads="gramian")

"""MGDA: the minimum-norm point of the convex hull of the gradients (Désidéri 2012)."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._linalg import power_of_two_scaled
from .._spmd import cho_solve, cholesky_lower
from .._tree import check_gramian
from .._typing import Scalar
from ._abstract import (
    AbstractWeighting,
    GramianWeightedAggregator,
    _checked_losses,
    _prepared,
)
from ._fields import as_dtype, choice, number, spelling, static_int

# The certificate's constants, in units of the dtype's eps: every entry of G (and the update
# J^T w) may be off by _ROUNDING eps |g_i| |g_j| (their rounding), and a row may meet the update
# at cos(g_i, d) >= -_CONFLICT eps. Interior-point steps: 16 (float32) and 22 (float64) reached
# optimality to rounding on every Jacobian family at m = 4 .. 256 (jaxjd._families, TorchJD's
# matrices, rows scaled 1e-8 .. 1e8, Gramians of condition 1e12 and 1e24); a margin on top.
_ROUNDING = 4.0
_CONFLICT = 32.0
_STEPS = {32: 20, 64: 30}


class MGDAInfo(NamedTuple):
    """What :meth:`MGDAWeighting.solve` reports with the solver's weights ``a`` (``d = J^T a``,
    ``S = sum_j a_j |g_j|``; ``k = 4``, ``c = 32``; eps the dtype's).

    Attributes:
        usable: ``G`` has full precision: ``max |G_ij|`` is 0 or at least ``tiny / eps``.
        converged: the solve met its own test. Exact: ``a`` is the minimum-norm point to
            rounding, ``(G a)_i >= a^T G a - k eps |g_i| S`` for every i. Frank–Wolfe: its
            step fell below ``epsilon`` before ``max_iters`` iterations.
        stationary: ``|d|^2 <= k eps S max(S, |g_i|)`` over the rows i that carry weight: 0
            is in the convex hull to the rounding of ``a^T G a`` and of those rows'
            ``(G a)_i`` (a Pareto-stationary point); the exact method's weights are then 0.
        certified: no row conflicts with ``d`` beyond the dtype's accuracy:
            ``(G a)_i >= eps |g_i| (k S - c |d|)`` for every i, so that
            ``g_i . d >= -c eps |g_i| |d|`` when G's entries are within ``k eps |g_i| |g_j|``.
        iterations: interior-point steps (a fixed number) or Frank–Wolfe iterations.
        min_cosine: ``min_i cos(g_i, d)`` over the non-zero rows, from ``G`` (0 where d = 0).
    """

    usable: Bool[Array, ""]
    converged: Bool[Array, ""]
    stationary: Bool[Array, ""]
    certified: Bool[Array, ""]
    iterations: Int[Array, ""]
    min_cosine: Float[Array, ""]


class MGDAWeighting(AbstractWeighting):
    r"""Weights of MGDA: the minimum-norm point ``a = argmin_{a in simplex} a^T G a``, so that
    ``d = J^T a`` is the shortest vector in the convex hull of the gradients and
    ``g_i . d >= |d|^2`` for every row: the update conflicts with no objective.

    ``method="exact"`` (default) solves it with a primal-dual interior-point method (Mehrotra's
    predictor-corrector, Nocedal & Wright 2006, ch. 16.6) on the equilibrated Gramian
    ``D G D`` (``D = diag(G)^{-1/2}``): a fixed number of steps (20 in float32, 30 in float64),
    each one Cholesky factorisation, no data-dependent loop. The answer is then certified:
    with ``S = sum_j a_j |g_j|`` and the dtype's eps, ``(G a)_i >= eps |g_i| (4 S - 32 |d|)``
    for every row (no row meets ``d`` at a cosine below ``-32 eps`` even when every entry of
    ``G`` is off by ``4 eps |g_i| |g_j|``, its rounding). Where ``|d|^2 <= 4 eps S max(S, |g_i|)``
    over the rows that carry weight (0 is in the convex hull to the rounding of ``G``:
    Pareto-stationary) the weights are 0: the update
    0 conflicts with nothing. Otherwise an answer that is not certified, or not optimal to
    rounding, gives NaN; :meth:`solve` says why (:class:`MGDAInfo`). In float32 that happens
    where the rows conflict beyond what float32 resolves (``S / |d|`` of order 1e3 and rows of
    very different norms).

    ``method="frank_wolfe"`` is TorchJD's MGDA (Algorithm 2 of Sener & Koltun 2018), for parity:
    start at ``1/m``, move toward the vertex of smallest ``(G a)_t`` with the exact line-search
    step ``gamma``, stop when ``gamma < epsilon`` or after ``max_iters`` iterations. Capped,
    it can return a conflicting direction: ``cos(g_i, d) = -0.16`` on a 64 x 64 Jacobian of
    condition 1e12, -0.57 on rows scaled 1e-8 and 1e8.

    A Gramian whose largest entry is not 0 but below ``tiny / eps`` (9.9e-32 in float32,
    2.0e-292 in float64) has lost precision (its products were subnormal): NaN, with either
    method. Otherwise ``G`` is first scaled by a power of two (exact), so the weights do not
    depend on its scale.

    ``normalizer`` (LibMTL's ``mgda_gn``) runs MGDA on the rows ``g_i / n_i`` and returns
    ``w_i = a_i / n_i``, so that ``J^T w`` is LibMTL's update: ``"l2"`` ``n_i = |g_i|`` (a zero
    row keeps ``n_i = 1``: the update is then 0, as without normalising); ``"loss"``
    ``n_i = L_i``; ``"loss+"`` ``n_i = L_i |g_i|``. The two loss normalisers read the losses
    (``losses=``; they must be positive, else the weights are NaN; and NaN where every
    weight would be below the dtype's normal range, e.g. float32 losses of 1e30 on gradients of
    norm 1e15, where float64's weights are 3e-47). ``"none"`` (default) is
    MGDA itself. Weights are constants under differentiation.

    Args:
        epsilon: Frank–Wolfe stops when its step falls below it.
        max_iters: Frank–Wolfe's iteration cap.
        method: ``"exact"`` (default) or ``"frank_wolfe"`` (TorchJD's).
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
    method: str = choice("method", "exact", ("exact", "frank_wolfe"))
    normalizer: str = choice("normalizer", "none", ("none", "l2", "loss", "loss+"))

    @property
    def reads_losses(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.normalizer in ("loss", "loss+")

    @property
    def scale_degree(self) -> float:  # pyright: ignore[reportIncompatibleVariableOverride]
        # w(t G) = w(G), or t^(-1/2) w(G) when the weights are divided by the rows' norms
        return 0.0 if self.normalizer in ("none", "loss") else -0.5

    def _weigh(self, G, state, key, losses=None):
        a, info = self._solve(G, losses)
        if self.method == "exact":  # 0 at a stationary point, else certified or NaN
            a = jnp.where(info.converged & info.certified, a, jnp.nan)
            a = jnp.where(info.stationary, jnp.zeros_like(a), a)
        return jnp.where(info.usable, a, jnp.nan), state

    def solve(
        self, gramian: Float[Array, "m m"], /, *, losses: Float[Array, " m"] | None = None
    ) -> tuple[Float[Array, " m"], MGDAInfo]:
        """The solver's weights (on the simplex, divided by the normaliser's ``n``, also where
        calling the weighting gives NaN or 0) and :class:`MGDAInfo`: why the weighting gives
        what it gives."""
        check_gramian(gramian)
        losses = _checked_losses(self, losses, jnp.shape(gramian)[0])
        return _solve_jit(self, gramian, losses)

    def _solve(self, G, losses=None):
        # Scaled by a power of two, even so that the normalised weights (degree -1/2) scale
        # back exactly: G = 2^e G_s.
        G, e, usable = power_of_two_scaled(G, even=True)
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
            # n = 2^k n' with max n' in [1/2, 1): the normalised Gramian at a power-of-two scale
            # (the minimum-norm weights ignore it; G / (n n^T) underflowed float32 for losses of
            # 1e30), and w = 2^-k a / n' below
            top = jnp.max(n)
            _, k = jnp.frexp(jnp.where(jnp.isfinite(top), top, 1.0))
            n = jnp.ldexp(n, -k)
            G = G / n[:, None] / n[None, :]
        if self.method == "exact":
            a = _exact_minimum_norm(G)
            info = _checked(G, a, _STEPS[jnp.finfo(G.dtype).bits], usable)
        else:
            a, iterations, stopped = self._frank_wolfe(G)
            info = _checked(G, a, iterations, usable)._replace(converged=stopped)
        if n is not None:
            a = a / n
            # w(G) = 2^(-e/2) w(G_s) (e even: exact) for the normalisers of degree -1/2
            shift = k + (e // 2 if self.scale_degree else 0)
            # weights the dtype cannot hold (all below its normal range: float32 losses of 1e30
            # on gradients of 1e15) would be 0 and so would the update: NaN instead
            top = jnp.max(a)
            under = (top > 0) & (jnp.ldexp(top, -shift) < jnp.finfo(a.dtype).tiny)
            a = jnp.where(under, jnp.nan, jnp.ldexp(a, -shift))
        return a, info

    def minimum_norm(self, G: Float[Array, "m m"]) -> Float[Array, " m"]:
        """The Frank–Wolfe loop on a prepared Gramian (also Nash-MTL's start certificate)."""
        return self._frank_wolfe(G)[0]

    def _frank_wolfe(self, G):
        """``(alpha, iterations, stopped)``: TorchJD's loop; ``stopped`` when its step fell
        below ``epsilon`` before the cap."""
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
        alpha, it, gamma = jax.lax.while_loop(cond, body, init)
        return alpha, it, gamma < epsilon


def _solve(weighting, gramian, losses):
    with jax.default_matmul_precision("highest"):
        G = _prepared(gramian)
        losses = None if losses is None else jax.lax.stop_gradient(jnp.asarray(losses))
        return weighting._solve(G, losses)


_solve_jit = eqx.filter_jit(_solve)


def _wide_product(G, a):
    """``G a`` rounded once from a wider computation in float32 (see the QP layer's
    ``_residual_wide``), plainly in float64."""
    if G.dtype == jnp.float64:
        return G @ a
    from ..solvers._bpp import _residual_wide

    return _residual_wide(G, a, jnp.zeros_like(a))


def _checked(G, a, iterations, usable):
    """The tests of :class:`MGDAInfo` on the weights ``a`` of ``G``."""
    eps = jnp.finfo(G.dtype).eps
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
    r = _wide_product(G, a)  # (G a)_i = g_i . d
    q2 = a @ r  # |d|^2
    q = jnp.sqrt(jnp.maximum(q2, 0.0))
    S = a @ norms
    slack = _ROUNDING * eps * norms * S
    converged = jnp.all(r - q2 >= -slack) & jnp.all(jnp.isfinite(a))
    # 0 in the hull to rounding: |d|^2 within the rounding of a^T G a (k eps S^2) or of the
    # (G a)_i of a row that carries weight (k eps |g_i| S), where (G a)_i >= |d|^2 is all the
    # optimum says (float32, rows of norms 0.85 and 0.45 near their Pareto set: |d|^2 = 2.2e-7
    # was above the first, 1.7e-7, and below the second, 2.4e-7: neither 0 nor certified)
    carried = jnp.max(jnp.where(a > jnp.sqrt(eps) * jnp.max(a), norms, 0.0))
    stationary = (q2 <= _ROUNDING * eps * S * jnp.maximum(S, carried)) & (S > 0)
    certified = jnp.all(r >= slack - _CONFLICT * eps * norms * q)
    rows = norms > 0
    cosine = jnp.where(rows, r / jnp.where(rows, norms * q, 1.0), jnp.inf)
    min_cosine = jnp.where(q > 0, jnp.min(cosine), 0.0)
    iterations = jnp.asarray(iterations, jnp.int32)
    return MGDAInfo(usable, converged, stationary, certified, iterations, min_cosine)


def _exact_minimum_norm(G):
    """``argmin_{a in simplex} a^T G a``: in the variables ``x = D^{-1} a`` (up to a positive
    factor), with ``D = diag(G)^{-1/2}``, the problem ``min 1/2 x^T Q x`` over ``x >= 0``,
    ``b^T x = 1`` with ``Q = D G D`` (unit diagonal) and ``b`` proportional to ``diag(D)``;
    ``a = D x / sum(D x)``. A zero row puts 0 in the hull: all the weight goes on it."""
    m = G.shape[0]
    diag = jnp.diagonal(G)
    zero = ~(diag > 0)
    d = jnp.where(zero, 0.0, 1.0 / jnp.sqrt(jnp.where(zero, 1.0, diag)))
    Q = G * d[:, None] * d[None, :] + jnp.diag(zero.astype(G.dtype))
    b = jnp.where(zero, 1.0, d)
    x = _interior_point(Q, b / jnp.max(b), _STEPS[jnp.finfo(G.dtype).bits])
    s = d * x
    a = s / jnp.sum(s)
    first_zero = jax.nn.one_hot(jnp.argmax(zero), m, dtype=G.dtype)
    return jnp.where(jnp.any(zero), first_zero, a)


def _interior_point(Q, b, steps):
    """``argmin 1/2 x^T Q x`` over ``x >= 0``, ``b^T x = 1`` (``b > 0``, ``Q`` PSD): Mehrotra's
    predictor-corrector (Nocedal & Wright, "Numerical Optimization", 2006, alg. 16.4) for the
    conditions ``Q x - y b - z = 0``, ``b^T x = 1``, ``x z = 0``, from ``x = 1 / sum(b)``, in
    ``steps`` steps. Each step factors ``Q + diag(z / x)`` once (equilibrated, with an
    ``m eps`` ridge: Q may be singular) for both of its solves; one common step length keeps
    ``x, z > 0`` (a fraction 0.99 of the way to the boundary). A step that would leave that
    region or produce a non-finite number is not taken (once converged, ``z / x`` spans more
    than the dtype's range). Every iterate ``x > 0`` stands for a feasible point: the one of least
    objective plus violation of optimality is returned (in float32, Newton steps past
    convergence on a singular ``Q`` moved ``|d|^2`` from 3e-15 back to 5e-6 by the 20th step).
    """
    m = Q.shape[0]
    dtype = Q.dtype
    ridge = m * jnp.finfo(dtype).eps * jnp.eye(m, dtype=dtype)
    x = jnp.full((m,), 1.0, dtype) / jnp.sum(b)
    z = jnp.full((m,), 1.0, dtype) * jnp.max(jnp.abs(Q @ x))
    y = jnp.zeros((), dtype)

    def longest(v, dv):  # the largest alpha with v + alpha dv >= 0
        return jnp.min(jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1.0), jnp.inf))

    def step(_, state):
        x, y, z = state
        r_dual = Q @ x - y * b - z
        r_primal = b @ x - 1.0
        mu = x @ z / m
        H = Q + jnp.diag(z / x)
        s = 1.0 / jnp.sqrt(jnp.diagonal(H))
        chol = cholesky_lower(H * s[:, None] * s[None, :] + ridge)

        def solve(v):  # H^{-1} v, v of shape (m,) or (m, k)
            scale = s if v.ndim == 1 else s[:, None]
            return scale * cho_solve(chol, scale * v)

        def direction(Hb, Hr):  # the Newton step from H^{-1} b and H^{-1} (-r_dual - r_comp / x)
            dy = (-r_primal - b @ Hr) / (b @ Hb)
            dx = Hr + dy * Hb
            return dx, dy

        # predictor (affine scaling: r_comp = x z) and H^{-1} b in one solve
        Hb, Hr = solve(jnp.stack([b, -r_dual - z], axis=1)).T
        dx, dy = direction(Hb, Hr)
        dz = -z - z * dx / x
        alpha = jnp.minimum(1.0, jnp.minimum(longest(x, dx), longest(z, dz)))
        sigma = ((x + alpha * dx) @ (z + alpha * dz) / m / mu) ** 3
        # corrector, centred: r_comp = x z + dx dz - sigma mu
        r_comp = x * z + dx * dz - sigma * mu
        dx, dy = direction(Hb, solve(-r_dual - r_comp / x))
        dz = (-r_comp - z * dx) / x
        alpha = jnp.minimum(1.0, 0.99 * jnp.minimum(longest(x, dx), longest(z, dz)))
        new = (x + alpha * dx, y + alpha * dy, z + alpha * dz)
        ok = jnp.all(new[0] > 0) & jnp.all(new[2] > 0) & jnp.isfinite(new[1])
        ok = ok & jnp.all(jnp.isfinite(new[0])) & jnp.all(jnp.isfinite(new[2]))
        return tuple(jnp.where(ok, n, o) for n, o in zip(new, (x, y, z)))

    def merit(x):
        # x / b^T x is feasible: its objective f plus its largest violation of the optimality
        # condition Q x - f b >= 0 (with equality on the support: x^T (Q x - f b) = 0 holds
        # for every x, so Q x - f b >= 0 is all that optimality asks)
        x = x / (b @ x)
        Qx = Q @ x
        f = x @ Qx
        return f + jnp.maximum(jnp.max(f * b - Qx), 0.0)

    def kept(i, state):  # a step, and the best iterate so far (the later one at a tie)
        state, best, lowest = step(i, state[0]), state[1], state[2]
        value = merit(state[0])
        better = value <= lowest
        return state, jnp.where(better, state[0], best), jnp.where(better, value, lowest)

    return jax.lax.fori_loop(0, steps, kept, ((x, y, z), x, merit(x)))[1]


class MGDA(GramianWeightedAggregator):
    """MGDA aggregator: ``J^T w`` with :class:`MGDAWeighting` weights (TorchJD's ``MGDA`` is
    ``MGDA(method="frank_wolfe")``).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> np.round(np.asarray(jd.mgda(jnp.array([[2.0, 0.0], [0.0, 2.0]])), float), 4)
    array([1., 1.])
    """

    weighting_class = MGDAWeighting


mgda = spelling(MGDA, "mgda", reads="jacobian")
mgda_weighting = spelling(MGDAWeighting, "mgda_weighting", reads="gramian")

"""PCD, Priority-Constrained Descent (TMLR 2026, arXiv 2606.29521): follow the primary gradient
(row 0) as closely as possible while every secondary objective keeps a fraction ``tau`` of its
normalised first-order progress."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, Float

from .._spmd import qr, solve, solve_upper
from .._typing import Scalar, VectorLike
from ._abstract import AbstractWeighting
from ._factored import FactorWeightedAggregator
from ._fields import as_dtype, choice, number, spelling


class PCDState(NamedTuple):
    """EMA of the squared gradient norms (m,) and the number of steps taken (for debiasing)."""

    sq_norm_ema: jax.Array
    count: jax.Array


def solve_priority_qp(
    G: Float[Array, "m m"],
    taus: Float[Array, " m-1"],
    *,
    tol: float = 1e-9,
    dependence_tol: float = 1e-9,
    max_iter: int | None = None,
    factor: Float[Array, "m m"] | None = None,
) -> Float[Array, " m"]:
    r"""``min_d 1/2 |d - g_1|^2`` s.t. ``g_j . d >= tau_j |g_j|^2`` (j >= 2), from the Gramian of
    ``g_1..g_m``: the dual active-set method of Goldfarb and Idnani (1983) for an identity
    Hessian, so that ``d = g_1 + sum_j mu_j g_j`` at every iteration. Returns ``[1, mu]`` (the
    KKT multipliers), or ``e_1`` when the constraints are infeasible.

    Fixed shapes: the active set is a mask, and each step solves the masked system
    ``(G_AA + I_{not A}) r = G_Ap`` (one ``lax.while_loop`` of at most ``max_iter = 10 m``
    add/drop steps). A constraint counts as satisfied within ``tol * max diag(G)``; a gradient as
    dependent on the active ones when its orthogonal part has squared norm at most
    ``dependence_tol`` times its own.

    With ``factor`` (``R`` with ``R^T R = G``, e.g. J's triangular factor), each step is the
    least-squares problem ``min |R_A r - R_p|`` (a QR of the masked columns) and the orthogonal
    part is its residual: the rounding is ``cond(R_A)``'s, where the system on ``G`` has its
    square and ``G_pp - G_pA r`` cancels (its squared norm is then known to about ``eps^2``
    of ``G_pp``, not ``eps``).
    """
    m = G.shape[0]
    dtype = G.dtype
    e1 = jax.nn.one_hot(0, m, dtype=dtype)
    if m == 1:
        return e1
    max_iter = 10 * m if max_iter is None else max_iter
    Gs = G[1:, 1:]
    k = m - 1
    b = taus * jnp.diagonal(Gs) - G[1:, 0]
    atol = tol * jnp.maximum(jnp.max(jnp.diagonal(G)), jnp.finfo(dtype).tiny)
    eye = jnp.eye(k, dtype=dtype)

    def select(mu, active):
        slacks = jnp.where(active, 0.0, Gs @ mu - b)
        p = jnp.argmin(slacks)
        return p, slacks[p]

    def cond(s):
        _, _, _, _, it, status = s
        return (status == 0) & (it < max_iter)

    def projection(active, p):
        """``r`` with ``G_AA r = G_Ap`` (0 off A) and ``z = G_pp - G_pA r``, the squared norm
        of g_p's part orthogonal to the active gradients."""
        if factor is None:
            both = active[:, None] & active[None, :]
            system = jnp.where(both, Gs, 0.0) + jnp.where(active, 0.0, 1.0)[:, None] * eye
            r = jnp.where(active, solve(system, jnp.where(active, Gs[:, p], 0.0)), 0.0)
            return r, Gs[p, p] - Gs[p] @ r
        A = factor[:, 1:]
        masked = jnp.where(active[None, :], A, 0.0)
        # min |R_A r - R_p|^2 + |r_{not A}|^2: the identity rows pin r to 0 off A
        Q, T = qr(jnp.concatenate([masked, jnp.where(active, 0.0, 1.0)[:, None] * eye]))
        rhs = Q.T @ jnp.concatenate([A[:, p], jnp.zeros((k,), dtype)])
        r = jnp.where(active, solve_upper(T, rhs), 0.0)
        residual = A[:, p] - masked @ r
        return r, residual @ residual

    def body(s):
        mu, active, p, slack_p, it, _ = s
        r, z = projection(active, p)
        ratios = jnp.where(active & (r > 0), mu / jnp.where(r > 0, r, 1.0), jnp.inf)
        q = jnp.argmin(ratios)
        partial = ratios[q]
        independent = z > dependence_tol * Gs[p, p]
        full = jnp.where(independent, -slack_p / jnp.where(independent, z, 1.0), jnp.inf)
        step = jnp.minimum(partial, full)
        infeasible = jnp.isinf(step)
        step = jnp.where(infeasible, 0.0, step)
        mu = (mu - step * r).at[p].add(step)
        add = full <= partial
        mu = jnp.where(add, mu, mu.at[q].set(0.0))
        active = jnp.where(add, active.at[p].set(True), active.at[q].set(False))
        # After an add, pick the next violated constraint; after a drop, retry p.
        p_next, slack_next = select(mu, active)
        done = add & (slack_next >= -atol)
        p = jnp.where(add, p_next, p)
        slack_p = jnp.where(add, slack_next, Gs[p] @ mu - b[p])
        status = jnp.where(infeasible, 2, jnp.where(done, 1, 0))
        return mu, active, p, slack_p, it + 1, status

    mu0 = jnp.zeros((k,), dtype)
    active0 = jnp.zeros((k,), bool)
    p0, slack0 = select(mu0, active0)
    status0 = jnp.where(slack0 >= -atol, 1, 0)
    mu, _, _, _, _, status = jax.lax.while_loop(
        cond, body, (mu0, active0, p0, slack0, jnp.asarray(0), status0)
    )
    weights = jnp.concatenate([jnp.ones((1,), dtype), jnp.maximum(mu, 0.0)])
    return jnp.where(status == 2, e1, weights)


def _taus_field(tau):
    """``tau``: a number or a 1-D vector in [0, 1], stored as an array leaf."""
    if isinstance(tau, Tracer):
        return tau
    arr = np.asarray(tau, np.float64)
    if arr.ndim > 1:
        raise ValueError(f"tau must be a float or a 1-D vector; got shape {arr.shape}.")
    if not np.all((arr >= 0) & (arr <= 1)):
        raise ValueError(f"tau must be in [0, 1]; got {arr}.")
    return arr


class PCDWeighting(AbstractWeighting):
    r"""Weights of PCD, from the Gramian; row 0 is the primary objective.

    With ``g~_i = s_i g_i``, ``s_i = 1 / sqrt(v^_i + eps)`` (``v^``: bias-corrected EMA, decay
    ``beta``, of ``|g_i|^2`` across calls), solves ``min_d 1/2 |d - g~_1|^2`` s.t.
    ``g~_j . d >= tau_j |g~_j|^2`` exactly (:func:`solve_priority_qp`) and rescales ``d`` to
    ``|g_1|``. Zero when ``g_1 = 0`` or ``d`` is zero up to rounding; ``g_1`` alone when the
    constraints are infeasible; NaN weights (and an untouched state) for a non-finite Gramian.
    Not permutation invariant by design. State: :class:`PCDState` (m floats and a counter).

    Args:
        tau: the fraction of its normalised progress each secondary objective keeps: one number,
            or a vector of length m - 1.
        beta: the EMA decay of the squared gradient norms.
        eps: added to the EMA before the square root.
        factor: for the aggregator: ``"qr"`` (default) runs the active-set steps on J's
            triangular factor ``R`` (``G = R^T R``): float32 then tells a gradient from the
            span of others down to float64's ``dependence_tol`` (an orthogonal part of 3e-5 of
            its norm), where the Gramian's ``G_pp - G_pA r`` stops at ``10 eps`` (1e-3 of its
            norm) (:class:`PCD`); ``"gramian"``: ``J J^T``, one
            matrix product instead of a QR. A weighting given a Gramian uses it, and so does the
            aggregator inside an engine that forms only the Gramian (``mtl_value_and_grad``
            with ``method="layerwise"``).

    Reference: Priority-Constrained Descent, TMLR 2026, arXiv 2606.29521.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> weighting = jd.pcd_weighting()
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> w, state = weighting.update(G, weighting.init(2))
    >>> int(state.count)
    1
    """

    tau: Scalar | VectorLike = eqx.field(default=0.02, converter=_taus_field)
    beta: Scalar = number("beta", 0.999, check="fraction")
    eps: Scalar = number("eps", 1e-8, check="nonnegative")
    factor: str = choice("factor", "qr", ("qr", "gramian"))
    has_state = True

    def _init(self, m, dtype):
        self._taus(m, dtype)
        return PCDState(jnp.zeros((m,), dtype), jnp.zeros((), jnp.int32))

    def _taus(self, m, dtype):
        tau = jnp.asarray(self.tau)  # a 0-d or 1-d leaf after conversion
        if tau.ndim == 1:
            if tau.shape != (m - 1,):
                raise ValueError(
                    f"tau has length {tau.shape[0]}: it needs one value per secondary "
                    f"objective, m - 1 = {m - 1}."
                )
            return tau.astype(dtype)
        return jnp.full((m - 1,), as_dtype(tau, dtype))

    def _weigh(self, G, state, key):
        return self._weigh_at_scale(G, jnp.zeros((), G.dtype), state, key)

    def _weigh_at_scale(self, G, log2_t, state, key):
        # G is 2^log2_t times the Gramian (an aggregator's rescale when J J^T was out of
        # range); the EMA stays at the true scale, and the weights below are those of the true
        # Gramian whatever scale G is given at.
        return self._weights(G, None, log2_t, state)

    def _weigh_factor(self, R: Float[Array, "m m"], log2_scale: Float[Array, ""], state):
        """The weights from ``R`` with ``R^T R = 2^log2_scale J J^T`` (the aggregator's
        ``factor="qr"``): the same, with the active-set steps on ``R``
        (:func:`solve_priority_qp`'s ``factor``)."""
        R = R.astype(state.sq_norm_ema.dtype)
        R = jnp.where(jnp.all(jnp.isfinite(R)), R, jnp.nan)
        with jax.default_matmul_precision("highest"):
            G = R.T @ R
        return self._weights(G, R, log2_scale, state)

    def _weights(self, G, R, log2_t, state):
        """The weights and state from ``G`` (``2^log2_t`` times the Gramian) and, when not
        None, its factor ``R`` (``R^T R = G``)."""
        m = G.shape[0]
        dtype = state.sq_norm_ema.dtype
        G = G.astype(dtype)
        taus = self._taus(m, dtype)
        beta, eps = as_dtype(self.beta, dtype), as_dtype(self.eps, dtype)
        finite = jnp.all(jnp.isfinite(G))
        G = jnp.where(finite, G, 0.0)
        sq_norms = jnp.diagonal(G) * jnp.exp2(-log2_t.astype(dtype))
        count = state.count + 1
        ema = beta * state.sq_norm_ema + (1.0 - beta) * sq_norms
        debiased = ema / (1.0 - beta ** count.astype(dtype))
        # s_i = 1 / sqrt(v_i + eps), used as s_i / max(s) (the weights below do not change
        # when every s_i does by the same factor; this way nothing over- or underflows)
        den2 = debiased + eps
        positive = den2 > 0
        low = jnp.min(jnp.where(positive, den2, jnp.inf))
        scales = jnp.where(positive, jnp.sqrt(low / jnp.where(positive, den2, 1.0)), 0.0)
        # the EMA cannot hold the squared norms (they overflowed, or underflowed with eps = 0):
        # NaN weights, and the state is kept
        lost = jnp.any(~positive & (jnp.diagonal(G) > 0)) | ~jnp.all(jnp.isfinite(den2))
        precision = 10.0 * jnp.finfo(dtype).eps
        normalized = G * jnp.outer(scales, scales)
        Rn = None if R is None else jnp.where(finite, R, 0.0) * scales[None, :]
        # the dependence test reads z / G_pp, rounded to about eps on G and eps^2 on R
        resolution = float(precision) if Rn is None else float(precision) ** 2
        w = solve_priority_qp(normalized, taus, dependence_tol=max(1e-9, resolution), factor=Rn)
        # |d|^2 against its rounding: about eps S^2 through G, (eps S)^2 through R, with
        # S = sum_i |w_i| |g_i|
        magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diagonal(normalized), 0.0))) ** 2
        if Rn is None:
            sq_direction = w @ normalized @ w
            rounding = precision * magnitude
        else:
            direction = Rn @ w
            sq_direction = direction @ direction
            rounding = precision * precision * magnitude
        sq_first = G[0, 0]
        nonzero = (sq_first > 0) & (sq_direction > rounding)
        ratio = sq_first / jnp.where(nonzero, sq_direction, 1.0)
        weights = jnp.where(nonzero, w * scales * jnp.sqrt(ratio), 0.0)
        ok = finite & ~lost
        weights = jnp.where(ok, weights, jnp.nan)
        new = PCDState(jnp.where(ok, ema, state.sq_norm_ema), jnp.where(ok, count, state.count))
        return weights, new


class PCD(FactorWeightedAggregator):
    """PCD aggregator (stateful; row 0 of the Jacobian is the primary objective), its active-set
    steps on J's triangular factor (``factor="qr"``, the default)."""

    weighting_class = PCDWeighting


pcd = spelling(PCD, "pcd", reads="jacobian")
pcd_weighting = spelling(PCDWeighting, "pcd_weighting", reads="gramian")

"""PCD, Priority-Constrained Descent (TMLR 2026, arXiv 2606.29521): follow the primary gradient
(row 0) as closely as possible while every secondary objective keeps a fraction ``tau`` of its
normalised first-order progress."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._tree import accumulation_dtype, check_gramian
from ._base import (
    StatefulGramianAggregator,
    StatefulWeighting,
    check_nonnegative,
    positive_int,
)


class PCDState(NamedTuple):
    """EMA of the squared gradient norms (m,) and the number of steps taken (for debiasing)."""

    sq_norm_ema: jax.Array
    count: jax.Array


def solve_priority_qp(G, taus, *, tol=1e-9, dependence_tol=1e-9, max_iter=None):
    r"""``min_d 1/2 |d - g_1|^2`` s.t. ``g_j . d >= tau_j |g_j|^2`` (j >= 2), from the Gramian of
    ``g_1..g_m``: the dual active-set method of Goldfarb and Idnani (1983) for an identity
    Hessian, so that ``d = g_1 + sum_j mu_j g_j`` at every iteration. Returns ``[1, mu]`` (the
    KKT multipliers), or ``e_1`` when the constraints are infeasible.

    Fixed shapes: the active set is a mask, and each step solves the masked system
    ``(G_AA + I_{not A}) r = G_Ap`` (one ``lax.while_loop`` of at most ``max_iter = 10 m``
    add/drop steps). A constraint counts as satisfied within ``tol * max diag(G)``; a gradient as
    dependent on the active ones when its orthogonal part has squared norm at most
    ``dependence_tol`` times its own.
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

    def body(s):
        mu, active, p, slack_p, it, _ = s
        both = active[:, None] & active[None, :]
        system = jnp.where(both, Gs, 0.0) + jnp.where(active, 0.0, 1.0) * eye
        r = jnp.where(active, jnp.linalg.solve(system, jnp.where(active, Gs[:, p], 0.0)), 0.0)
        z = Gs[p, p] - Gs[p] @ r
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


class PCDWeighting(StatefulWeighting):
    r"""Weights of PCD, from the Gramian; row 0 is the primary objective.

    With ``g~_i = s_i g_i``, ``s_i = 1 / sqrt(v^_i + eps)`` (``v^``: bias-corrected EMA, decay
    ``beta``, of ``|g_i|^2`` across calls), solves ``min_d 1/2 |d - g~_1|^2`` s.t.
    ``g~_j . d >= tau_j |g~_j|^2`` exactly (:func:`solve_priority_qp`) and rescales ``d`` to
    ``|g_1|``. Zero when ``g_1 = 0`` or ``d`` is zero up to rounding; ``g_1`` alone when the
    constraints are infeasible; NaN weights (and an untouched state) for a non-finite Gramian.
    Not permutation invariant by design. State: :class:`PCDState` (m floats and a counter).
    """

    tau: float | tuple[float, ...] = eqx.field(static=True)
    beta: float = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, tau=0.02, beta: float = 0.999, eps: float = 1e-8):
        if np.ndim(tau) == 0:
            if not 0.0 <= float(tau) <= 1.0:
                raise ValueError(f"tau must be in [0, 1]; got {tau}.")
            self.tau = float(tau)
        else:
            if isinstance(tau, jax.core.Tracer):
                raise TypeError("tau is a hyper-parameter and must be concrete, not traced.")
            arr = np.asarray(tau, np.float64)
            if arr.ndim != 1:
                raise ValueError(f"tau must be a float or a 1-D vector; got shape {arr.shape}.")
            if not np.all((arr >= 0) & (arr <= 1)):
                raise ValueError(f"tau must be in [0, 1]; got {arr}.")
            self.tau = tuple(float(x) for x in arr)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1); got {beta}.")
        self.beta = float(beta)
        self.eps = check_nonnegative(eps, "eps")

    def init(self, num_objectives, dtype=jnp.float32):
        m = positive_int(num_objectives, "num_objectives")
        self._taus(m, jnp.float32)
        dtype = accumulation_dtype(dtype)
        return PCDState(jnp.zeros((m,), dtype), jnp.zeros((), jnp.int32))

    def _taus(self, m, dtype):
        if isinstance(self.tau, tuple):
            if len(self.tau) != m - 1:
                raise ValueError(
                    f"tau has length {len(self.tau)}: it needs one value per secondary "
                    f"objective, m - 1 = {m - 1}."
                )
            return jnp.asarray(self.tau, dtype).reshape(m - 1)
        return jnp.full((m - 1,), self.tau, dtype)

    def _update(self, matrix, state, key):
        m = check_gramian(matrix)
        if state.sq_norm_ema.shape != (m,):
            raise ValueError(
                f"The state holds {state.sq_norm_ema.shape[0]} objectives but the Gramian has "
                f"m = {m}: build a new state with init(m)."
            )
        dtype = state.sq_norm_ema.dtype
        G = jax.lax.stop_gradient(jnp.asarray(matrix, dtype))
        taus = self._taus(m, dtype)
        finite = jnp.all(jnp.isfinite(G))
        G = jnp.where(finite, G, 0.0)
        sq_norms = jnp.diagonal(G)
        count = state.count + 1
        ema = self.beta * state.sq_norm_ema + (1.0 - self.beta) * sq_norms
        debiased = ema / (1.0 - self.beta ** count.astype(dtype))
        denominators = jnp.sqrt(debiased + self.eps)
        scales = jnp.where(denominators > 0, 1.0 / jnp.where(denominators > 0, denominators, 1), 0)
        precision = 10.0 * jnp.finfo(dtype).eps
        normalized = G * jnp.outer(scales, scales)
        w = solve_priority_qp(normalized, taus, dependence_tol=max(1e-9, float(precision)))
        sq_direction = w @ normalized @ w
        magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diagonal(normalized), 0.0))) ** 2
        nonzero = (sq_norms[0] > 0) & (sq_direction > precision * magnitude)
        ratio = sq_norms[0] / jnp.where(nonzero, sq_direction, 1.0)
        weights = jnp.where(nonzero, w * scales * jnp.sqrt(ratio), 0.0)
        weights = jnp.where(finite, weights, jnp.nan)
        new = PCDState(
            jnp.where(finite, ema, state.sq_norm_ema), jnp.where(finite, count, state.count)
        )
        return weights, new


class PCD(StatefulGramianAggregator):
    """PCD aggregator (stateful; row 0 of the Jacobian is the primary objective)."""

    weighting: PCDWeighting

    def __init__(self, tau=0.02, beta: float = 0.999, eps: float = 1e-8):
        self.weighting = PCDWeighting(tau, beta, eps)


def pcd(*, tau=0.02, beta: float = 0.999, eps: float = 1e-8) -> PCD:
    """:class:`PCD` (Priority-Constrained Descent), stateful."""
    return PCD(tau, beta, eps)


def pcd_weighting(*, tau=0.02, beta: float = 0.999, eps: float = 1e-8) -> PCDWeighting:
    """:class:`PCDWeighting` (stateful: ``init`` then ``update``)."""
    return PCDWeighting(tau, beta, eps)

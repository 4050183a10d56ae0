r"""Block principal pivoting for ``min_v v^T G v  s.t.  v >= u``.

With ``s = v - u`` and ``c = G u`` the problem is the linear complementarity problem
``s >= 0, lambda = G s + c >= 0, s^T lambda = 0``. Block principal pivoting (Júdice & Pires 1994;
Kim & Park 2011 for NNLS) guesses the free set F (``s_F`` solves ``G_FF s_F = -c_F``, ``s`` is 0
elsewhere), flips every infeasible index at once while their number decreases, and falls back to
Murty's single-index rule (largest infeasible index) after three non-improving steps, which makes
it terminate in finitely many steps for positive definite G. Every iteration is one masked Cholesky
solve per right-hand side, so the solver is a ``lax.while_loop`` with static shapes over a batch
of right-hand sides ("lanes") sharing G. Two things keep the number of factorisations low: from
m = 32 the initial free set is guessed by a few accelerated projected-gradient steps (matrix
products for all lanes at once) instead of the sign of ``G u``, and after the first solve each
loop iteration gathers only pending lanes (about k/8 of them), so converged lanes cost nothing.

A PSD but singular G (duplicated or zero rows, with ``reg_eps = 0``) is handled by adding
``m * eps * max(diag G)`` to the diagonal of the masked systems: the projected direction
``J^T v`` is then exact to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._common import ProjectionInfo, kkt_residual

_BACKUP_BUDGET = 3
_COMPACT_MIN_M = 16
_LANE_FRACTION = 8  # pending lanes advanced per loop iteration: about k / 8
# Projected-gradient steps that guess the initial free set (m >= _WARM_MIN_M): at m = 64..256
# they cut the pivoting steps per lane from ~1.5-3 to ~0-1; below, the guess costs more.
_WARM_ITERATIONS = 80
_WARM_MIN_M = 32
# Largest estimated condition number for which the dual half-size systems are used: (float32,
# float64). Refinement squares the error kappa * eps.
_DUAL_COND_LIMIT = {False: 1e4, True: 1e10}


def default_max_iter(m: int) -> int:
    return 10 * m + 20


def _masked_solve(G, c, free, ridge):
    """Solves ``G_FF s_F = -c_F`` with ``s`` zero outside F; returns ``(s, lambda)``."""
    p = free.astype(G.dtype)
    M = G * p[:, None] * p[None, :] + jnp.diag(1.0 - p + ridge * p)
    chol = jnp.linalg.cholesky(M)
    s = jax.scipy.linalg.cho_solve((chol, True), -c * p) * p
    lam = (G @ s + c) * (1.0 - p)
    return s, lam


def _compact_solve(G, c, u, free, ridge, H, GH, K):
    """The same solve on a K x K system, K = ceil(m / 2).

    When at most K indices are free, it is the primal system ``G_FF s_F = -c_F`` gathered into
    K slots. Otherwise fewer than K are active and it solves the dual system on the active set A:
    the multipliers ``mu = lambda_A`` satisfy ``H_AA mu = u_A`` with ``H = G^{-1}`` (because
    ``G^{-1} c = u``), then ``s = G^{-1}(mu - c)``; one step of iterative refinement on
    ``s_A = 0`` corrects the rounding of the K x K solve.
    """
    m = G.shape[0]
    f = jnp.sum(free)
    primal = f <= K
    chosen = jnp.where(primal, free, ~free)
    # The chosen indices in increasing order, from a cumulative count (sorting, gathering at
    # 2-D indices and scattering back cost several times more under vmap on CPU).
    pos = jnp.cumsum(chosen) - 1
    order = jnp.minimum(jnp.sum(pos[None, :] < jnp.arange(K)[:, None], axis=1), m - 1)
    valid = jnp.arange(K) < jnp.where(primal, f, m - f)
    vf = valid.astype(G.dtype)
    # Rows of G (primal) or of H (dual) from the stacked (2m, m) matrix, then the columns.
    rows = jnp.take(GH, order + jnp.where(primal, 0, m), axis=0)
    B = jnp.take(rows, order, axis=1)
    M = B * vf[:, None] * vf[None, :] + jnp.diag(1.0 - vf + jnp.where(primal, ridge, 0.0) * vf)
    chol = jnp.linalg.cholesky(M)
    rhs = jnp.where(primal, -c[order], u[order]) * vf
    x = jax.scipy.linalg.cho_solve((chol, True), rhs) * vf
    slot = jnp.clip(pos, 0, K - 1)

    def scatter(y):
        return jnp.where(chosen, y[slot], 0.0)

    scattered = scatter(x)
    # Primal: s is the scattered solution.
    p = free.astype(G.dtype)
    s_primal = scattered
    lam_primal = (G @ s_primal + c) * (1.0 - p)
    # Dual: mu on A, s = G^{-1}(mu - c), refine so that s_A = 0.
    mu = scattered
    s_dual = H @ (mu - c)
    correction = jax.scipy.linalg.cho_solve((chol, True), -s_dual[order] * vf) * vf
    mu = mu + scatter(correction)
    s_dual = (H @ (mu - c)) * p
    lam_dual = mu * (1.0 - p)
    return jnp.where(primal, s_primal, s_dual), jnp.where(primal, lam_primal, lam_dual)


class _Lane(NamedTuple):
    """The pivoting state of one right-hand side."""

    free: Array  # (m,) bool: the free set F
    s: Array  # (m,) s = v - u
    lam: Array  # (m,) multipliers
    bad: Array  # (m,) bool: infeasible indices
    it: Array  # iterations so far
    best: Array  # fewest infeasible indices seen
    budget: Array  # non-improving block steps left before the backup rule


def _lambda_max(A, iterations=16):
    """Largest eigenvalue of a PSD matrix by power iteration (a slight underestimate)."""
    m = A.shape[0]
    x = 1.0 + jnp.arange(m, dtype=A.dtype) / m
    x = jax.lax.fori_loop(
        0, iterations, lambda _, x: A @ x / jnp.maximum(jnp.linalg.norm(x), 1e-30), x
    )
    return jnp.vdot(x, A @ x) / jnp.maximum(jnp.vdot(x, x), jnp.finfo(A.dtype).tiny)


def _warm_free(G, U, iterations, lmax):
    """A guess of every lane's free set from ``iterations`` steps of accelerated projected
    gradient on ``s >= 0`` (each step is one ``(k, m) x (m, m)`` product for all lanes): far
    fewer pivoting steps, each of which is a factorisation per lane, than the sign of ``G u``."""
    C = U @ G  # G is symmetric: row i is G u_i
    step = 1.0 / jnp.maximum(1.1 * lmax, jnp.finfo(G.dtype).tiny)  # it only shapes the guess

    def body(_, state):
        S, Y, t = state
        S_new = jnp.maximum(Y - step * (Y @ G + C), 0.0)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        return S_new, S_new + ((t - 1.0) / t_new) * (S_new - S), t_new

    zero = jnp.zeros_like(U)
    S, _, _ = jax.lax.fori_loop(0, iterations, body, (zero, zero, jnp.asarray(1.0, G.dtype)))
    guess = S > 1e-3 * jnp.max(S, axis=1, keepdims=True)
    usable = jnp.all(jnp.isfinite(S), axis=1, keepdims=True) & jnp.any(guess, axis=1, keepdims=True)
    return jnp.where(usable, guess, C < 0)


def _lane_ops(G, compact):
    """``start(u, free)`` (the first solve from a guessed free set), ``step(u, lane)`` and
    ``finish(u, lane)`` for one right-hand side."""
    m = G.shape[0]
    eps = jnp.finfo(G.dtype).eps
    gmax = jnp.maximum(jnp.max(jnp.diagonal(G)), jnp.finfo(G.dtype).tiny)
    ridge = m * eps * gmax
    index = jnp.arange(m)

    def solve(u, free):
        c = G @ u
        if compact is None:
            return _masked_solve(G, c, free, ridge)
        H, GH, K = compact
        return _compact_solve(G, c, u, free, ridge, H, GH, K)

    def infeasible(u, s, lam, free):
        smax = jnp.max(jnp.abs(s)) + jnp.max(jnp.abs(u))
        tol = 4.0 * m * eps * jnp.maximum(smax, 1e-30)
        tol_lam = tol * gmax
        return jnp.where(free, s < -tol, lam < -tol_lam)

    def start(u, free):
        s, lam = solve(u, free)
        budget = jnp.asarray(_BACKUP_BUDGET)
        bad = infeasible(u, s, lam, free)
        return _Lane(free, s, lam, bad, jnp.asarray(0), jnp.asarray(m + 1), budget)

    def step(u, lane):
        count = jnp.sum(lane.bad)
        improved = count < lane.best
        use_block = improved | (lane.budget > 0)
        best = jnp.where(improved, count, lane.best)
        budget = jnp.where(
            improved, _BACKUP_BUDGET, jnp.where(use_block, lane.budget - 1, lane.budget)
        )
        last = jnp.max(jnp.where(lane.bad, index, -1))
        free = lane.free ^ jnp.where(use_block, lane.bad, index == last)
        s, lam = solve(u, free)
        return _Lane(free, s, lam, infeasible(u, s, lam, free), lane.it + 1, best, budget)

    def finish(u, lane):
        # NaN/Inf anywhere (G, u or the solves) gives NaN weights and converged = False; the
        # test is explicit because XLA's fast max(NaN, 0) may return 0.
        finite = jnp.all(jnp.isfinite(lane.s) & jnp.isfinite(lane.lam) & jnp.isfinite(u))
        v = jnp.where(finite, u + jnp.maximum(lane.s, 0.0), jnp.nan)
        converged = ~jnp.any(lane.bad) & finite
        return v, ProjectionInfo(converged, lane.it, kkt_residual(G, u, v))

    return start, step, finish


def _pivot_all(U, G, max_iter, compact=None, lmax=None):
    """Every right-hand side to its solution. After the first solve, each loop iteration
    advances at most ``Q ~ k / 8`` pending lanes, gathered by a cumulative count: a lane that has
    converged costs nothing more (a plain vmapped loop would keep solving every lane until the
    slowest is done, and each solve is a Cholesky factorisation)."""
    warm = _WARM_ITERATIONS if G.shape[0] >= _WARM_MIN_M else 0
    if warm and lmax is None:
        lmax = _lambda_max(G)
    start, step, finish = _lane_ops(G, compact)
    k = U.shape[0]
    lanes = jax.vmap(start)(U, _warm_free(G, U, warm, lmax) if warm else U @ G < 0)

    def pending(lanes):
        return jnp.any(lanes.bad, axis=1) & (lanes.it < max_iter)

    Q = -(-k // _LANE_FRACTION)
    if Q == k:

        def run(u, lane):
            return jax.lax.while_loop(
                lambda lane: jnp.any(lane.bad) & (lane.it < max_iter),
                lambda lane: step(u, lane),
                lane,
            )

        lanes = jax.vmap(run)(U, lanes)
    else:

        def body(lanes):
            todo = pending(lanes)
            rank = jnp.cumsum(todo) - 1
            idx = jnp.minimum(jnp.sum(rank[None, :] < jnp.arange(Q)[:, None], axis=1), k - 1)
            sub = jax.tree_util.tree_map(lambda a: a[idx], lanes)
            new = jax.vmap(step)(U[idx], sub)
            keep = todo[idx]
            new = jax.tree_util.tree_map(
                lambda n, o: jnp.where(keep.reshape((Q,) + (1,) * (n.ndim - 1)), n, o), new, sub
            )
            return jax.tree_util.tree_map(lambda a, n: a.at[idx].set(n), lanes, new)

        lanes = jax.lax.while_loop(lambda lanes: jnp.any(pending(lanes)), body, lanes)
    return jax.vmap(finish)(U, lanes)


def bpp(
    U: Float[Array, "k m"], G: Float[Array, "m m"], *, max_iter: int | None = None
) -> tuple[Float[Array, "k m"], ProjectionInfo]:
    """Exact dual-cone projection of every row of ``U`` by block principal pivoting."""
    m = G.shape[0]
    max_iter = default_max_iter(m) if max_iter is None else max_iter

    if m < _COMPACT_MIN_M:
        return _pivot_all(U, G, max_iter)
    lmax = _lambda_max(G)

    def full(U):
        return _pivot_all(U, G, max_iter, lmax=lmax)

    # Half-size systems (primal on F or dual on A, whichever is smaller) cost 8x fewer flops
    # per Cholesky. The dual needs G^{-1}: only when G is well conditioned, judged by
    # 4 lambda_max(G) lambda_max(G^{-1}) (power iterations; x 4 for their underestimate) or by
    # the rigorous but loose cond(G) <= tr(G) tr(G^{-1}); otherwise every lane takes the
    # full-size primal path.
    K = -(-m // 2)
    eye = jnp.eye(m, dtype=G.dtype)
    chol_G = jnp.linalg.cholesky(G)
    H = jax.scipy.linalg.cho_solve((chol_G, True), eye)
    H = 0.5 * (H + H.T)
    bound = jnp.minimum(jnp.trace(G) * jnp.trace(H), 4.0 * lmax * _lambda_max(H))
    limit = _DUAL_COND_LIMIT[jnp.finfo(G.dtype).bits >= 64]
    ok = jnp.isfinite(bound) & (bound > 0) & (bound < limit) & jnp.all(jnp.isfinite(H))
    GH = jnp.concatenate([G, H])  # one row gather per lane picks the primal or the dual block

    def compact(U):
        return _pivot_all(U, G, max_iter, (H, GH, K), lmax)

    return jax.lax.cond(ok, compact, full, U)

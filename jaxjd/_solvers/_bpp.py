r"""Block principal pivoting for ``min_v v^T G v  s.t.  v >= u``.

With ``s = v - u`` and ``c = G u`` the problem is the linear complementarity problem
``s >= 0, lambda = G s + c >= 0, s^T lambda = 0``. Block principal pivoting (Júdice & Pires 1994;
Kim & Park 2011 for NNLS) guesses the free set F (``s_F`` solves ``G_FF s_F = -c_F``, ``s`` is 0
elsewhere), flips every infeasible index at once while their number decreases, and falls back to
Murty's single-index rule (largest infeasible index) after three non-improving steps, which makes
it terminate in finitely many steps for positive definite G. Every iteration is one masked Cholesky
solve, so the solver is a ``lax.while_loop`` with static shapes, vmapped over right-hand sides.

A PSD but singular G (duplicated or zero rows, with ``reg_eps = 0``) is handled by adding
``m * eps * max(diag G)`` to the diagonal of the masked systems: the projected direction
``J^T v`` is then exact to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._common import ProjectionInfo, kkt_residual

_BACKUP_BUDGET = 3
_COMPACT_MIN_M = 16
# Largest tr(G) tr(G^-1) (an upper bound on the condition number) for which the dual half-size
# systems are used: (float32, float64). Refinement squares the error kappa * eps.
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
    order = jnp.argsort(~chosen, stable=True)[:K]
    valid = jnp.arange(K) < jnp.where(primal, f, m - f)
    vf = valid.astype(G.dtype)
    B = GH[primal.astype(jnp.int32) ^ 1, order[:, None], order[None, :]]
    M = B * vf[:, None] * vf[None, :] + jnp.diag(1.0 - vf + jnp.where(primal, ridge, 0.0) * vf)
    chol = jnp.linalg.cholesky(M)
    rhs = jnp.where(primal, -c[order], u[order]) * vf
    x = jax.scipy.linalg.cho_solve((chol, True), rhs) * vf
    scattered = jnp.zeros((m,), G.dtype).at[order].add(x)
    # Primal: s is the scattered solution.
    p = free.astype(G.dtype)
    s_primal = scattered
    lam_primal = (G @ s_primal + c) * (1.0 - p)
    # Dual: mu on A, s = G^{-1}(mu - c), refine so that s_A = 0.
    mu = scattered
    s_dual = H @ (mu - c)
    correction = jax.scipy.linalg.cho_solve((chol, True), -s_dual[order] * vf) * vf
    mu = mu + jnp.zeros((m,), G.dtype).at[order].add(correction)
    s_dual = (H @ (mu - c)) * p
    lam_dual = mu * (1.0 - p)
    return jnp.where(primal, s_primal, s_dual), jnp.where(primal, lam_primal, lam_dual)


def _bpp_one(G, u, max_iter, compact=None):
    m = G.shape[0]
    eps = jnp.finfo(G.dtype).eps
    gmax = jnp.maximum(jnp.max(jnp.diagonal(G)), jnp.finfo(G.dtype).tiny)
    ridge = m * eps * gmax
    c = G @ u
    index = jnp.arange(m)
    if compact is None:

        def solve(free):
            return _masked_solve(G, c, free, ridge)
    else:
        H, GH, K = compact

        def solve(free):
            return _compact_solve(G, c, u, free, ridge, H, GH, K)

    def infeasible(s, lam, free):
        smax = jnp.max(jnp.abs(s)) + jnp.max(jnp.abs(u))
        tol = 4.0 * m * eps * jnp.maximum(smax, 1e-30)
        tol_lam = tol * gmax
        return jnp.where(free, s < -tol, lam < -tol_lam)

    free0 = c < 0
    s0, lam0 = solve(free0)
    bad0 = infeasible(s0, lam0, free0)

    def cond(state):
        _, _, _, bad, it, _, _ = state
        return jnp.any(bad) & (it < max_iter)

    def body(state):
        free, _, _, bad, it, best, budget = state
        count = jnp.sum(bad)
        improved = count < best
        use_block = improved | (budget > 0)
        best = jnp.where(improved, count, best)
        budget = jnp.where(improved, _BACKUP_BUDGET, jnp.where(use_block, budget - 1, budget))
        last = jnp.max(jnp.where(bad, index, -1))
        flip = jnp.where(use_block, bad, index == last)
        free = free ^ flip
        s, lam = solve(free)
        return free, s, lam, infeasible(s, lam, free), it + 1, best, budget

    init = (free0, s0, lam0, bad0, jnp.asarray(0), jnp.asarray(m + 1), jnp.asarray(_BACKUP_BUDGET))
    _free, s, _lam, bad, it, _, _ = jax.lax.while_loop(cond, body, init)
    v = u + jnp.maximum(s, 0.0)
    finite = jnp.all(jnp.isfinite(v))
    return v, ProjectionInfo(~jnp.any(bad) & finite, it, kkt_residual(G, u, v))


def bpp(
    U: Float[Array, "k m"], G: Float[Array, "m m"], *, max_iter: int | None = None
) -> tuple[Float[Array, "k m"], ProjectionInfo]:
    """Exact dual-cone projection of every row of ``U`` by block principal pivoting."""
    m = G.shape[0]
    max_iter = default_max_iter(m) if max_iter is None else max_iter

    def full(U):
        return jax.vmap(lambda u: _bpp_one(G, u, max_iter))(U)

    if m < _COMPACT_MIN_M:
        return full(U)
    # Half-size systems (primal on F or dual on A, whichever is smaller) cost 8x fewer flops
    # per Cholesky. The dual needs G^{-1}: only when G is well conditioned, judged by the bound
    # cond(G) <= tr(G) tr(G^{-1}); otherwise every lane takes the full-size primal path.
    K = -(-m // 2)
    eye = jnp.eye(m, dtype=G.dtype)
    chol_G = jnp.linalg.cholesky(G)
    H = jax.scipy.linalg.cho_solve((chol_G, True), eye)
    H = 0.5 * (H + H.T)
    bound = jnp.trace(G) * jnp.trace(H)
    limit = _DUAL_COND_LIMIT[jnp.finfo(G.dtype).bits >= 64]
    ok = jnp.isfinite(bound) & (bound > 0) & (bound < limit)
    GH = jnp.stack([G, H])  # one gather per lane picks the primal or the dual block

    def compact(U):
        return jax.vmap(lambda u: _bpp_one(G, u, max_iter, (H, GH, K)))(U)

    return jax.lax.cond(ok, compact, full, U)

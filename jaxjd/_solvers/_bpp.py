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


def _bpp_one(G, u, max_iter):
    m = G.shape[0]
    eps = jnp.finfo(G.dtype).eps
    gmax = jnp.maximum(jnp.max(jnp.diagonal(G)), jnp.finfo(G.dtype).tiny)
    ridge = m * eps * gmax
    c = G @ u
    index = jnp.arange(m)

    def infeasible(s, lam, free):
        smax = jnp.max(jnp.abs(s)) + jnp.max(jnp.abs(u))
        tol = 4.0 * m * eps * jnp.maximum(smax, 1e-30)
        tol_lam = tol * gmax
        return jnp.where(free, s < -tol, lam < -tol_lam)

    free0 = c < 0
    s0, lam0 = _masked_solve(G, c, free0, ridge)
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
        s, lam = _masked_solve(G, c, free, ridge)
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
    return jax.vmap(lambda u: _bpp_one(G, u, max_iter))(U)

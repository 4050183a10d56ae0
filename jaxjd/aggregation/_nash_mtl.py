"""Nash-MTL (Navon et al., ICML 2022, Alg. 1): the bargaining solution ``alpha_i (G alpha)_i = 1``
by a sequence of convex programs, each solved in-graph by a primal-dual interior-point method."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._linalg import scaled_norm
from .._spmd import solve
from .._typing import Scalar
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import as_dtype, number, spelling, static_int
from ._mgda import MGDAWeighting


class NashMTLState(NamedTuple):
    """The last weights ``alpha`` (m,; ones at first, the warm start of the next solve), the
    number of calls so far (for ``update_weights_every``) and ``residual``: how far the last
    solve's ``alpha`` is from the bargaining solution, ``max_i |alpha_i (G alpha)_i - 1|``
    (before ``max_norm``'s clipping; ``inf`` before the first solve): at most 2e-10 measured
    in float64 on 40 random Jacobians with a common direction, 1e-5 on the float32 input of
    issue #13; 0.5 and more when a program failed and the previous ``alpha`` was kept (e.g. 0
    in the hull of the gradients)."""

    alpha: jax.Array
    count: jax.Array
    residual: jax.Array


def _solve_step(G, c, start, tol, max_iter):
    r"""One convex program of the sequence, by a primal-dual interior-point method (Boyd and
    Vandenberghe, Sec. 11.7)::

        min_b  c^T b   s.t.   log(b_i) + log((G b)_i) >= 0,

    for the normalised ``G`` (``|G|_F = 1``) and a positive multiple ``c`` of TorchJD's
    objective (see :meth:`NashMTLWeighting._solve`). Starts from ``start`` (with
    ``G start > 0``) scaled until every constraint holds with margin at least 1 and one with
    exactly 1, whatever the magnitude of ``start`` (scaled up only, a start 1e20 times too large
    made the first Newton step's line search bottom out: the program "converged" at its start).
    Returns ``(b, ok)``; ``ok`` is False when ``c`` is not finite, the start is not strictly
    feasible, or the final iterate is not (e.g. an unbounded program). Like ECOS's "inaccurate"
    answers, a strictly feasible iterate that ran out of iterations, or whose Newton system
    gave no finite step (in float32, near an optimum where fewer than m constraints are
    active), is kept: it is feasible and improves on the start.
    """
    m = G.shape[0]
    dtype = G.dtype
    u_start = G @ start
    usable = jnp.all(jnp.isfinite(c)) & jnp.all(start > 0) & jnp.all(u_start > 0)
    # Only c's direction matters: at unit size the multipliers are of order 1 at every scale.
    size = jnp.max(jnp.abs(c))
    usable = usable & (size > 0)
    c = jnp.where(usable, c / jnp.where(usable, size, 1.0), 0.0)

    def parts(a):
        u = G @ a
        ok = jnp.all(a > 0) & jnp.all(u > 0)
        sa = jnp.where(a > 0, a, 1.0)
        su = jnp.where(u > 0, u, 1.0)
        f = -(jnp.log(sa) + jnp.log(su))  # f <= 0 is feasible
        Df = -(jnp.diag(1.0 / sa) + G / su[:, None])
        return ok & jnp.all(f < 0), f, Df, sa, su

    def residual(a, lam, t):
        _, f, Df, _, _ = parts(a)
        return c + Df.T @ lam, -lam * f - 1.0 / t

    # Strictly feasible start: h_i(s a) = h_i(a) + 2 log s, min_i h_i = 1.
    h_start = jnp.log(jnp.where(usable, start, 1.0)) + jnp.log(jnp.where(usable, u_start, 1.0))
    a0 = jnp.where(usable, start, 1.0) * jnp.exp((1.0 - jnp.min(h_start)) / 2.0)
    _, f0, _, _, _ = parts(a0)
    lam0 = -1.0 / jnp.where(f0 < 0, f0, -1.0)
    # Newton is affine invariant, but stopping tests are not: measure the dual residual in the
    # coordinates beta = alpha * |g| where every gradient has unit norm.
    diag = jnp.diagonal(G)
    D = jnp.where(diag > 0, 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
    scale = jnp.maximum(jnp.linalg.norm(D * c), jnp.finfo(dtype).tiny)

    def cond(s):
        _, _, it, done = s
        return (~done) & (it < max_iter)

    def body(s):
        a, lam, it, _ = s
        _, f, Df, sa, su = parts(a)
        eta = -(f @ lam)
        t = 10.0 * m / eta
        r_dual, r_cent = residual(a, lam, t)
        H = jnp.diag(lam / sa**2) + G.T @ ((lam / su**2)[:, None] * G)
        M = H - Df.T @ ((lam / f)[:, None] * Df)
        # M is positive definite; its diagonal spans many orders of magnitude when a
        # constraint nears its bound (lam / (G a)_i^2), so solve it equilibrated (in float32 the
        # unscaled LU returned steps of inf).
        dm = jnp.sqrt(jnp.maximum(jnp.abs(jnp.diagonal(M)), jnp.finfo(dtype).tiny))
        Ms = M / dm[:, None] / dm[None, :]
        da = solve(Ms, (-r_dual - Df.T @ (r_cent / f)) / dm) / dm
        dlam = (r_cent - lam * (Df @ da)) / f
        ratio = jnp.where(dlam < 0, -lam / jnp.where(dlam < 0, dlam, -1.0), jnp.inf)
        step0 = jnp.minimum(1.0, 0.99 * jnp.min(ratio))
        norm0 = jnp.linalg.norm(jnp.concatenate([D * r_dual, r_cent]))

        def shrink(carry):
            step, k = carry
            return step * 0.5, k + 1

        def bad(carry):
            step, k = carry
            a1, lam1 = a + step * da, lam + step * dlam
            feasible = parts(a1)[0]
            rd, rc = residual(a1, lam1, t)
            small = jnp.linalg.norm(jnp.concatenate([D * rd, rc])) <= (1.0 - 0.01 * step) * norm0
            # At most 60 halvings (from <= 1 to 1e-12 takes 40): a hard bound whatever the
            # rounding does.
            return (~(feasible & small)) & (step > 1e-12) & (k < 60)

        # A Newton system too ill-conditioned for the dtype (float32: a condition number of
        # 3e8 seen at the optimum of a program with 3 of 4 constraints active) gives no finite
        # step: take none. So does a line search that bottoms out; the iterate stays strictly
        # feasible (not a + 0 * nan).
        finite = jnp.all(jnp.isfinite(da)) & jnp.all(jnp.isfinite(dlam))
        step, _ = jax.lax.while_loop(bad, shrink, (jnp.where(finite, step0, 0.0), jnp.asarray(0)))
        step = jnp.where(finite & (step > 1e-12), step, 0.0)
        a = jnp.where(step > 0, a + step * da, a)
        lam = jnp.where(step > 0, lam + step * dlam, lam)
        _, f, Df, _, _ = parts(a)
        gap = -(f @ lam)
        converged = (jnp.linalg.norm(D * (c + Df.T @ lam)) <= tol * scale) & (
            gap <= tol * jnp.abs(c @ a)
        )
        return a, lam, it + 1, converged | (step == 0.0)

    a, lam, _, _ = jax.lax.while_loop(cond, body, (a0, lam0, jnp.asarray(0), ~usable))
    # Like ECOS's "inaccurate" answers, a strictly feasible iterate that ran out of iterations is
    # kept: it is feasible and improves on the start.
    feasible, f, _, _, _ = parts(a)
    ok = usable & jnp.all(jnp.isfinite(a)) & feasible
    # the smaller of slack and multiplier goes to 0 at the optimum
    active = -f <= lam / jnp.maximum(jnp.max(lam), jnp.finfo(dtype).tiny)
    polished, exact = _polish(G, c, a, lam, active)

    # else from the start with its own active set: the previous program's answer, near this
    # one's once the sequence converges, where float32's interior point sometimes ended 2% away
    # with the wrong constraints nearly active
    def from_start():
        x = jnp.where(usable, start, 1.0)
        return _polish(G, c, x, lam, -parts(x)[1] <= 1e-3)

    polished, exact = jax.lax.cond(exact, lambda: (polished, exact), from_start)
    return jnp.where(ok & exact, polished, a), ok, ok & exact


def _polish(G, c, a, lam, active):
    r"""The program's exact optimum from the interior point's last iterate, by Newton's method
    on its KKT conditions with the active set that the iterate shows (``c + Df^T nu = 0``,
    ``f_i = 0`` where a constraint is active, ``nu_i = 0`` elsewhere), and whether it is
    certified: a KKT point with clearly positive multipliers and clearly slack inactive
    constraints, which for a convex program is the optimum. The interior point alone reaches
    an optimum only as ``tol / nu_i`` where a multiplier ``nu_i`` is small: in float32 the
    programs at large ``|g|`` (TorchJD's objective is then nearly ``1^T G' b``) ended with
    residuals ``alpha_i (G alpha)_i - 1`` of 1e-3 to 0.1 where float64's were 1e-8 (updates
    8e-3 apart). Two rounds: the second with the active set corrected by the first (a violated
    constraint joins, a negative multiplier leaves)."""
    m = G.shape[0]
    dtype = G.dtype
    tiny = jnp.finfo(dtype).tiny
    eps = jnp.finfo(dtype).eps

    def pieces(x):
        u = G @ x
        sx = jnp.where(x > 0, x, 1.0)
        su = jnp.where(u > 0, u, 1.0)
        fx = -(jnp.log(sx) + jnp.log(su))
        Dfx = -(jnp.diag(1.0 / sx) + G / su[:, None])
        return fx, Dfx, sx, su, jnp.all(x > 0) & jnp.all(u > 0)

    def newton(carry, _):
        x, nu, active = carry
        fx, Dfx, sx, su, _ = pieces(x)
        H = jnp.diag(nu / sx**2) + G.T @ ((nu / su**2)[:, None] * G)
        lower = [jnp.where(active[:, None], Dfx, 0.0), jnp.diag(jnp.where(active, 0.0, 1.0))]
        K = jnp.block([[H, Dfx.T], lower])
        r = jnp.concatenate([c + Dfx.T @ nu, jnp.where(active, fx, nu)])
        d = solve(K, -r)
        return (x + d[:m], nu + d[m:], active), None

    def round_(x, nu, active):
        nu = jnp.where(active, nu, 0.0)
        (x, nu, _), _ = jax.lax.scan(newton, (x, nu, active), None, length=4)
        return x, nu

    x, nu = round_(a, lam, active)
    fx = pieces(x)[0]
    active = jnp.where(active, nu >= 0, fx >= 0)
    x, nu = round_(x, nu, active)
    fx, Dfx, _, _, positive = pieces(x)
    # certified: stationary and on the active constraints to rounding, the multipliers clearly
    # positive and the inactive constraints clearly slack (1e-3 on quantities of order 1)
    loose = jnp.sqrt(eps)
    top = jnp.maximum(jnp.max(jnp.abs(nu)), tiny)
    exact = (
        positive
        & jnp.all(jnp.isfinite(x))
        & jnp.all(jnp.isfinite(nu))
        & (jnp.linalg.norm(c + Dfx.T @ nu) <= loose * jnp.linalg.norm(jnp.abs(Dfx.T) @ jnp.abs(nu)))
        & jnp.all(jnp.where(active, jnp.abs(fx) <= loose, fx <= -1e-3))
        & jnp.all(jnp.where(active, nu >= 1e-3 * top, True))
    )
    return x, exact


class NashMTLWeighting(AbstractWeighting):
    r"""Weights of Nash-MTL, from the Gramian: the bargaining solution
    ``alpha_i (G alpha)_i = 1`` (TorchJD reads the Jacobian; only ``J J^T`` is needed).

    The solution is sought in ``b = alpha sqrt(nf)``, the weights of ``G' = G / nf`` with
    ``nf = |G|_F`` (``b_i (G' b)_i = 1``: the same problem at every scale of the gradients), by
    up to ``optim_niter`` of TorchJD's convex programs (see :meth:`_solve`), warm started from
    the previous call's ``alpha`` (ones at first). The sequence stops when a program moves
    ``b`` by less than ``max(1e-6, tol |b|)`` (``tol``: 1e-9 in float64, 1e-4 in float32):
    TorchJD's second rule, ``|alpha_new - alpha| < 1e-6``, taken in ``b`` rather than in
    ``alpha``, which scales like ``1 / |g|`` (in ``alpha`` the rule never held in float32 at
    ``|g| = 1e-10`` and held after one program at ``|g| = 1e20``). TorchJD's first rule,
    ``|G' alpha - 1 / alpha| < 1e-3``, holds at the solution only by coincidence and is not
    used. Weights are recomputed every ``update_weights_every`` calls and reused in between.
    If ``max_norm > 0`` and ``|J^T alpha| > max_norm``, alpha is rescaled to that norm.

    Values: in float32 the weights are NaN unless the sequence settled (the rule above, on a
    program solved to its KKT conditions) or kept the previous ``alpha`` at its first program
    for want of a strictly feasible point; float64 returns the last iterate, as TorchJD
    would. Measured on 8232 Jacobians (m = 2..8, n = 3..10, 21 seeds, ``|g|`` from 1e-30 to
    1e20; ``tests/test_nash_mtl_scale.py``): 20 float32 answers are NaN, 14 where float64 did
    not reach the solution either (residual 1 and more) and 6 on one rank-deficient 7 x 5
    Jacobian that float64 solves; every other is float64's to 2e-5 (with TorchJD's rules
    in ``alpha``: none NaN, and float32 updates 0.57 from float64's at m = 2, 7e20 times too
    long at ``|g| = 1e20``).

    Where TorchJD fails, the answer is defined: when a program has no strictly feasible start
    (0 is in the hull of the normalised gradients: e.g. a zero row, or more objectives than
    directions that please them all) the previous ``alpha`` is kept, as TorchJD does on a
    solver error; an all-zero Gramian keeps ``alpha`` (the update is zero); m = 1 gives
    ``alpha = 1`` (TorchJD raises), clipped to ``max_norm / |g|``. State:
    :class:`NashMTLState`; its ``residual`` says how far the weights are from
    ``alpha_i (G alpha)_i = 1`` (e.g. when the previous ``alpha`` was kept).

    Args:
        max_norm: the update's norm is clipped to it (0: no clipping).
        update_weights_every: the weights are recomputed every this many calls.
        optim_niter: convex programs per recomputation at most.

    Reference: Navon et al., "Multi-task learning as a bargaining game", ICML 2022.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> weighting = jd.nash_mtl_weighting()
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> w, state = weighting.update(G, weighting.init(2))
    >>> int(state.count)
    1
    """

    max_norm: Scalar = number("max_norm", 1.0, check="nonnegative")
    update_weights_every: int = static_int("update_weights_every", 1)
    optim_niter: int = static_int("optim_niter", 20)
    has_state = True

    def _init(self, m, dtype):
        return NashMTLState(
            jnp.ones((m,), dtype), jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, dtype)
        )

    def _weigh(self, G, state, key):
        return self._weigh_at_scale(G, jnp.zeros((), G.dtype), state, key)

    def _weigh_at_scale(self, G, log2_t, state, key):
        # G is 2^log2_t times the Gramian (an aggregator's rescale when J J^T was out of
        # range). The bargaining solution has alpha(t G) = t^(-1/2) alpha(G); the programs and
        # stopping rules in _solve are TorchJD's at the true scale whatever scale G is at.
        dtype = state.alpha.dtype
        G = G.astype(dtype)
        log2_t = log2_t.astype(dtype)
        to_true = jnp.exp2(0.5 * log2_t)
        refresh = state.count % self.update_weights_every == 0
        alpha, trusted = jax.lax.cond(
            refresh,
            lambda G, a, t: self._solve_lanewise(G, a, t),
            lambda G, a, t: (a, jnp.asarray(True)),
            G,
            state.alpha / to_true,
            log2_t,
        )
        # alpha_i (G alpha)_i at any scale (exact powers of two cancel)
        residual = jnp.max(jnp.abs(alpha * (G @ alpha) - 1.0))
        residual = jnp.where(refresh, residual, state.residual)
        if dtype != jnp.float64:
            # float32 gives float64's weights or NaN (the value policy): an answer it cannot
            # stand by (see _solve) is NaN, in the state too (so are the weights reused until
            # the next solve, which starts afresh); residual says how far it was.
            alpha = jnp.where(trusted, alpha, jnp.nan)
        max_norm = as_dtype(self.max_norm, dtype)
        # |J^T alpha| at any scale, at unit size first (a kept alpha = 1 at |g| = 1e20 has
        # alpha^T G alpha out of float32's range at G's scale)
        top = jnp.max(jnp.abs(alpha))
        unit = alpha / jnp.where(top > 0, top, 1.0)
        norm = top * jnp.sqrt(jnp.maximum(unit @ G @ unit, 0.0))
        clip = (max_norm > 0) & (norm > max_norm)
        alpha_out = jnp.where(clip, alpha / jnp.where(clip, norm, 1.0) * max_norm, alpha)
        new_state = NashMTLState(alpha * to_true, state.count + 1, residual)
        return alpha_out * to_true, new_state

    def _solve_lanewise(self, G, alpha, log2_t):
        """:meth:`_solve`, mapped lane by lane under ``jax.vmap`` (``lax.map``). Batching its
        nested data-dependent loops made every lane wait for the slowest at every level: on four
        ill-scaled float32 lanes the batched loops ran for minutes where each lane alone takes
        milliseconds (issue #13 item 5). Mapped, a batch costs the sum of its lanes and each
        lane's answer is the one it gets alone."""

        @jax.custom_batching.custom_vmap
        def solve(G, alpha, log2_t):
            return self._solve(G, alpha, log2_t)

        @solve.def_vmap
        def _rule(axis_size, in_batched, *args):
            args = tuple(
                x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                for x, batched in zip(args, in_batched)
            )
            return jax.lax.map(lambda a: solve(*a), args), (True, True)

        return solve(G, alpha, log2_t)

    def _solve(self, GTG, alpha, log2_t):
        r"""TorchJD's sequence for the Gramian ``GTG 2^-log2_t``, from ``alpha`` (at ``GTG``'s
        scale; the answer too). With ``nf`` the true ``|G|_F``, ``G' = GTG / |GTG|_F`` and the
        true weights ``a``, TorchJD's program is ``min 1^T G' a + phi'(prev)^T (a - prev) / nf``
        s.t. ``a_i nf (G' a)_i >= 1``. In ``b = a sqrt(nf)`` (``b_i (G' b)_i >= 1``: order 1 at
        every scale) it is ``min c^T b`` with ``c`` a positive multiple of
        ``sqrt(nf) 1^T G' + 1 / b_prev + G' (1 / (G' b_prev))``: the iterates never leave the range
        of float32 however large or small the gradients (``a`` itself, in float32, did at
        ``|g| = 1e-10``). The stopping rule is evaluated on ``b`` (see the class docstring), and
        a program is linearised at ``b_prev`` only where it is strictly feasible (else at the
        strictly feasible start that the program starts from). Returns ``(alpha, trusted)``:
        ``trusted`` is False when the sequence did not settle (see the class docstring)."""
        dtype = GTG.dtype
        m = GTG.shape[0]
        nf_s = scaled_norm(GTG)
        solvable = (nf_s > 0) & jnp.isfinite(nf_s)
        nf_s = jnp.where(solvable, nf_s, 1.0)
        G = GTG / nf_s
        root = jnp.sqrt(nf_s)
        log_nf = jnp.log(nf_s) - log2_t * jnp.log(2.0).astype(dtype)  # of the true Gramian
        # sqrt(nf) 1^T G' + phi', divided by sqrt(nf) when nf > 1 (neither term overflows)
        big = log_nf > 0
        first = jnp.exp(jnp.where(big, 0.0, 0.5 * log_nf))
        second = jnp.exp(jnp.where(big, -0.5 * log_nf, 0.0))
        tol = 1e-10 if dtype == jnp.float64 else 1e-5
        max_iter = 100
        settle = 1e-9 if dtype == jnp.float64 else 1e-4

        # A strictly feasible start (b > 0, G b > 0): the previous b, else ones, else
        # the minimum-norm point of the normalised gradients' hull (MGDA: its d satisfies
        # g_i . d >= |d|^2 > 0, and d = 0 certifies that no strictly feasible point exists).
        diag = jnp.diagonal(G)
        inv = jnp.where(diag > 0, 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 0.0)
        C = G * jnp.outer(inv, inv)
        margin = 1e-9 if dtype == jnp.float64 else 1e-5

        def strict(a):
            beta = a / jnp.where(inv > 0, inv, 1.0)
            # homogeneous in beta: at unit size (beta @ C beta overflowed float32 for b ~ 1e20)
            beta = beta / jnp.maximum(jnp.max(jnp.abs(beta)), jnp.finfo(dtype).tiny)
            Cb = C @ beta
            return jnp.all(a > 0) & jnp.all(Cb > margin * jnp.sqrt(jnp.maximum(beta @ Cb, 0.0)))

        ones = jnp.ones((m,), dtype)

        def mgda_start():
            lam = MGDAWeighting(epsilon=1e-12, max_iters=1000).minimum_norm(C)
            spread = jnp.maximum(jnp.max(jnp.abs(C @ ones)), jnp.finfo(dtype).tiny)
            return (lam + 0.5 * (lam @ C @ lam) / spread) * inv

        def start_from(b):
            # Lazily: the Frank-Wolfe certificate runs only when no cheaper start is strict.
            def fallback():
                return jax.lax.cond(strict(ones), lambda: ones, mgda_start)

            return jax.lax.cond(strict(b), lambda: b, fallback)

        def cond(carry):
            _, stop, it, _ = carry
            return (~stop) & (it < self.optim_niter)

        # Each program is solved in y = b / s with s_i = 1 / sqrt(G'_ii), i.e. for the gradients
        # at unit norm: b_i (G' b)_i = y_i (C y)_i and c^T b = (s c)^T y. The same program (the
        # interior point is affine invariant) but well scaled for float32 whatever the gradients'
        # norms (rows of norms 1e-2 .. 1e2 made float32's Newton steps useless).
        s = jnp.where(diag > 0, inv, 1.0)

        def program(b):
            # linearised at b and started from b (strictly feasible)
            c = first * jnp.sum(G, axis=0) + second * (1.0 / b + G @ (1.0 / (G @ b)))
            y, ok, exact = _solve_step(C, s * c, b / s, tol, max_iter)
            return y * s, ok, exact

        def rescued(b, start):
            # A program float32 could not solve (stagnating Newton steps) is retried once from
            # the strictly feasible start brought onto the constraints' boundary (in logarithms:
            # start * (G start) overflows float32 for a start of 1e20).
            log_h = jnp.log(start) + jnp.log(G @ start)
            v = start * jnp.exp(-0.5 * jnp.min(log_h))
            new, ok, exact = program(v)
            return jnp.where(ok, new, b), ok, exact

        def body(carry):
            b, _, it, _ = carry
            start = start_from(b)
            # Linearised at the strict start: b itself whenever it is strictly feasible (then
            # TorchJD's program); at a b with (G' b)_i <= 0, TorchJD's phi'(b) has terms of
            # the wrong sign and the program can be unbounded (the iterate went to |b| ~ 2e4
            # at |g| = 1e-10, and 20 programs did not bring it back).
            new, ok, exact = program(start)
            new, ok, exact = jax.lax.cond(ok, lambda: (new, ok, exact), lambda: rescued(b, start))
            # TorchJD's second stopping rule, in b (see the class docstring), with a relative
            # floor at the dtype's precision.
            still = jnp.linalg.norm(new - b) < jnp.maximum(1e-6, settle * jnp.linalg.norm(new))
            # An answer float32 can stand by: a fixed point of the sequence (a program that no
            # longer moves b), or the previous alpha kept because no strictly feasible point
            # exists (0 in the hull of the gradients).
            trusted = (ok & still & exact) | (~ok & (it == 0) & ~strict(start))
            return new, ~ok | still, it + 1, trusted

        if m == 1:  # TorchJD's first stopping rule holds at once at alpha = 1 (G' = 1)
            return jnp.ones((1,), dtype) * jnp.exp2(-0.5 * log2_t), jnp.asarray(True)
        init = (alpha * root, ~solvable, jnp.asarray(0), ~solvable)
        b, _, _, trusted = jax.lax.while_loop(cond, body, init)
        return b / root, trusted


class NashMTL(GramianWeightedAggregator):
    """Nash-MTL aggregator (stateful; TorchJD's ``NashMTL``, with no ``n_tasks``: m comes from
    ``init``)."""

    weighting_class = NashMTLWeighting


nash_mtl = spelling(NashMTL, "nash_mtl", reads="jacobian")
nash_mtl_weighting = spelling(NashMTLWeighting, "nash_mtl_weighting", reads="gramian")

"""CAGrad (Liu et al., NeurIPS 2021, Algorithm 1), solved in-graph (no cvxpy)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg
from jaxtyping import Array, Float

from .._linalg import project_onto_simplex_pairwise, scaled_norm
from .._typing import Scalar
from ..solvers import normalize_regularize
from ._abstract import AbstractWeighting
from ._factored import FactorWeightedAggregator
from ._fields import as_dtype, choice, number, spelling, static_int, static_tol


def _rescale(value):
    if value not in (0, 1, 2) or isinstance(value, bool):
        raise ValueError(f"Invalid rescale={value!r}; expected 0, 1 or 2 (LibMTL's options).")
    return int(value)


class CAGradWeighting(AbstractWeighting):
    r"""Weights of CAGrad, as TorchJD computes them: with ``G_n = G / tr(G)`` (zeros when the
    trace is below ``tiny / eps`` of its dtype; TorchJD: below ``norm_eps``), ``b = G_n 1/m`` and
    ``phi = c sqrt(1^T G_n 1) / m``, solve ``min_{w in simplex} b^T w + phi sqrt(w^T G_n w)``,
    then ``weights = 1/m + (phi / q) w`` with ``q = sqrt(w^T G_n w)`` (zeros when
    ``q < norm_eps``, 1e-4 by default: ``q`` is ``|J^T w| / |J|_F``, free of J's scale).

    The convex problem is solved exactly on a face of the simplex: on a support ``S``, the KKT
    conditions give ``w`` affine in ``t = q / phi`` and ``t`` from a quadratic (closed form, one
    ``(m+1)``-square solve), and block pivoting on the signs finds ``S``; a candidate is taken
    only when it passes a KKT test (relative to the size of the gradient's terms). Where
    pivoting does not settle (degenerate faces, float32 rounding), accelerated projected
    gradient on the simplex (FISTA with backtracking and adaptive restart; a sort-free O(m^2)
    projection) runs until the gradient mapping is below ``tol`` (default 1e-12 in float64,
    1e-6 in float32) or its rounding floor, ``max_iter`` iterations, or 20 restarts in a row (no
    progress left in the arithmetic), trying the supports its iterate settles on. On the
    benchmark families (float64, m = 3..32), pivoting alone ends the median solve and the worst
    took 3,125 sequential steps, where the loop alone ran to ``max_iter``
    (``benchmarks/results/cagrad.md``): few sequential steps are what accelerators need.

    The aggregator :class:`CAGrad` (``factor="qr"``, the default) runs the same solve on the
    triangular factor ``R`` of ``J^T = Q R`` (as ConFIG does) instead of ``G = R^T R``:
    ``q = |R w|`` then keeps J's precision. In float32 through ``G``, ``q^2`` near TorchJD's
    threshold (``q ~ 1e-4``, ``q^2 ~ 1e-8``) is lost in the rounding of ``w^T G w``: the
    threshold went the wrong way and the weights grew to ``1/q`` (TorchJD's non-conflict test
    failed 9x over its tolerance; TorchJD solves in float64). The factor also puts ``J``'s scale
    outside the solve: no over- or underflow of ``J J^T``.

    Args:
        c: the radius of the ball around the mean gradient (``c = 0``: the mean).
        norm_eps: ``None`` (default): the Gramian is zeroed instead of divided by its trace
            only when the trace is below ``tiny / eps`` of its dtype (~1e-31 in float32: no
            longer known to the dtype's precision), so the weights are the same at every scale,
            and the zero update is taken when ``q < 1e-4``. A number: TorchJD's
            rule for both tests, ``tr(G) < norm_eps`` and ``q < norm_eps`` (``1e-4``: TorchJD's
            default and output; on gradients of norm ~1e-3 the update is then zero).
        tol: stopping tolerance of the inner solve (default by dtype).
        max_iter: iteration cap of the inner solve.
        rescale: LibMTL's option: ``0`` (default, TorchJD's) keeps the weights, ``1`` divides
            them by ``1 + c^2`` and ``2`` by ``1 + c`` (LibMTL's default is 1), so that the
            update's scale does not grow with ``c``.
        factor: for the aggregator: ``"qr"`` (default; J's triangular factor) or ``"gramian"``
            (``J J^T``: one matrix product instead of a QR, as exact in float64). A weighting
            given a Gramian always uses it.

    Reference: Liu et al., "Conflict-averse gradient descent for multi-task learning",
    NeurIPS 2021.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.cagrad_weighting(G, c=0.5), float), 4)
    array([0.7041, 0.5   ])
    """

    c: Scalar = number("c", check="nonnegative")
    norm_eps: Scalar | None = number("norm_eps", check="nonnegative", optional=True)
    tol: float | None = static_tol("tol")
    max_iter: int = static_int("max_iter", 20_000)
    rescale: int = eqx.field(static=True, default=0, converter=_rescale)
    factor: str = choice("factor", "qr", ("qr", "gramian"))

    def _trace_eps(self, dtype):
        """``norm_eps`` for the trace test (None: the dtype's rule)."""
        return None if self.norm_eps is None else as_dtype(self.norm_eps, dtype)

    def _weigh(self, G, state, key):
        Gn = normalize_regularize(G, self._trace_eps(G.dtype), jnp.zeros((), G.dtype))
        return self._solve(_of_gramian(Gn), G.shape[0], G.dtype), state

    def _weigh_at_scale(self, G, log2_t, state, key):
        """``G`` is ``2^log2_t J J^T`` (J rescaled because J J^T left the range): the weights
        are scale-invariant but for an absolute ``norm_eps``, compared with the true trace."""
        Gn = normalize_regularize(G, self._trace_eps(G.dtype), jnp.zeros((), G.dtype), log2_t)
        return self._solve(_of_gramian(Gn), G.shape[0], G.dtype), state

    def _weigh_factor(self, R: Float[Array, "m m"], log2_scale: Float[Array, ""], state):
        """The weights from ``R`` (m x m) with ``R^T R = 2^log2_scale J J^T``: the solve on
        ``R / |R|_F`` (TorchJD's ``G / tr(G)``), ``q = |R w| / |R|_F``; zeros when
        ``|R|_F^2 < tiny / eps`` (``norm_eps=None``: J = 0, as R is J's factor rescaled) or
        ``tr(J J^T) < norm_eps`` (compared in logarithms: it may be out of range); a
        non-finite ``R`` NaN."""
        dtype = R.dtype
        frob = scaled_norm(R)
        if self.norm_eps is None:  # normalize_regularize's rule, on R^T R (J rescaled)
            info = jnp.finfo(dtype)
            keep = frob * frob >= float(info.tiny) / float(info.eps)
        else:
            log2_trace = 2.0 * jnp.log2(frob) - log2_scale
            norm_eps = as_dtype(self.norm_eps, dtype)
            keep = (frob > 0) & (log2_trace >= jnp.log2(norm_eps))
        Rn = jnp.where(keep, R / jnp.where(keep, frob, 1.0), 0.0)
        m = R.shape[1]
        w = self._solve(_of_factor(Rn), m, dtype)
        return jnp.where(jnp.all(jnp.isfinite(R)), w, jnp.nan), state

    def _solve(self, problem, m, dtype):
        """The weights from ``problem = (apply, norm, gram)`` (:func:`_of_gramian`,
        :func:`_of_factor`)."""
        apply, norm, gram = problem
        ones = jnp.full((m,), 1.0 / m, dtype)
        phi = as_dtype(self.c, dtype) * norm(ones)
        tol = self.tol if self.tol is not None else (1e-12 if dtype == jnp.float64 else 1e-6)
        w, _, _ = _minimize(apply, norm, gram, phi, tol, self.max_iter)
        q = norm(w)
        # (TorchJD's Pareto test; q is relative to |J|_F: the same at every scale)
        ok = q >= as_dtype(1e-4 if self.norm_eps is None else self.norm_eps, dtype)
        w = jnp.where(ok, ones + (phi / jnp.where(ok, q, 1.0)) * w, 0.0)
        c = as_dtype(self.c, dtype)
        divisor = (1.0, 1.0 + c * c, 1.0 + c)[self.rescale]
        return w / divisor


def _of_gramian(Gn):
    """``(apply, norm, gram)`` of the normalised Gramian: ``w -> G_n w``,
    ``w -> sqrt(w^T G_n w)`` and ``G_n``."""
    return (lambda w: Gn @ w), (lambda w: jnp.sqrt(jnp.maximum(w @ Gn @ w, 0.0))), Gn


def _of_factor(Rn):
    """The same from a factor (``R_n^T R_n = G_n``): ``q = |R_n w|`` keeps J's precision."""
    return (lambda w: Rn.T @ (Rn @ w)), (lambda w: jnp.linalg.norm(Rn @ w)), Rn.T @ Rn


REFINE = 3


def _on_support(gram, size, top, b, phi, support, even=False):
    r"""The minimiser of ``b^T w + phi |R w|`` (``R^T R = G``) over the simplex's face
    ``{w >= 0, 1^T w = 1, w_i = 0 off the support}``, from its KKT conditions.

    With ``t = |R w| / phi`` they read ``G_SS w_S + t b_S = nu 1``, ``1^T w_S = 1``: the
    minimiser of ``w^T G w / 2 + t b^T w`` on the face, ``w(t) = alpha + t beta`` (one
    ``(m+1)``-square solve, two right-hand sides). Then ``|R w(t)|^2 = phi^2 t^2`` is a
    quadratic in ``t``; its smallest positive root, where ``|R w(t)| - phi t`` falls through 0,
    is ``t = 2 a_0 / (-a_1 + sqrt(a_1^2 - 4 a_2 a_0))``. Returns the candidate (clipped to the
    face) and the next support of block pivoting (the support itself where the face has no
    positive root). Nothing here checks the signs (``w`` on the support, the multipliers off
    it): the caller verifies the candidate. (``size = |G|``, ``top = max_i G_ii``.)"""
    m = b.shape[0]
    dtype = b.dtype
    s = support.astype(dtype)
    eps = jnp.finfo(dtype).eps

    def kkt(ridge):
        face = gram * s[:, None] * s[None, :] + jnp.diag(1.0 - s + ridge * s)
        return jnp.block([[face, -s[:, None]], [s[None, :], jnp.zeros((1, 1), dtype)]])

    # The face's system, with a ridge at G's rounding level (singular faces stay solvable; the
    # caller's KKT test is on G itself), by its own LU: backward stable, also on ill-conditioned
    # faces. even=True: by an LU with a ridge sqrt(eps) max G_ii refined against it (REFINE
    # steps), whose conditioning splits the weights of dependent rows, which the face does not
    # determine, as a ridge does: evenly between equal rows (the first splits them by rounding).
    rhs = jnp.zeros((m + 1, 2), dtype).at[m, 0].set(1.0).at[:m, 1].set(-b * s)
    K = kkt(m * eps * top)
    if even:
        factor = jax.scipy.linalg.lu_factor(kkt(jnp.sqrt(eps) * top))
        sol = jax.scipy.linalg.lu_solve(factor, rhs)
        for _ in range(REFINE):
            sol = sol + jax.scipy.linalg.lu_solve(factor, rhs - K @ sol)
    else:
        sol = jnp.linalg.solve(K, rhs)

    def candidate(sol):
        alpha, beta = sol[:m, 0], sol[:m, 1]
        G_beta = gram @ beta
        a0 = alpha @ gram @ alpha
        a1 = 2.0 * alpha @ G_beta
        a2 = beta @ G_beta - phi * phi
        root = jnp.sqrt(jnp.maximum(a1 * a1 - 4.0 * a2 * a0, 0.0))
        t = 2.0 * a0 / (root - a1)
        nu = sol[m, 0] + t * sol[m, 1]
        raw = alpha + t * beta
        w = jnp.maximum(raw, 0.0) * s
        # the next support (block pivoting): drop the negative weights, add the indices whose
        # multiplier (G w + t b - nu)_j is negative
        below = gram @ raw + t * b - nu < -16 * eps * (size @ jnp.abs(raw))
        pivoted = jnp.where(support, raw > 0, below)
        # (no positive root, or NaN: the face holds no stationary point; no pivoting from it)
        valid = (t > 0) & jnp.all(jnp.isfinite(raw))
        return w / jnp.sum(w), jnp.where(valid, pivoted, support)

    return candidate(sol)


# Pivoting steps: from the full support before the loop, and from a support the loop keeps;
# block pivots while they help, and BUDGET more. STALL: restarts in a row that end the loop.
PIVOTS_FIRST = 10
PIVOTS_STEP = 2
BUDGET = 3
STALL = 20


def _minimize(apply, norm, gram, phi, tol, max_iter, on_support=True):
    r"""``argmin_{w in simplex} b^T w + phi sqrt(w^T G w)`` with ``b = G 1 / m``; also the
    number of iterations and of loop steps in sequence (iterations, backtracking and pivoting
    steps: what a GPU runs one after the other).

    An active-set solve first: the exact minimiser on a support (:func:`_on_support`), pivoted
    from the full support (block pivoting while the number of sign violations falls, then one
    index at a time, Murty's rule, against cycles), taken when it passes the KKT test below.
    Where pivoting does not settle (degenerate faces, float32 rounding), accelerated projected
    gradient (FISTA with backtracking and adaptive restart) runs until its gradient mapping is
    below ``tol``, its rounding floor or ``STALL`` restarts in a row; it identifies the
    minimiser's support, and a support it keeps for two iterations is tried once
    (``PIVOTS_STEP`` pivots from it).

    KKT test of a candidate ``w`` (on the simplex, the gradient ``g = b + phi G w / q`` is
    smallest wherever ``w_i > 0``): ``g_i <= min_j g_j + tol s`` there, with
    ``s = | |G| 1/m |_inf + phi | |G| w |_inf / q`` the size of the terms of ``g`` (which cancel
    to near zero where ``q`` is small), and ``q`` well above its rounding (the norm must be
    differentiable there); or, for a support that pivoting keeps (every sign condition holds as
    computed) and ``q >= sqrt(eps) |R|``, ``min(sqrt(eps), 1e5 eps) s`` (the face's solve is
    then as exact as its conditioning allows). The taken face is solved again by
    ``_on_support(even=True)``, kept where it passes the same test (equal rows share evenly).
    (``on_support=False``: the plain loop, for comparisons.)"""
    m = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    ones = jnp.full((m,), 1.0 / m, dtype)
    b = apply(ones)
    tiny = jnp.finfo(dtype).tiny
    size = jnp.abs(gram)
    diagonal = jnp.max(jnp.diagonal(gram))
    top = jnp.sqrt(diagonal)  # the largest |R e_i|
    smallest_q = 64 * eps * top
    b_size = jnp.max(size @ ones)  # the size of b's terms
    zero = jnp.zeros((), jnp.int32)

    def f(w):
        return b @ w + phi * norm(w)

    def grad(w):
        q = jnp.maximum(norm(w), jnp.sqrt(tiny))
        return b + phi * apply(w) / q

    def mapping(w, L):
        """The gradient mapping's size, zero below the rounding of the projection (an ulp of w,
        times L; float32 would otherwise run max_iter iterations)."""
        step = project_onto_simplex_pairwise(w - grad(w) / L)
        gap = jnp.max(jnp.abs(w - step)) * L
        return jnp.where(gap <= 16 * eps * L, 0.0, gap)

    def test(candidate, support, pivoted):
        """Whether ``candidate`` passes the KKT test."""
        q = norm(candidate)
        smooth = q > smallest_q  # (a face whose minimum-norm point is 0 gives t = 0, q ~ 0)
        q = jnp.where(smooth, q, 1.0)
        g = b + phi * apply(candidate) / q
        slack = jnp.max(jnp.where(candidate > 0, g, -jnp.inf)) - jnp.min(g)
        scale = b_size + phi * jnp.max(size @ candidate) / q
        verified = slack <= jnp.maximum(tol, 16 * eps) * scale  # (False on NaN)
        # a support that pivoting keeps (every sign condition holds as computed): its face's
        # solve is as exact as the face's conditioning allows; taken with a wider margin when
        # q is well resolved (else the 1/q in s would make any margin vacuous)
        margin = jnp.maximum(tol, jnp.minimum(jnp.sqrt(eps), 1e5 * eps))
        resolved = q >= jnp.sqrt(eps) * top
        kept = jnp.all(pivoted == support) & resolved & (slack <= margin * scale)
        return smooth & (verified | kept)

    def exact(w, gap, pivots):
        """``(w, gap, steps)``: the verified minimiser found by pivoting from the support of
        ``w`` (and gap 0), else ``w`` and ``gap``."""
        if not on_support:
            return w, gap, zero

        def pivot_cond(carry):
            taken, settled, k = carry[1], carry[-2], carry[-1]
            return ~taken & ~settled & (k < pivots)

        def pivot(carry):
            w, _, support, _, best, budget, _, k = carry
            candidate, pivoted = _on_support(gram, size, diagonal, b, phi, support)
            taken = test(candidate, support, pivoted)
            wrong = pivoted != support
            count = jnp.sum(wrong, dtype=jnp.int32)
            budget = jnp.where(count < best, BUDGET, budget - 1)
            last = jnp.max(jnp.where(wrong, jnp.arange(m), -1))
            murty = support ^ (jnp.arange(m) == last)
            w = jnp.where(taken, candidate, w)
            following = jnp.where(budget >= 0, pivoted, murty)
            # (a support that pivoting keeps is final: a taken candidate, or none)
            settled = count == 0
            return w, taken, following, support, jnp.minimum(best, count), budget, settled, k + 1

        first = jnp.asarray(m + 1, jnp.int32)
        support = w > 0
        no = jnp.asarray(False)
        carry = (w, no, support, support, first, jnp.asarray(BUDGET, jnp.int32), no, zero)
        w, taken, _, support, *_, k = jax.lax.while_loop(pivot_cond, pivot, carry)

        def evenly():
            """The taken face solved again, splitting dependent rows evenly (when it passes)."""
            candidate, _ = _on_support(gram, size, diagonal, b, phi, support, even=True)
            return jnp.where(test(candidate, support, support), candidate, w)

        w = jax.lax.cond(taken, evenly, lambda: w)
        return w, jnp.where(taken, 0.0, gap), k

    def cond(state):
        it, gap = state[4], state[5]
        return (gap > tol) & (it < max_iter)

    def body(state):
        w, y, t, L, it, _, previous, tried, steps, stuck = state
        gy, fy = grad(y), f(y)

        def bt_cond(carry):
            L, _ = carry
            z = project_onto_simplex_pairwise(y - gy / L)
            d = z - y
            return (f(z) > fy + gy @ d + 0.5 * L * d @ d + 1e-15 * jnp.abs(fy)) & (L < 1e30)

        L, steps = jax.lax.while_loop(bt_cond, lambda c: (2.0 * c[0], c[1] + 1), (L, steps + 1))
        w_new = project_onto_simplex_pairwise(y - gy / L)
        restart = f(w_new) > f(w)
        t_new = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)))
        y_new = jnp.where(restart, w, w_new + ((t - 1.0) / t_new) * (w_new - w))
        w_new = jnp.where(restart, w, w_new)
        # Restarts in a row: plain projected steps do not decrease f, which only rounding (or
        # the kink of the norm at q = 0) can do, as backtracking ensures descent: STALL of
        # them in a row leave no progress to make, stop.
        stuck = jnp.where(restart, stuck + 1, 0)
        gap = jnp.where(stuck >= STALL, 0.0, mapping(w_new, L))
        # The support is tried when the loop kept it for two iterations (not while it changes
        # at every step) and it was not tried already (the same candidates again).
        support = w_new > 0
        new = jnp.all(support == previous) & jnp.any(support != tried)
        w_new, gap, pivoted = jax.lax.cond(
            new, lambda: exact(w_new, gap, PIVOTS_STEP), lambda: (w_new, gap, zero)
        )
        tried = jnp.where(new, support, tried)
        t_new = jnp.where(restart, 1.0, t_new)
        state = w_new, y_new, t_new, 0.9 * L, it + 1, gap, support, tried, steps + pivoted, stuck
        return state

    one = jnp.asarray(1.0, dtype)
    w0, gap0, steps = exact(ones, jnp.asarray(jnp.inf, dtype), PIVOTS_FIRST)
    full = jnp.ones((m,), bool)
    init = (w0, w0, one, one, zero, gap0, full, full, steps, zero)
    w, *_, iterations, _, _, _, steps, _ = jax.lax.while_loop(cond, body, init)
    return w, iterations, steps


class CAGrad(FactorWeightedAggregator):
    """CAGrad aggregator: ``J^T w`` with :class:`CAGradWeighting` weights (TorchJD's ``CAGrad``)."""

    weighting_class = CAGradWeighting


cagrad = spelling(CAGrad, "cagrad", reads="jacobian")
cagrad_weighting = spelling(CAGradWeighting, "cagrad_weighting", reads="gramian")

r"""Block principal pivoting for ``min_v v^T G v  s.t.  v >= u``.

With ``s = v - u`` and ``c = G u`` the problem is the linear complementarity problem
``s >= 0, lambda = G s + c >= 0, s^T lambda = 0``. Block principal pivoting (Júdice & Pires 1994;
Kim & Park 2011 for NNLS) guesses the free set F (``s_F`` solves ``G_FF s_F = -c_F``, ``s`` is 0
elsewhere), flips every infeasible index at once while their number decreases, and falls back to
Murty's single-index rule (largest infeasible index) after three non-improving steps, which makes
it terminate in finitely many steps for positive definite G. Every iteration is one masked Cholesky
solve per right-hand side, so the solver is a ``lax.while_loop`` with static shapes over a batch
of right-hand sides ("lanes") sharing G. Two things keep the number of factorisations low: from
m = 8 the initial free set is guessed by a few ADMM steps (Boyd et al. 2011; one matrix product
with a shared factorisation for all lanes at once) instead of the sign of ``G u``, so that most
lanes are solved by their first factorisation; and after it each loop iteration gathers only
pending lanes (about k/8 of them), so converged lanes cost nothing.

A PSD but singular G (duplicated or zero rows, with ``reg_eps = 0``) is handled by adding
``m * eps * max(diag G)`` to the diagonal of the masked systems: the projected direction
``J^T v`` is then exact to rounding.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int

from .._spmd import cho_solve, cholesky, cholesky_lower, lower_inverse
from ._base import AbstractSolver

_BACKUP_BUDGET = 3
_COMPACT_MIN_M = 16
_LANE_FRACTION = 8  # pending lanes advanced per loop iteration: about k / 8
# ADMM steps that guess the initial free set, for m >= _WARM_MIN_M: on conflicting Gaussian
# Jacobians (m = 10..256) they leave 0-3% of the lanes to pivot, against ~1-3 pivoting steps per
# lane from the sign of G u; below m = 8 the guess costs more than it saves.
_WARM_MIN_M = 8


# For a vmapped batch of Gramians on an accelerator: 40 ADMM steps at every m. There an ADMM
# step is one batched matrix product and an element-wise kernel, unrolled (no loop), while a
# pivoting step is an iteration of a while loop (its predicate read back by the host, then the
# gathers, the batched solve and the tests) that every lane of the batch takes until the
# slowest lane is done: few lanes need many steps, but one is enough. Measured on the CPU
# (float32, `jit(vmap(UPGrad))` over the benchmark families, 6 batches each, pivoting steps run
# in sequence): 1024 x 16^2: 11-21 with 6 ADMM steps, 3-6 with 40; 256 x 32^2: 9-30 -> 2-7;
# 64 x 64^2: 3-7 -> 2-4; 16 x 128^2: 3-5 -> 2-4 (on an H100/H200 a pivoting step of the
# first two batches cost ~0.12 / ~0.25 ms: benchmarks/results/gpu_h200.md). On the CPU, where
# every step is paid in flops, the extra ADMM steps cost about what they save (timed: within
# +-20%), and a single Gramian has too few lanes for a long tail: both keep the smaller counts.
# (_BATCHED_WARM_ON_CPU: the accelerators' count on the CPU too, for tests and benchmarks.)
_BATCHED_ACCELERATOR_WARM_ITERATIONS = 40
_BATCHED_WARM_ON_CPU = False


def _warm_iterations(m: int, batched: bool = False) -> int:
    """ADMM steps for the guess. One Gramian: 6 below m = 32, 14 up to 128, 20 beyond. Measured
    (float64, one CPU thread, the benchmark families at m = 64 / 128 / 256, the
    pivoting steps left in total over the m lanes): 10 -> 14 steps at m = 128 took low_rank
    41 -> 15, ill_conditioned 76 -> 22, per_sample 105 -> 53, time -6% to -8% on those and
    +1% to +5% on the others; 14 -> 20 at m = 256: per_sample 160 -> 66, low_rank 18 -> 0,
    ill_conditioned 26 -> 2 (time -13% on per_sample, -9% on imbalanced, -3% to +6% on the
    others). A pivoting step costs a gathered factorisation per lane; an ADMM step one product
    with all lanes."""
    if batched and (_BATCHED_WARM_ON_CPU or jax.default_backend() != "cpu"):
        return _BATCHED_ACCELERATOR_WARM_ITERATIONS
    return 6 if m < 32 else 14 if m <= 128 else 20


# Largest estimated condition number for which the dual half-size systems are used: (float32,
# float64); beyond, G^{-1} itself is unreliable.
_DUAL_COND_LIMIT = {False: 1e4, True: 1e10}


def default_max_iter(m: int) -> int:
    return 10 * m + 20


def _ranks(mask):
    """``cumsum(mask) - 1`` along the last axis as a product with a triangular matrix of ones
    (exact in float32 below 2**24, at full precision on accelerators too): XLA's CPU cumsum is a
    reduce-window, ~20x slower here."""
    m = mask.shape[-1]
    upper = jnp.triu(jnp.ones((m, m), jnp.float32))
    counts = jnp.matmul(mask.astype(jnp.float32), upper, precision=jax.lax.Precision.HIGHEST)
    return counts.astype(jnp.int32) - 1


def _first_true(mask, ranks, fill):
    """The indices of the first ``len(fill)`` true entries of ``mask`` in increasing order, then
    ``fill`` for the slots left over: a scatter of the ranks (sorting, or comparing every rank
    with every slot, costs several times more under vmap on CPU)."""
    slots = fill.shape[0]
    indices = jnp.arange(mask.shape[0], dtype=fill.dtype)
    return fill.at[jnp.where(mask, ranks, slots)].set(indices, mode="drop")


# Largest order of the systems solved by unrolled elimination rather than library Cholesky calls,
# on accelerators (H100, float32, vmapped UPGrad weighting of 1024 Gramians of 16 x 16, where the
# loop solves systems of 8 x 8: 5.7 -> 3.5 ms; 64 of 64 x 64 with 32 x 32 systems: 1.9 -> 2.1 ms,
# so not beyond 16). On the CPU LAPACK's small factorisations are cheap and the unrolled steps
# measured 30% slower at 1024 x 16^2: off there unless _UNROLL_ON_CPU (tests, benchmarks).
_UNROLL_MAX = 16
_UNROLL_ON_CPU = False


def _unrolled(K):
    return K <= _UNROLL_MAX and (_UNROLL_ON_CPU or jax.default_backend() != "cpu")


def _eliminate(M, y):
    """Gaussian elimination of ``M`` (no pivoting), unrolled: the upper triangle and ``y``
    carried along (rows above each pivot stay as they are)."""
    rows = jnp.arange(M.shape[-1])
    A = M
    for j in range(M.shape[-1] - 1):
        f = jnp.where(rows > j, A[:, j] / A[j, j], 0.0)
        A = A - f[:, None] * A[j][None, :]
        y = y - f[:, None] * y[j][None, :]
    return A, y


def _spd_pivots(M):
    """The pivots of :func:`_spd_solve` alone (no solve): ``sum log`` of them is ``log det M``."""
    if not _unrolled(M.shape[-1]):
        return jnp.diagonal(cholesky(M)) ** 2
    return jnp.diagonal(_eliminate(M, jnp.zeros((M.shape[-1], 0), M.dtype))[0])


def _spd_solve(M, b, with_pivots=False):
    """``M^{-1} b`` for a symmetric positive definite ``M`` (K x K; ``b`` of shape (K,) or
    (K, r)). Up to ``_UNROLL_MAX`` it is Gaussian elimination without pivoting (backward stable
    for SPD matrices, as Cholesky is) unrolled into 2K element-wise steps on the whole matrix:
    under vmap a batch of small systems becomes a few fused element-wise kernels, where a
    batched Cholesky factorisation and two triangular solves are library calls that cost far
    more than their flops on small matrices (on accelerators; see ``_UNROLL_MAX``). Otherwise
    Cholesky. ``with_pivots``: also the pivots (the D of ``M = L D L^T``; NaN or <= 0 where M is
    not numerically positive definite), whose product is ``det M``."""
    K = M.shape[-1]
    if not _unrolled(K):
        chol = cholesky_lower(M)
        x = cho_solve(chol, b)
        return (x, jnp.diagonal(chol) ** 2) if with_pivots else x
    vector = b.ndim == 1
    A, y = _eliminate(M, b[:, None] if vector else b)
    rows = jnp.arange(K)
    x = jnp.zeros_like(y)
    for j in reversed(range(K)):  # back substitution, column by column
        xj = y[j] / A[j, j]
        x = jnp.where((rows == j)[:, None], xj[None, :], x)
        y = y - jnp.where(rows < j, A[:, j], 0.0)[:, None] * xj[None, :]
    x = x[:, 0] if vector else x
    return (x, jnp.diagonal(A)) if with_pivots else x


def _inverse_from_factor(chol):
    """``M^{-1}`` from the Cholesky factor ``L`` of ``M``: ``W^T W`` with ``W = L^{-1}`` (one
    triangular solve and one matrix product, as LAPACK's potri: the second triangular solve of
    a Cholesky solve against the identity costs several times the product on the CPU).
    Symmetric by construction up to the product's rounding, then symmetrised."""
    W = lower_inverse(chol)
    Minv = W.T @ W
    return 0.5 * (Minv + Minv.T)


def _spd_inverse(M):
    """``M^{-1}`` for a symmetric positive definite ``M``: :func:`_inverse_from_factor`, or
    unrolled elimination where :func:`_spd_solve` uses it."""
    if _unrolled(M.shape[-1]):
        return _spd_solve(M, jnp.eye(M.shape[-1], dtype=M.dtype))
    return _inverse_from_factor(cholesky_lower(M))


def _masked_solve(G, c, free, ridge):
    """Solves ``G_FF s_F = -c_F`` with ``s`` zero outside F; returns ``(s, lambda)``."""
    p = free.astype(G.dtype)
    M = G * p[:, None] * p[None, :] + jnp.diag(1.0 - p + ridge * p)
    s = _spd_solve(M, -c * p) * p
    lam = (G @ s + c) * (1.0 - p)
    return s, lam


def _padded_blocks(G, H, ridge, K):
    """``[[G + ridge I, 0], [0, I_K]]`` stacked over ``[[H, 0], [0, I_K]]``, flattened: slot j
    of a K x K system that has fewer than K indices points at padding index ``m + j``, so one
    gather builds the system with unit rows and columns there, no masking."""
    m = G.shape[0]
    eye = jnp.eye(K, dtype=G.dtype)

    def pad(A):
        return jnp.block([[A, jnp.zeros((m, K), G.dtype)], [jnp.zeros((K, m), G.dtype), eye]])

    return jnp.concatenate([pad(G + ridge * jnp.eye(m, dtype=G.dtype)), pad(H)]).reshape(-1)


def _compact_solve(G, c, u, free, H, blocks, K, chol=None, keep=False):
    """The same solve on a K x K system, K = ceil(m / 2).

    When at most K indices are free, it is the primal system ``G_FF s_F = -c_F`` gathered into
    K slots. Otherwise fewer than K are active and it solves the dual system on the active set A:
    the multipliers ``mu = lambda_A`` satisfy ``H_AA mu = u_A`` with ``H = G^{-1}`` (because
    ``G^{-1} c = u``), then ``s = G^{-1}(mu - c)`` on F. (Measured on conflicting Gramians with
    condition numbers up to 5e6: as accurate as the full-size primal solve, with or without a
    step of iterative refinement on ``s_A = 0``.)

    ``keep``: also return the system's Cholesky factor; ``chol``: that factor, from an earlier
    solve on the same free set (no gather, no factorisation: two triangular solves). The third
    output is the factor, None when neither is given.
    """
    m = G.shape[0]
    width = m + K
    primal = jnp.sum(free) <= K
    chosen = jnp.where(primal, free, ~free)
    # The chosen indices in increasing order, then the padding indices.
    pos = _ranks(chosen)
    order = _first_true(chosen, pos, m + jnp.arange(K))
    rhs = jnp.concatenate([jnp.where(primal, -c, u), jnp.zeros((K,), G.dtype)])[order]
    if chol is None:
        rows = order + jnp.where(primal, 0, width)
        M = jnp.take(blocks, rows[:, None] * width + order[None, :])
        chol = cholesky_lower(M) if keep else None
    x = _spd_solve(M, rhs) if chol is None else cho_solve(chol, rhs)
    scattered = jnp.where(chosen, x[jnp.clip(pos, 0, K - 1)], 0.0)
    # Primal: s is the scattered solution.
    p = free.astype(G.dtype)
    s_primal = scattered
    lam_primal = (G @ s_primal + c) * (1.0 - p)
    # Dual: mu on A, s = G^{-1}(mu - c) on F.
    mu = scattered
    s_dual = (H @ (mu - c)) * p
    lam_dual = mu * (1.0 - p)
    s = jnp.where(primal, s_primal, s_dual)
    return s, jnp.where(primal, lam_primal, lam_dual), chol


def _split(x):
    """``x = hi + lo`` exactly, ``hi`` keeping the top 12 significant bits of a float32 (a bit
    mask, so no FMA contraction or reassociation can change it): every product of two halves
    is then exact in float32."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000)
    hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return hi, x - hi


def _two_sum(a, b):
    """``a + b = s + e`` exactly (Knuth's TwoSum: additions only)."""
    s = a + b
    z = s - a
    return s, (a - (s - z)) + (b - z)


def _sum2(T):
    """Compensated sum of the last axis: ``(hi, lo)`` with ``hi + lo`` accurate to about
    ``eps^2 sum |T|`` (pairwise TwoSum; the rounding errors of every level summed aside)."""
    n = T.shape[-1]
    width = 1 << max(n - 1, 0).bit_length()
    T = jnp.pad(T, [(0, 0)] * (T.ndim - 1) + [(0, width - n)])
    lo = jnp.zeros(T.shape[:-1], T.dtype)
    while T.shape[-1] > 1:
        pairs = T.reshape(*T.shape[:-1], -1, 2)
        T, e = _two_sum(pairs[..., 0], pairs[..., 1])
        lo = lo + jnp.sum(e, axis=-1)
    return T[..., 0], lo


_DOT2_BLOCK = 32


def _residual2(G, s, u):
    """``G (s + u)`` for one lane in float32 with about twice float32's precision (products
    split into exact halves, compensated sums), by blocks of columns to bound the memory: the
    refinement step's residual, so that its correction brings ``s`` to float32 accuracy (a
    residual rounded in float32 leaves an error of about cond(G) eps)."""
    m = G.shape[0]
    block = min(m, _DOT2_BLOCK)
    nb = -(-m // block)
    pad = nb * block - m
    Gp = jnp.pad(G, [(0, 0), (0, pad)])
    x = jnp.pad(jnp.stack([s, u]), [(0, 0), (0, pad)])
    Gh, Gl = _split(Gp)
    xh, xl = _split(x)

    def body(b, acc):
        hi, lo = acc
        cols = jax.lax.dynamic_slice_in_dim
        gh, gl = cols(Gh, b * block, block, 1), cols(Gl, b * block, block, 1)
        ah, al = cols(xh, b * block, block, 1), cols(xl, b * block, block, 1)
        terms = jnp.concatenate(
            [g[:, None, :] * a[None, :, :] for g in (gh, gl) for a in (ah, al)], axis=1
        )  # (m, 8, block): every partial product, exact
        h, h_err = _sum2(terms.reshape(m, -1))
        hi, e = _two_sum(hi, h)
        return hi, lo + h_err + e

    zero = jnp.zeros((m,), G.dtype)
    hi, lo = jax.lax.fori_loop(0, nb, body, (zero, zero))
    return hi + lo


def _residual_wide(G, s, u):
    """``G (s + u)`` for one float32 lane, rounded once from a wider computation: float64
    where the backend has it (CPU, GPU; products of float32 numbers are exact in float64),
    else (TPUs) the compensated float32 arithmetic of :func:`_residual2`."""
    if jax.default_backend() == "tpu":
        return _residual2(G, s, u)
    return _wide_matvec(G, s, u)


@jax.custom_batching.custom_vmap
def _wide_matvec(G, s, u):
    """``G (s + u)`` in float64, enabled for this product alone whatever JAX's x64 setting.

    ``G`` is ``(..., m, m)`` and ``s``, ``u`` are ``(..., m)`` with leading axes of one rank
    that broadcast: each batching level adds one leading axis to every argument, of size 1 to
    an unbatched one (einsum contracts a size-1 axis of G as one matrix product, no copy per
    lane). It is a custom_vmap whose rule calls it again, so every batching goes through here:
    re-batching an already traced jaxpr (vmap of vmap of a jitted function) would rebuild the
    float64 product with x64 off and truncate it to float32."""
    with jax.enable_x64(True):
        x = jnp.asarray(s, jnp.float64) + jnp.asarray(u, jnp.float64)
        wide = jnp.einsum("...ij,...j->...i", jnp.asarray(G, jnp.float64), x)
        return wide.astype(G.dtype)


@_wide_matvec.def_vmap
def _wide_matvec_batched(axis_size, in_batched, G, s, u):
    del axis_size
    G, s, u = (x if b else jnp.expand_dims(x, 0) for x, b in zip((G, s, u), in_batched))
    return _wide_matvec(G, s, u), True


class _Lane(NamedTuple):
    """The pivoting state of one right-hand side."""

    free: Array  # (m,) bool: the free set F
    s: Array  # (m,) s = v - u
    lam: Array  # (m,) multipliers
    bad: Array  # (m,) bool: infeasible indices
    it: Array  # iterations so far
    best: Array  # fewest infeasible indices seen
    budget: Array  # non-improving block steps left before the backup rule
    chol: Array  # (K, K) the last system's Cholesky factor when kept (see _lane_ops), else (0,)


def _lambda_bounds(A, squarings=4):
    """Upper bounds of the largest eigenvalues of a stack of PSD matrices: ``tr(A^p)^(1/p)``
    with ``p = 2^squarings``, at most ``m^(1/p)`` times too large, by repeated squaring rescaled
    to unit trace: ``log tr(A^p) / p = log tr A + sum_j log tr(B_j^2) / 2^j`` where
    ``tr(B^2) = |B|_F^2`` for symmetric B. A few batched matrix products, no loop."""
    tiny = jnp.finfo(A.dtype).tiny
    trace = jnp.trace(A, axis1=-2, axis2=-1)
    B = A / jnp.maximum(trace, tiny)[..., None, None]
    log_bound = jnp.log(trace)
    for j in range(1, squarings + 1):
        t = jnp.maximum(jnp.sum(B * B, axis=(-2, -1)), tiny)
        log_bound = log_bound + jnp.log(t) / 2**j
        if j < squarings:
            B = (B @ B) / t[..., None, None]
    return jnp.exp(log_bound)


def _warm_free(G, U, iterations):
    """A guess of every lane's free set from ``iterations`` steps of ADMM (over-relaxed, as in
    OSQP) on ``min 1/2 s^T G s + c^T s, s >= 0``, all lanes at once. The splitting ``s = z``,
    ``z >= 0`` makes every step one product with ``(G + rho I)^{-1}``, a single factorisation
    shared by the lanes, so the isolated large eigenvalues of a Gramian (shared gradient
    directions) do not slow it down as they do projected gradient. ``rho`` is the geometric mean
    of the eigenvalues (from a Cholesky factor). Computed in float32 on a rescaled copy: only the
    signs matter, and pivoting corrects any wrong index."""
    m = G.shape[0]
    work = jnp.float32 if G.dtype == jnp.float64 else G.dtype
    tiny = jnp.finfo(G.dtype).tiny
    Gs = (G / jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(G))), tiny)).astype(work)
    Us = (U / jnp.maximum(jnp.max(jnp.abs(U), axis=1, keepdims=True), tiny)).astype(work)
    eye = jnp.eye(m, dtype=work)
    mean = jnp.trace(Gs) / m
    pivots = _spd_pivots(Gs + 1e-4 * mean * eye)
    rho = jnp.exp(jnp.sum(jnp.log(pivots)) / m)
    rho = jnp.where(jnp.isfinite(rho) & (rho > 0), rho, jnp.maximum(mean, 1.0))
    Minv = _spd_inverse(Gs + rho * eye)
    C = Us @ Gs  # G is symmetric: row i is G u_i

    # The step: s = (G + rho I)^{-1} (rho (z - w) - c); t = 1.6 s - 0.6 z + w (relaxation);
    # z = max(t, 0); w = min(t, 0) (w = y / rho, the scaled multipliers of s = z). With
    # z - w = |t| it is a recursion on t alone: three operations per step.
    def body(_, T):
        S = (rho * jnp.abs(T) - C) @ Minv
        return 1.6 * S - 0.6 * jnp.maximum(T, 0.0) + jnp.minimum(T, 0.0)

    T = jax.lax.fori_loop(0, iterations, body, jnp.zeros_like(Us), unroll=True)
    usable = jnp.all(jnp.isfinite(T), axis=1, keepdims=True)
    return jnp.where(usable, T > 0, C < 0)


def _lane_ops(G, compact, lcp=False, keep=False):
    """For one right-hand side: ``start(u, free)`` (the first solve from a guessed free set),
    ``step(u, lane)`` (one pivoting step), ``natural`` and ``refine_step`` (the residual and
    one step of iterative refinement on the final free set; see :func:`_refined`) and
    ``finish`` (the weights). ``lcp=True``: each lane's vector is ``c`` itself (the
    complementarity problem ``s >= 0, G s + c >= 0, s^T (G s + c) = 0``, full-size path only)
    and ``finish`` returns ``s``. ``keep`` (half-size path only): every lane carries its last
    system's Cholesky factor, which the refinement step (same free set, same system) reuses:
    two triangular solves instead of a gather and a factorisation."""
    m = G.shape[0]
    eps = jnp.finfo(G.dtype).eps
    gmax = jnp.maximum(jnp.max(jnp.diagonal(G)), jnp.finfo(G.dtype).tiny)
    ridge = m * eps * gmax
    index = jnp.arange(m)
    none = jnp.zeros((0,), G.dtype)  # the factor when it is not kept
    if compact is not None:
        H, K = compact
        blocks = _padded_blocks(G, H, ridge, K)

    def solve(u, free, c=None, chol=None):
        # With c given: the correction for the residual c = G s + c_0 of a current s (its u
        # for the dual system is G^{-1} c).
        if c is None:
            c = u if lcp else G @ u
        elif compact is not None:
            u = H @ c
        if compact is None:
            return *_masked_solve(G, c, free, ridge), none
        s, lam, chol = _compact_solve(G, c, u, free, H, blocks, K, chol, keep)
        return s, lam, none if chol is None else chol

    def infeasible(u, s, lam, free):
        smax = jnp.max(jnp.abs(s)) + jnp.max(jnp.abs(u))
        tol = 4.0 * m * eps * jnp.maximum(smax, 1e-30)
        tol_lam = tol * gmax
        return jnp.where(free, s < -tol, lam < -tol_lam)

    def start(u, free):
        s, lam, chol = solve(u, free)
        budget = jnp.asarray(_BACKUP_BUDGET)
        bad = infeasible(u, s, lam, free)
        return _Lane(free, s, lam, bad, jnp.asarray(0), jnp.asarray(m + 1), budget, chol)

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
        s, lam, chol = solve(u, free)
        bad = infeasible(u, s, lam, free)
        return _Lane(free, s, lam, bad, lane.it + 1, best, budget, chol)

    wide = G.dtype == jnp.float32 and not lcp

    def natural(u, free, s):
        """``(res, r)``: the complementarity residual relative to ``max(|u|, |u + s|)`` (what
        :func:`kkt_residual` measures, in the equilibrated units) and ``r = G s + c``, which
        must vanish on F (in float32 rounded once from a wider product)."""
        if wide:
            r = _residual_wide(G, s, u)
        else:
            r = G @ s + (u if lcp else G @ u)
        part = jnp.where(free, jnp.maximum(jnp.abs(r), -s), jnp.maximum(-r, 0.0))
        v = s if lcp else u + s
        scale = jnp.maximum(jnp.max(jnp.abs(u)), jnp.max(jnp.abs(v)))
        return jnp.max(part) / jnp.maximum(scale, jnp.finfo(G.dtype).tiny), r

    def refine_step(u, free, s, r, res, chol):
        # One step of iterative refinement on the final free set: the correction solves
        # G_FF delta_F = -r_F with the same (possibly half-size) systems. Only r_F enters: the
        # dual system would otherwise carry r_A = lambda_A, which is not small, into G^{-1}'s
        # error (measured, float64, cond 1e8: the residual stalled at 3e-11; 2e-16 with r_F).
        # A step on a numerically singular system can make things worse: kept per lane only
        # where the residual drops.
        delta, _, _ = solve(u, free, jnp.where(free, r, 0.0), chol if keep else None)
        res_new, r_new = natural(u, free, s + delta)
        better = res_new < res
        return (
            jnp.where(better, s + delta, s),
            jnp.where(better, r_new, r),
            jnp.minimum(res, res_new),
        )

    def finish(u, lane, s, r):
        lam = jnp.where(lane.free, jnp.zeros_like(r), r)
        # NaN/Inf anywhere (G, u or the solves) gives NaN weights and converged = False; the
        # test is explicit because XLA's fast max(NaN, 0) may return 0.
        finite = jnp.all(jnp.isfinite(s) & jnp.isfinite(lam) & jnp.isfinite(u))
        v = jnp.where(finite, (0.0 if lcp else u) + jnp.maximum(s, 0.0), jnp.nan)
        return v, ~jnp.any(lane.bad) & finite, lane.it

    return start, step, natural, refine_step, finish


# Largest batch of lane systems (bytes) factorised in one call. A bigger batch goes through
# ``_lane_map`` in equal chunks, one after the other: glibc serves allocations above 32 MiB by
# fresh mmaps that page-fault on every call, and a batch that fits the caches is factorised
# faster (measured, one CPU thread, Cholesky plus one solve of 256 systems of 128 x 128:
# float64 37 ms in one batch, 20 ms in chunks of 64; float32 22 ms -> 12 ms in chunks of 128).
# CPU only: on an accelerator one batched call is what is cheap, and chunks would run in turn.
_CHUNK_BYTES = 1 << 23


# Largest set of lane factors carried to the refinement step (bytes; see _lane_ops' keep), and
# only where the step always runs (float32 by default): carrying them costs copies in and out
# of the pivoting loop, about what reusing them saves beyond a few MiB. Measured, one CPU
# thread, float32 with its one step: m = 64 -10% to -15%, m = 128 -8% to -13%, m = 256 (16 MiB
# of factors) -4% to +11%; float64, where the step rarely runs: +6% to +12% at m = 64 / 128,
# +33% to +37% at m = 256. CPU only, as the chunks (not measured on an accelerator).
_KEEP_BYTES = 1 << 22


def _lane_map(fn, size, *args, copies=1):
    """``jax.vmap(fn)(*args)`` over the leading (lane) axis, in sequential chunks of lanes whose
    ``size x size`` systems take at most ``_CHUNK_BYTES`` together (``copies`` of each: the
    size of an enclosing vmap, whose batch every chunk carries). The lanes are padded to a
    whole number of equal chunks (zeros: a zero right-hand side; the padding's answers are
    dropped), so that no remainder batch runs beside the loop (see :func:`_after`). On the CPU
    only (see ``_CHUNK_BYTES``)."""
    leaves = jax.tree_util.tree_leaves(args)
    k = leaves[0].shape[0]
    itemsize = max(jnp.dtype(x.dtype).itemsize for x in leaves)
    most = max(1, _CHUNK_BYTES // (copies * size * size * itemsize))
    if k <= most or jax.default_backend() != "cpu":
        return jax.vmap(fn)(*args)
    count = -(-k // most)
    chunk = -(-k // count)
    pad = count * chunk - k

    def split(x):
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        return x.reshape(count, chunk, *x.shape[1:])

    def body(_, xs):
        return None, jax.vmap(fn)(*xs)

    _, out = jax.lax.scan(body, None, jax.tree_util.tree_map(split, args))
    return jax.tree_util.tree_map(lambda y: y.reshape(count * chunk, *y.shape[2:])[:k], out)


def _refined(U, lanes, ops, refine, adaptive, active=None, size=None, copies=1):
    """The weights of every lane after at most ``refine`` steps of iterative refinement (see
    ``refine_step``), which take the KKT residual from about cond(G) eps to about m eps (in
    float32 with the residual computed to about twice the precision, so the forward error of s
    becomes ~eps). ``adaptive``: a step runs only while some lane's residual is above
    ``1000 eps`` (2.2e-13 in float64; a while loop, so that it stays a skipped step under vmap
    too): the full-size systems leave ~m eps, the half-size dual ones up to cond(G) eps. (With
    ``4 m eps`` instead, the step ran on three of the benchmark families at m = 64 for
    residuals of 1e-13, +35% time on one CPU thread.)
    ``active=False``: this problem's lanes never ask for a step (see :func:`_pivot_all`)."""
    _, _, natural, refine_step, finish = ops
    if not refine:  # the solves' own multipliers (zero on F): no residual to compute
        return jax.vmap(finish)(U, lanes, lanes.s, lanes.lam)
    res, r = jax.vmap(natural)(U, lanes.free, lanes.s)
    s = lanes.s
    target = 1000.0 * float(jnp.finfo(U.dtype).eps)
    size = U.shape[1] if size is None else size

    def step(U, free, s, r, res):
        args = (U, free, s, r, res, lanes.chol)
        return _lane_map(refine_step, size, *args, copies=copies)

    def more(state):
        i, _, _, _, res = state
        need = res > target
        return (i < refine) & jnp.any(need if active is None else need & active)

    def body(state):
        # The free sets are carried and touched (``& (i >= 0)``, always true): were they
        # loop-invariant, XLA would hoist the gathers and factorisations of the step's solve
        # out of the loop and run them even when no step is taken (measured: a skipped
        # step cost as much as a taken one).
        i, free, s, r, res = state
        free = free & (i >= 0)
        return (i + 1, free, *step(U, free, s, r, res))

    if adaptive:
        state = (jnp.asarray(0, jnp.int32), lanes.free, s, r, res)
        _, _, s, r, res = jax.lax.while_loop(more, body, state)
    else:
        for _ in range(refine):
            s, r, res = step(U, lanes.free, s, r, res)
    return jax.vmap(finish)(U, lanes, s, r)


def _first_free(U, G, batched=False):
    """The guessed free set of every lane: ADMM from m = _WARM_MIN_M, else the sign of G u.
    ``batched``: one of a vmapped batch of Gramians (see :func:`_warm_iterations`)."""
    m = G.shape[0]
    return _warm_free(G, U, _warm_iterations(m, batched)) if m >= _WARM_MIN_M else U @ G < 0


def _pivot_all(
    U,
    G,
    max_iter,
    compact=None,
    free=None,
    gather=True,
    refine=1,
    lcp=False,
    active=None,
    adaptive=False,
    copies=1,
):
    """Every right-hand side to its solution, from the guessed free sets ``free`` (computed
    here when not given). After the first solve, each loop iteration advances at most
    ``Q ~ k / 8`` pending lanes, gathered by a cumulative count: a lane that has converged costs
    nothing more (a plain vmapped loop would keep solving every lane until the slowest is done,
    and each solve is a Cholesky factorisation). ``active=False`` (a scalar, possibly traced):
    no pivoting at all, only the first solve (the caller discards the answer: see
    :func:`bpp`'s batched rule, where it keeps a Gramian that the other path solves from
    lengthening this path's loop). ``refine``, ``adaptive``: see :func:`_refined`."""
    k = U.shape[0]
    size = U.shape[1] if compact is None else compact[1]
    itemsize = jnp.dtype(G.dtype).itemsize
    keep = (
        compact is not None
        and refine > 0
        and not adaptive
        and not _unrolled(size)
        and jax.default_backend() == "cpu"
        and copies * k * size * size * itemsize <= _KEEP_BYTES
    )
    ops = _lane_ops(G, compact, lcp, keep)
    start, step = ops[:2]
    guess = _first_free(U, G) if free is None else free
    lanes = _lane_map(start, size, U, guess, copies=copies)
    if active is not None:
        lanes = lanes._replace(bad=lanes.bad & active)

    def pending(lanes):
        return jnp.any(lanes.bad, axis=1) & (lanes.it < max_iter)

    Q = -(-k // _LANE_FRACTION) if gather else k
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
            idx = _first_true(todo, _ranks(todo), jnp.full((Q,), k - 1))
            sub = jax.tree_util.tree_map(lambda a: a[idx], lanes)
            new = jax.vmap(step)(U[idx], sub)
            keep = todo[idx]
            new = jax.tree_util.tree_map(
                lambda n, o: jnp.where(keep.reshape((Q,) + (1,) * (n.ndim - 1)), n, o), new, sub
            )
            return jax.tree_util.tree_map(lambda a, n: a.at[idx].set(n), lanes, new)

        lanes = jax.lax.while_loop(lambda lanes: jnp.any(pending(lanes)), body, lanes)
    return _refined(U, lanes, ops, refine, adaptive, active, size, copies)


def lcp(c, G, *, max_iter=None, refine=1):
    """``s >= 0`` with ``G s + c >= 0`` and ``s^T (G s + c) = 0`` for a PSD ``G`` (one right-hand
    side, full-size pivoting from the free set ``c < 0``; a singular G gets pivoting's ridge):
    ``(s, converged, iterations)``. MGDA's exact minimum-norm point is one such problem."""
    m = G.shape[0]
    max_iter = default_max_iter(m) if max_iter is None else max_iter
    s, ok, it = _pivot_all(
        c[None, :], G, max_iter, free=(c < 0)[None, :], gather=False, refine=refine, lcp=True
    )
    return s[0], ok[0], it[0]


class BPP(AbstractSolver):
    r"""Exact block principal pivoting (Júdice & Pires 1994; Kim & Park 2011) with Murty's
    backup rule, from a free set guessed by a few ADMM steps on one shared factorisation.

    Each pivoting step is one Cholesky solve per right-hand side ("lane"), half-size (primal
    on the free set or dual on the active set) when G is well conditioned. ``gather`` chooses
    how the loop after the first solve runs: ``True`` advances only the pending lanes, about
    k/8 at a time, gathered by a running count (cheapest on a CPU, where small factorisations
    are cheap and each one counts); ``False`` runs every lane in one batched loop that stops
    when the slowest lane is done (dense work, no gathers: one batched factorisation per step on
    an accelerator); ``None`` (default) picks ``True`` on the CPU and ``False`` elsewhere.

    Args:
        max_iter: pivoting steps per lane (default ``10 m + 20``; from the ADMM guess regular
            Gramians need 0-4; Murty's rule terminates finitely for a positive definite G, so
            the cap only
            catches rounding cycles on numerically singular Gramians, which are then reported
            as not converged unless their KKT residual is acceptable).
        gather: see above.
        refine: steps of iterative refinement on the final free sets; ``None`` (default):
            one in float32; in float64 one only when some lane's KKT residual is above
            ``1000 eps`` = 2.2e-13 after pivoting (the half-size dual systems leave up to
            cond(G) eps: 1e-12 measured at m = 16 with TorchJD's regularisation, 2e-9 on a
            singular Gramian; the full-size ones ~m eps, and then the step is skipped at no
            cost). One step is one more batched solve. In float32 it takes the KKT residual
            from ~1e-4 to ~1e-5 on ill-conditioned Gramians and makes UPGrad and DualProj meet
            TorchJD's float32 permutation-invariance test (atol = rtol = 5e-7; 20x over it
            without); in float64 it takes the residual to ~1e-15, so no answer is above 2.2e-13
            unless the step could not lower it. An integer: that many steps, always.
    """

    max_iter: int | None = eqx.field(default=None, static=True)
    gather: bool | None = eqx.field(default=None, static=True)
    refine: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.max_iter is not None and (int(self.max_iter) != self.max_iter or self.max_iter < 1):
            raise ValueError(f"max_iter must be a positive integer; got {self.max_iter}.")
        if self.gather not in (None, True, False):
            raise ValueError(f"gather must be None, True or False; got {self.gather!r}.")
        if self.refine is not None and (int(self.refine) != self.refine or self.refine < 0):
            raise ValueError(f"refine must be a non-negative integer; got {self.refine}.")

    def acceptance(self, dtype: DTypeLike, m: int) -> float:
        """``sqrt(eps)`` on top of pivoting's own test (every index feasible within rounding,
        measured against max|s|): on numerically singular Gramians (``reg_eps = 0``, duplicated
        or rank-deficient rows) the weights are not unique and only ``J^T v`` is accurate, so
        the KKT residual of a correct answer can exceed ``m eps``; beyond ``sqrt(eps)`` the
        answer is rejected (measured on regular Gramians: at most ~1e-15 in float64 and ~1e-4
        in float32)."""
        return max(super().acceptance(dtype, m), math.sqrt(float(jnp.finfo(dtype).eps)))

    def solve(
        self, U: Float[Array, "k m"], G: Float[Array, "m m"]
    ) -> tuple[Float[Array, "k m"], Bool[Array, " k"], Int[Array, " k"]]:
        gather = jax.default_backend() == "cpu" if self.gather is None else self.gather
        refine, adaptive = refinement(G.dtype, self.refine)
        return bpp(U, G, max_iter=self.max_iter, gather=gather, refine=refine, adaptive=adaptive)


def refinement(dtype, refine: int | None = None) -> tuple[int, bool]:
    """``(refine, adaptive)`` for :func:`bpp` and :func:`_pivot_all` from :attr:`BPP.refine`:
    ``refine`` steps when given, else adaptive in float64 and one step in float32."""
    if refine is not None:
        return refine, False
    return 1, bool(jnp.finfo(dtype).bits >= 64)


def bpp(U, G, *, max_iter=None, gather=True, refine=1, adaptive=False):
    """Exact dual-cone projection of every row of ``U`` by block principal pivoting:
    ``(V, converged, iterations)``. ``refine``, ``adaptive``: see :func:`_refined`."""
    m = G.shape[0]
    max_iter = default_max_iter(m) if max_iter is None else max_iter

    K = -(-m // 2)

    # ``copies``: the size of the batch of Gramians being solved together (see _lane_map).
    def compact(U, G, H, free, active=None, copies=1):
        return _pivot_all(
            U,
            G,
            max_iter,
            (H, K),
            free,
            gather,
            refine,
            active=active,
            adaptive=adaptive,
            copies=copies,
        )

    def full(U, G, free=None, active=None, copies=1):  # free=None: the guess is made inside
        return _pivot_all(
            U,
            G,
            max_iter,
            free=free,
            gather=gather,
            refine=refine,
            active=active,
            adaptive=adaptive,
            copies=copies,
        )

    @jax.custom_batching.custom_vmap
    def split(U, G):
        if m < _COMPACT_MIN_M:
            return full(U, G)
        free, H, ok = _plan(U, G)
        return jax.lax.cond(ok, lambda U: compact(U, G, H, free), lambda U: full(U, G, free), U)

    @split.def_vmap
    def _split_batched(axis_size, in_batched, U, G):
        # A plain vmap would turn the cond above into a select that runs both paths for every
        # Gramian, and the two pivoting loops would run concurrently: besides the wasted work,
        # XLA's CPU runtime then runs two batched LAPACK Cholesky calls at once, which
        # deadlocks jaxlib 0.10's thread pool on machines with few cores. Here the
        # half-size path runs for the whole batch and the full-size one only when some
        # Gramian needs it, after the first (sequenced by the data dependence).
        # The rule is traced when vmap reaches it, outside the caller's precision context:
        # full precision again (TF32 products make pivoting cycle on GPUs).
        with jax.default_matmul_precision("highest"):
            return _batched(axis_size, in_batched, U, G)

    def _batched(axis_size, in_batched, U, G):
        U_batched, G_batched = in_batched
        if not G_batched:  # one G: the batch of right-hand sides is more lanes of one problem
            out = split(jnp.reshape(U, (-1, m)), G)
            shapes = ((axis_size, -1, m), (axis_size, -1), (axis_size, -1))
            return tuple(jnp.reshape(x, s) for x, s in zip(out, shapes)), (True, True, True)
        if not U_batched:
            U = jnp.broadcast_to(U, (axis_size, *U.shape))
        if m < _COMPACT_MIN_M:
            free = jax.vmap(lambda U, G: _first_free(U, G, batched=True))(U, G)
            return jax.vmap(partial(full, copies=axis_size))(U, G, free), (True, True, True)
        free, H, ok = jax.vmap(lambda U, G: _plan(U, G, batched=True))(U, G)
        # Each path runs on the whole batch (dense work), but pivots only the Gramians it
        # answers for: the others would only lengthen its loop, which runs until its slowest
        # lane is done (measured, float32, 1024 Gramians of 16 x 16 whose dual systems are
        # unreliable for the ill-conditioned ones: the half-size loop ran 15 steps for them
        # where the Gramians it answers for needed 6, then the full-size loop 15 more).
        out = jax.vmap(partial(compact, copies=axis_size))(U, G, H, free, ok)

        if gather:
            return _full_by_chunks(full, U, G, free, ok, out), (True, True, True)

        def with_full(out):
            out_full = jax.vmap(partial(full, copies=axis_size))(_after(U, out[0]), G, free, ~ok)
            return jax.tree_util.tree_map(
                lambda c, f: jnp.where(jnp.reshape(ok, (-1,) + (1,) * (c.ndim - 1)), c, f),
                out,
                out_full,
            )

        out = jax.lax.cond(jnp.any(~ok), with_full, lambda out: out, out)
        return out, (True, True, True)

    return split(U, G)


def _full_by_chunks(full, U, G, free, ok, out):
    """The gathering program's full-size path in a vmapped batch: only the Gramians that need
    it (``~ok``), gathered ``ceil(B / 8)`` at a time, each chunk one batched run, the answers
    scattered into ``out``. Where work is what costs (the CPU) the batch no longer pays a
    full-size first solve for every Gramian when one needs it (64 x 64^2, float32: the worst
    batch 320 ms against a median of 120 ms)."""
    B = G.shape[0]
    chunk = -(-B // _LANE_FRACTION)
    need = ~ok
    rank = jnp.cumsum(need, dtype=jnp.int32) - 1  # (int32 also under x64)
    count = jnp.sum(need, dtype=jnp.int32)

    def body(state):
        c, out = state
        low = c * chunk
        # The chunk's Gramians, then B (out of range: read as B - 1, written nowhere).
        in_chunk = need & (rank >= low) & (rank < low + chunk)
        idx = _first_true(in_chunk, rank - low, jnp.full((chunk,), B, jnp.int32))
        take = jnp.minimum(idx, B - 1)
        res = jax.vmap(partial(full, copies=chunk))(
            _after(U[take], out[0]), G[take], free[take], idx < B
        )
        out = tuple(o.at[idx].set(r, mode="drop") for o, r in zip(out, res))
        return c + 1, out

    return jax.lax.while_loop(
        lambda state: state[0] * chunk < count, body, (jnp.asarray(0, jnp.int32), tuple(out))
    )[1]


def _plan(U, G, batched=False):
    """What both paths need: ``(free, H, ok)``, the guessed free sets, ``H = G^{-1}`` and
    whether G is well enough conditioned for the half-size systems, which cost 8x fewer flops
    per Cholesky than full-size ones. The dual systems need G^{-1}, judged by two upper bounds
    of cond(G): ``tr(G^16)^(1/16) tr(H^16)^(1/16)`` (at most m^(1/8) too large) and
    ``tr(G) tr(H)``; otherwise every lane takes the full-size primal path."""
    # Cholesky, not _spd_solve, even for small m: with H from unrolled elimination, lanes of
    # rank-deficient float32 Gramians (reg_eps = 1e-4) cycled to max_iter on the dual path
    # (measured: 11 of 16384 lanes in a vmapped batch of 1024 16 x 16).
    H = _inverse_from_factor(cholesky(G))
    # The repeated squarings in float32 (rescaled to unit trace at every step, so nothing
    # overflows; rounding moves the bound by ~1e-6 relative, far inside its m^(1/8) slack):
    # in float64 that takes 4-6% off the whole solve at m = 128 on one CPU thread, 1-3% at 256.
    pair = jnp.stack([G, H]).astype(jnp.float32)
    squared = _lambda_bounds(pair).astype(G.dtype)
    bound = jnp.minimum(jnp.trace(G) * jnp.trace(H), jnp.prod(squared))
    limit = _DUAL_COND_LIMIT[jnp.finfo(G.dtype).bits >= 64]
    ok = jnp.isfinite(bound) & (bound > 0) & (bound < limit) & jnp.all(jnp.isfinite(H))
    # The guess's factorisations come after H's (see _after).
    return _first_free(U, _after(G, H), batched), H, ok


def _after(x, *deps):
    """``x``, but only once ``deps`` are computed: a data dependence (adding an exact zero).

    XLA's CPU runtime runs independent operations concurrently, and jaxlib 0.10's batched
    LAPACK calls (Cholesky, triangular solves) deadlock its thread pool when as many of them
    run at once as the machine has cores (reproduced on 2 cores with two Cholesky calls on
    batches of 256 16 x 16 matrices). Under vmap every factorisation here is batched, so the
    ones that do not depend on each other are chained. ``optimization_barrier`` is no use for
    this: it aliases its inputs, and the runtime orders calls by the buffers they read."""
    zero = sum(jnp.sum(jnp.isnan(d)).astype(x.dtype) for d in deps) * 0
    return x + zero

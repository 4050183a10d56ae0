r"""The QP layer: projections onto the dual cone of the rows of J, from the Gramian alone.

For a right-hand side ``u`` the weights ``v = argmin_v v^T G v  s.t.  v >= u`` give
``J^T v = \pi_J(J^T u)``, the projection of ``J^T u`` onto ``{x : J x >= 0}`` (Proposition 1 of
Quinton & Rey 2024, arXiv 2406.16232). Every solver works on a batch of right-hand sides sharing G.

Solvers are objects (``solver=jd.solvers.BPP()``); the strings ``"auto"``, ``"bpp"``,
``"nesterov_pgd"`` and ``"qpax"`` are aliases. :class:`AbstractSolver` is the interface a user's
own solver implements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._tree import accumulation_dtype, check_gramian
from ._base import AbstractSolver, ProjectionInfo, default_tol, kkt_residual, row_scales
from ._bpp import BPP
from ._pgd import NesterovPGD
from ._qpax import Qpax

__all__ = [
    "BPP",
    "AbstractSolver",
    "Auto",
    "NesterovPGD",
    "ProjectionInfo",
    "Qpax",
    "as_solver",
    "default_tol",
    "kkt_residual",
    "normalize_regularize",
    "project_onto_dual_cone",
]


class Auto(BPP):
    """The default: exact :class:`BPP`, its pivoting loop laid out for the backend it is traced
    for (pending lanes gathered on the CPU, every lane in one batched loop on GPUs and TPUs)."""


_ALIASES = {"auto": Auto, "bpp": BPP, "nesterov_pgd": NesterovPGD, "qpax": Qpax}
SOLVERS = tuple(_ALIASES)


def as_solver(
    solver: AbstractSolver | str = "auto", *, tol: float | None = None, max_iter: int | None = None
) -> AbstractSolver:
    """A solver object from an object or a string alias (``tol`` and ``max_iter`` go to the
    alias's constructor where it has them; given with an object they are an error)."""
    if isinstance(solver, AbstractSolver):
        if tol is not None or max_iter is not None:
            raise ValueError(
                "tol and max_iter belong to the solver object: pass e.g. "
                "solver=jd.solvers.NesterovPGD(tol=1e-8, max_iter=1000)."
            )
        return solver
    if not isinstance(solver, str) or solver not in _ALIASES:
        raise ValueError(
            f"Unknown solver {solver!r}; pass a jaxjd.solvers.AbstractSolver or one of {SOLVERS}."
        )
    cls = _ALIASES[solver]
    kwargs = {}
    if max_iter is not None:
        kwargs["max_iter"] = max_iter
    if tol is not None:
        if cls in (BPP, Auto):
            raise ValueError(f"solver={solver!r} is exact and takes no tol.")
        kwargs["tol"] = tol
    return cls(**kwargs)


def normalize_regularize(
    G: Float[Array, "m m"],
    norm_eps: float | Array | None,
    reg_eps: float | Array,
    log2_t: Array | None = None,
) -> Float[Array, "m m"]:
    """TorchJD's conditioning, ``G / tr(G) + reg_eps I``, with zeros for ``G / tr(G)`` when the
    trace is too small to divide by; NaN when a diagonal entry is negative (no Gramian).

    ``norm_eps=None`` (the dtype's rule): zeros only when ``tr(G) < tiny / eps`` (``finfo``:
    ~1e-31 in float32, ~1e-292 in float64; zero included), tested on ``G`` as given. Above it,
    entries and products of J below ``tiny`` (flushed to zero by XLA, or subnormal) move ``G``
    by less than ``eps tr(G)``: ``G`` is known to its dtype's precision, as at any scale, and
    ``G / tr(G)`` is the same problem at every scale; below it, it is not (the bound the
    aggregators' rescaling of ``J J^T`` uses, so an aggregator falls back only on J = 0). A
    number: TorchJD's absolute rule, zeros when ``tr(J J^T) < norm_eps`` (or is 0);
    ``log2_t``: ``G`` is ``2^log2_t`` times the true Gramian (J rescaled because J J^T left the
    range), and ``norm_eps`` is compared with the true trace, in logarithms (``G / tr(G)``
    needs no correction).

    The trace is summed in sorted order, so that it rounds alike for every order of the rows of
    J: in float32 a trace one ulp off changes the balance of ``G / tr(G)`` against ``reg_eps I``
    and, through cond(G), moves the weights by ~1e-5 (TorchJD's float32 permutation test
    allows 5e-7)."""
    trace = jnp.sum(jnp.sort(jnp.diagonal(G)))
    if norm_eps is None:
        info = jnp.finfo(G.dtype)  # (False on NaN: NaN weights follow)
        small = trace < float(info.tiny) / float(info.eps)
    else:
        norm_eps = jnp.asarray(norm_eps, G.dtype)
        small = (trace < norm_eps) | (trace == 0)
        if log2_t is not None:  # (the same test, bit for bit, when G is not rescaled)
            rescaled = jnp.log2(trace) - log2_t < jnp.log2(norm_eps)
            small = jnp.where(log2_t == 0, small, rescaled | (trace == 0))
    safe = jnp.where(small, jnp.ones_like(trace), trace)
    Gn = jnp.where(small, jnp.zeros_like(G), G / safe)
    # A negative diagonal is no Gramian (the fallback would hide it): NaN, refused downstream.
    Gn = jnp.where(jnp.all(jnp.diagonal(G) >= 0), Gn, jnp.nan)
    return Gn + reg_eps * jnp.eye(G.shape[0], dtype=G.dtype)


def project_onto_dual_cone(
    U: Float[Array, "*batch m"],
    G: Float[Array, "m m"],
    *,
    solver: AbstractSolver | str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
) -> tuple[Float[Array, "*batch m"], ProjectionInfo]:
    r"""Solves ``min_v v^T G v  s.t.  v >= u`` for every row ``u`` of ``U``.

    The problem is equilibrated first (``v = v~ / d`` with ``d = sqrt(diag G)``, so the solver
    sees a Gramian with unit diagonal: rows of J whose norms differ by orders of magnitude are
    solved alike), solved with matrix products at full float32/float64 precision (never TF32),
    and the answer checked: ``info.converged`` is true only for a finite answer whose
    :func:`kkt_residual` is within the solver's acceptance threshold.

    Args:
        U: right-hand sides, any leading shape, last axis m.
        G: a PSD Gramian ``J J^T`` (used as given: no normalisation here). Half-precision
            inputs are solved in float32; the weights come back in the inputs' dtype.
        solver: a :class:`AbstractSolver` (:class:`Auto`, the default; :class:`BPP`,
            :class:`NesterovPGD`, :class:`Qpax`, or your own) or a string alias.
        tol, max_iter: passed to the constructor of a string alias (see each solver).

    Returns:
        ``(V, info)``: the weights, shaped like ``U``, and a :class:`ProjectionInfo`.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> V, info = jd.project_onto_dual_cone(jnp.eye(2), G)
    >>> import numpy as np
    >>> np.round(np.asarray(V, float), 4), bool(info.converged.all())
    (array([[1.    , 0.5789],
           [1.2222, 1.    ]]), True)
    """
    m = check_gramian(G)
    if jnp.shape(U)[-1:] != (m,):
        raise ValueError(f"U must end with an axis of size m = {m}; got shape {jnp.shape(U)}.")
    solver = as_solver(solver, tol=tol, max_iter=max_iter)
    dtype = jnp.result_type(U, G)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    # Half-precision inputs are solved in float32 (LAPACK has no bfloat16/float16 kernels) and
    # the weights returned in the input dtype.
    work = accumulation_dtype(dtype)
    V, info = _project_jit(jnp.asarray(U, work), jnp.asarray(G, work), solver)
    return V.astype(dtype), info


@functools.partial(jax.jit, static_argnums=2)
def _project_jit(U, G, solver):
    with jax.default_matmul_precision("highest"):
        return _project(U, G, solver)


def _looks_like_a_gramian(G, Ge):
    """Cheap necessary conditions for ``G = J J^T`` (O(m^2), no factorisation): symmetry and
    Cauchy-Schwarz ``|G_ij| <= sqrt(G_ii G_jj)`` within ``sqrt(eps)`` (on the diagonal it
    refuses a negative entry: its bound is 0). A matrix that fails (``-G``, an indefinite
    ``[[1, 2], [2, 1]]``, a transposed half) gives NaN weights and ``converged=False``, never an
    answer to another problem. An indefinite matrix that passes them is not caught."""
    tol = float(jnp.finfo(G.dtype).eps) ** 0.5
    root = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
    bound = (1.0 + tol) * root[:, None] * root[None, :]
    return jnp.all(jnp.abs(Ge - Ge.T) <= tol) & jnp.all(jnp.abs(G) <= bound)


def _equilibrated(G):
    """``(d, Ge, valid)``: ``d = sqrt(diag G)`` (1 for zero rows), ``Ge = G / (d d^T)`` exactly
    symmetric with a unit diagonal (zero rows keep a zero diagonal): the Gramian the solver sees;
    ``valid``: whether ``G`` passes :func:`_looks_like_a_gramian`."""
    m = G.shape[0]
    d = row_scales(G)
    Ge = G / d[:, None] / d[None, :]
    valid = _looks_like_a_gramian(G, Ge)
    Ge = 0.5 * (Ge + Ge.T)
    Ge = jnp.where(jnp.eye(m, dtype=bool), jnp.where(jnp.diagonal(G) > 0, 1.0, 0.0), Ge)
    return d, Ge, valid


def _project(U, G, solver):
    m = G.shape[0]
    batch = U.shape[:-1]
    flat = jnp.reshape(U, (-1, m))
    d, Ge, valid = _equilibrated(G)
    Ve, converged, iterations = solver.solve(flat * d[None, :], Ge)
    V = Ve / d[None, :]
    res = kkt_residual(G, flat, V)
    V = jnp.where(valid, V, jnp.nan)
    ok = converged & jnp.all(jnp.isfinite(V), axis=-1) & (res <= solver.acceptance(G.dtype, m))
    info = ProjectionInfo(ok, jnp.asarray(iterations, jnp.int32), res)
    info = ProjectionInfo(*(jnp.reshape(x, batch) for x in info))
    return jnp.reshape(V, (*batch, m)), info

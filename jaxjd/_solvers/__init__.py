r"""The QP layer: projections onto the dual cone of the rows of J, from the Gramian alone.

For a right-hand side ``u`` the weights ``v = argmin_v v^T G v  s.t.  v >= u`` give
``J^T v = \pi_J(J^T u)``, the projection of ``J^T u`` onto ``{x : J x >= 0}`` (Proposition 1 of
Quinton & Rey 2024, arXiv 2406.16232). Every solver works on a batch of right-hand sides sharing G.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._tree import accumulation_dtype, check_gramian
from ._bpp import bpp
from ._common import ProjectionInfo, kkt_residual
from ._pgd import nesterov_pgd
from ._qpax import qpax_solver, require_qpax

SOLVERS = ("bpp", "nesterov_pgd", "qpax")

__all__ = [
    "SOLVERS",
    "ProjectionInfo",
    "check_solver",
    "kkt_residual",
    "normalize_regularize",
    "project_onto_dual_cone",
]


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {SOLVERS}.")
    if solver == "qpax":
        require_qpax()


def normalize_regularize(
    G: Float[Array, "m m"], norm_eps: float, reg_eps: float
) -> Float[Array, "m m"]:
    """TorchJD's conditioning: ``G / tr(G)`` (zeros when ``tr(G) <= norm_eps``) ``+ reg_eps I``."""
    trace = jnp.trace(G)
    small = trace <= norm_eps
    safe = jnp.where(small, jnp.ones_like(trace), trace)
    Gn = jnp.where(small, jnp.zeros_like(G), G / safe)
    return Gn + reg_eps * jnp.eye(G.shape[0], dtype=G.dtype)


def project_onto_dual_cone(
    U: Float[Array, "*batch m"],
    G: Float[Array, "m m"],
    *,
    solver: str = "bpp",
    tol: float | None = None,
    max_iter: int | None = None,
) -> tuple[Float[Array, "*batch m"], ProjectionInfo]:
    r"""Solves ``min_v v^T G v  s.t.  v >= u`` for every row ``u`` of ``U``.

    Args:
        U: right-hand sides, any leading shape, last axis m.
        G: a PSD Gramian ``J J^T`` (used as given: no normalisation here). Half-precision
            inputs are solved in float32; the weights come back in the inputs' dtype.
        solver: ``"bpp"`` (exact block principal pivoting, default), ``"nesterov_pgd"``
            (accelerated projected gradient to ``tol``) or ``"qpax"`` (interior point, optional).
        tol: stopping tolerance of the iterative solvers (scaled KKT residual); ignored by bpp.
        max_iter: iteration cap (bpp: ``10 m + 20``; nesterov_pgd: 100000; qpax: 100).

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
    check_solver(solver)
    dtype = jnp.result_type(U, G)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    # Half-precision inputs are solved in float32 (LAPACK has no bfloat16/float16 kernels) and
    # the weights returned in the input dtype.
    work = accumulation_dtype(dtype)
    V, info = _project_jit(jnp.asarray(U, work), jnp.asarray(G, work), solver, tol, max_iter)
    return V.astype(dtype), info


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _project_jit(U, G, solver, tol, max_iter):
    m = G.shape[0]
    batch = U.shape[:-1]
    flat = jnp.reshape(U, (-1, m))
    if solver == "bpp":
        V, info = bpp(flat, G, max_iter=max_iter)
    elif solver == "nesterov_pgd":
        V, info = nesterov_pgd(flat, G, tol=tol, max_iter=max_iter)
    else:
        V, info = qpax_solver(flat, G, tol=tol, max_iter=max_iter)
    info = ProjectionInfo(*(jnp.reshape(x, batch) for x in info))
    return jnp.reshape(V, (*batch, m)), info

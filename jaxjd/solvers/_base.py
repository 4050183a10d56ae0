r"""The solver interface of the QP layer, its report, and the checks every solver's answer gets.

A solver maps a batch of right-hand sides ``U`` (k x m) and a Gramian ``G`` (m x m) to the
weights ``V`` with ``V[i] = argmin_v v^T G v  s.t.  v >= U[i]``. :func:`project_onto_dual_cone`
hands every solver an *equilibrated* problem (``G`` with unit diagonal, or zero rows) and then
checks the answer itself: ``ProjectionInfo.converged`` is true only when the answer is finite,
the solver says it converged, and the scale-invariant KKT residual below is within the solver's
acceptance threshold. A solver written by a user inherits these checks.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int


class ProjectionInfo(NamedTuple):
    """What the QP layer reports, one entry per right-hand side.

    Attributes:
        converged: the answer is finite, the solver met its own stopping test, and
            ``kkt_residual`` is within the solver's acceptance threshold
            (:meth:`AbstractSolver.acceptance`).
        iterations: iterations used (the solver's own count: pivoting steps, gradient steps,
            interior-point steps).
        kkt_residual: :func:`kkt_residual` of the answer.
    """

    converged: Bool[Array, "*batch"]
    iterations: Int[Array, "*batch"]
    kkt_residual: Float[Array, "*batch"]


def row_scales(G: Float[Array, "m m"]) -> Float[Array, " m"]:
    """``sqrt(diag G)`` (the row norms of J), with 1 for zero rows."""
    d = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
    return jnp.where(d > 0, d, jnp.ones_like(d))


def kkt_residual(
    G: Float[Array, "m m"], u: Float[Array, "*batch m"], v: Float[Array, "*batch m"]
) -> Float[Array, "*batch"]:
    r"""Scale-invariant natural residual of ``min v^T G v  s.t.  v >= u``.

    With the row norms ``d = sqrt(diag G)`` (the problem in the variables ``d * v``, whose
    Gramian has a unit diagonal), ``s~ = d (v - u)`` and ``lambda~ = (G v) / d``:

    ``max_i |min(s~_i, lambda~_i)| / max(|d u|_inf, |d v|_inf)``.

    It is zero exactly at the solution, unchanged when G is multiplied by a constant or when
    the rows of J are rescaled together with their bounds, and the part each row contributes
    is measured in that row's own units (a tiny row of J is not drowned by a large one).
    Rounding alone leaves about ``m * eps``.
    """
    d = jnp.reshape(row_scales(G), (1,) * (jnp.ndim(v) - 1) + (G.shape[0],))
    lam = jnp.einsum("ij,...j->...i", G, v, precision="highest") / d
    s = (v - u) * d
    scale = jnp.maximum(
        jnp.maximum(jnp.max(jnp.abs(u * d), axis=-1), jnp.max(jnp.abs(v * d), axis=-1)),
        jnp.finfo(G.dtype).tiny,
    )
    return jnp.max(jnp.abs(jnp.minimum(s, lam)), axis=-1) / scale


def default_tol(dtype: DTypeLike) -> float:
    """Stopping tolerance of the iterative solvers on :func:`kkt_residual`."""
    return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5


class AbstractSolver(eqx.Module):
    r"""A dual-cone QP solver: subclass it and implement :meth:`solve`.

    ``solve(U, G)`` receives right-hand sides ``U`` (k x m) and an equilibrated Gramian ``G``
    (symmetric PSD, unit diagonal, or zero rows and columns), all of one floating dtype, and
    returns ``(V, converged, iterations)`` (shapes ``(k, m)``, ``(k,)``, ``(k,)``). It runs
    under ``jit`` and ``vmap`` (static shapes, no Python control flow on values). Hyper-parameters
    are (static) fields: a solver is hashable. The QP layer computes the KKT residual and
    accepts an answer only below :meth:`acceptance`.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> class Clip(jd.solvers.AbstractSolver):  # exact only when the rows do not conflict
    ...     def solve(self, U, G):
    ...         k = U.shape[0]
    ...         return U, jnp.ones((k,), bool), jnp.zeros((k,), jnp.int32)
    >>> G = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> V, info = jd.project_onto_dual_cone(jnp.eye(2), G, solver=Clip())
    >>> bool(info.converged.all())
    True
    >>> G = jnp.array([[1.0, -0.5], [-0.5, 1.0]])  # conflicting rows: Clip is wrong there
    >>> V, info = jd.project_onto_dual_cone(jnp.eye(2), G, solver=Clip())
    >>> bool(info.converged.all())
    False
    """

    @abc.abstractmethod
    def solve(
        self, U: Float[Array, "k m"], G: Float[Array, "m m"]
    ) -> tuple[Float[Array, "k m"], Bool[Array, " k"], Int[Array, " k"]]:
        """``(V, converged, iterations)`` for every row of ``U``."""

    def acceptance(self, dtype: DTypeLike, m: int) -> float:
        """Largest :func:`kkt_residual` accepted as converged: ``max(16 m eps, 1000 eps)`` by
        default (2.2e-13 in float64 up to m = 62; 1.2e-4 in float32 up to m = 62). The rounding
        of ``G v`` alone leaves up to ``m eps``; a float32 solve on a Gramian with condition
        number 1e4 (TorchJD's regularisation) leaves ~1e-5..1e-4 after refinement."""
        eps = float(jnp.finfo(dtype).eps)
        return max(16.0 * m * eps, 1000.0 * eps)

"""UPGrad and DualProj: aggregators built on the projection onto the dual cone."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._tree import accumulation_dtype, check_gramian
from ..solvers import (
    AbstractSolver,
    ProjectionInfo,
    as_solver,
    normalize_regularize,
    project_onto_dual_cone,
)
from ._base import (
    GramianWeightedAggregator,
    Weighting,
    as_static_vector,
    build_or_apply,
    check_nonnegative,
    vector_for,
)


class _DualConeWeighting(Weighting):
    pref_vector: tuple[float, ...] | None = eqx.field(static=True)
    norm_eps: float = eqx.field(static=True)
    reg_eps: float = eqx.field(static=True)
    solver: AbstractSolver = eqx.field(static=True)

    def __init__(
        self,
        pref_vector=None,
        *,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        solver: AbstractSolver | str = "auto",
        tol: float | None = None,
        max_iter: int | None = None,
    ):
        self.pref_vector = as_static_vector(pref_vector, "pref_vector")
        self.norm_eps = check_nonnegative(norm_eps, "norm_eps")
        self.reg_eps = check_nonnegative(reg_eps, "reg_eps")
        self.solver = as_solver(solver, tol=tol, max_iter=max_iter)

    def _prepare(self, G):
        m = check_gramian(G)
        dtype = accumulation_dtype(jnp.result_type(G))
        G = jax.lax.stop_gradient(jnp.asarray(G, dtype))
        if self.pref_vector is None:
            pref = jnp.full((m,), 1.0 / m, dtype)
        else:
            pref = vector_for(self.pref_vector, m, dtype, "pref_vector")
        return normalize_regularize(G, self.norm_eps, self.reg_eps), pref

    def _project(self, U, G):
        return project_onto_dual_cone(U, G, solver=self.solver)

    def _weigh(self, gramian, key):
        # A solve that did not converge gives NaN weights, never a finite wrong update.
        w, info = self._solve(gramian)
        return jnp.where(jnp.all(info.converged), w, jnp.nan)

    def solve(self, gramian: Float[Array, "m m"], /) -> tuple[Float[Array, " m"], ProjectionInfo]:
        """Weights and the solver's :class:`ProjectionInfo` (converged flag, iterations, KKT
        residual; one entry per right-hand side). The weights are the solver's answer, also
        when it did not converge (calling the weighting gives NaN then)."""
        check_gramian(gramian)
        return _solve_jit(self, gramian)


@functools.partial(jax.jit, static_argnums=0)
def _solve_jit(weighting, gramian):
    return weighting._solve(gramian)


class UPGradWeighting(_DualConeWeighting):
    r"""Weights of UPGrad (Quinton & Rey 2024, arXiv 2406.16232).

    With preference ``p`` (default ``1/m``), ``w = sum_i v_i`` where
    ``v_i = argmin_v v^T G' v  s.t.  v >= p_i e_i``, so that ``J^T w = sum_i p_i pi_J(g_i)``: every
    gradient projected onto the dual cone ``{x : J x >= 0}``. ``G' = G / tr(G) + reg_eps I``
    (zeros when ``tr(G) <= norm_eps``), TorchJD's defaults; ``reg_eps = 0`` gives the exact
    projection. Weights are constants under differentiation.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.upgrad_weighting()(G), float), 4)
    array([1.1109, 0.7894])
    """

    def _solve(self, gramian):
        G, pref = self._prepare(gramian)
        V, info = self._project(jnp.diag(pref), G)
        return jnp.sum(V, axis=0), info


class DualProjWeighting(_DualConeWeighting):
    r"""Weights of DualProj (adapted from GEM): the preference-weighted mean gradient projected
    onto the dual cone, ``w = argmin_v v^T G' v  s.t.  v >= p`` (same ``G'`` as UPGrad).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.dualproj_weighting()(G), float), 4)
    array([0.6109, 0.5   ])
    """

    def _solve(self, gramian):
        G, pref = self._prepare(gramian)
        V, info = self._project(pref[None, :], G)
        return V[0], ProjectionInfo(*(x[0] for x in info))


class UPGrad(GramianWeightedAggregator):
    """UPGrad aggregator: ``J^T w`` with :class:`UPGradWeighting` weights."""

    weighting: UPGradWeighting

    def __init__(self, pref_vector=None, **hyper):
        self.weighting = UPGradWeighting(pref_vector, **hyper)


class DualProj(GramianWeightedAggregator):
    """DualProj aggregator: ``J^T w`` with :class:`DualProjWeighting` weights."""

    weighting: DualProjWeighting

    def __init__(self, pref_vector=None, **hyper):
        self.weighting = DualProjWeighting(pref_vector, **hyper)


_HYPER_DOC = """
    Args:
        pref_vector: preference over the objectives (default uniform ``1/m``).
        norm_eps: the Gramian is divided by its trace, or zeroed when the trace is below this.
        reg_eps: added to the diagonal of the normalised Gramian (``0``: exact projection).
        solver: a :mod:`jaxjd.solvers` object (default :class:`~jaxjd.solvers.Auto`: exact
            block principal pivoting) or an alias ``"auto"``, ``"bpp"``, ``"nesterov_pgd"``,
            ``"qpax"``. When the solve does not converge (``.solve`` reports it), the weights
            are NaN.
        tol, max_iter: passed to the constructor of a string alias.
"""


def _factory(cls, name: str, doc: str):
    """Both spellings for a dual-cone method: ``f(x, **hyper)`` applies, ``f(**hyper)`` builds."""

    def factory(
        x=None,
        /,
        *,
        pref_vector=None,
        norm_eps=1e-4,
        reg_eps=1e-4,
        solver="auto",
        tol=None,
        max_iter=None,
    ):
        obj = cls(
            pref_vector,
            norm_eps=norm_eps,
            reg_eps=reg_eps,
            solver=solver,
            tol=tol,
            max_iter=max_iter,
        )
        return build_or_apply(obj, x)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc + _HYPER_DOC
    return factory


upgrad = _factory(
    UPGrad,
    "upgrad",
    r"""UPGrad (Quinton & Rey 2024): ``upgrad(J)`` returns the update, ``upgrad(**hyper)`` a
    reusable :class:`UPGrad` aggregator.

    Each row of J is projected onto the dual cone ``{x : J x >= 0}`` and the projections are
    averaged (weighted by ``pref_vector``), so no objective increases for a small step.
""",
)
upgrad_weighting = _factory(
    UPGradWeighting,
    "upgrad_weighting",
    """:class:`UPGradWeighting`: ``upgrad_weighting(G)`` returns weights,
    ``upgrad_weighting()`` the weighting.
""",
)
dualproj = _factory(
    DualProj,
    "dualproj",
    r"""DualProj: ``dualproj(J)`` returns the update, ``dualproj(**hyper)`` a :class:`DualProj`.

    The preference-weighted mean gradient projected onto the dual cone of the rows of J.
""",
)
dualproj_weighting = _factory(
    DualProjWeighting,
    "dualproj_weighting",
    """:class:`DualProjWeighting`: weights from a Gramian, or the weighting itself.
""",
)

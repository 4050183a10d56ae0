"""UPGrad (Quinton & Rey 2024): every gradient projected onto the dual cone, then averaged."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

from .._typing import Scalar, VectorLike
from ..solvers import AbstractSolver, as_solver, project_onto_dual_cone
from . import _dual_cone
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import number, spelling, vector


class UPGradWeighting(AbstractWeighting):
    r"""Weights of UPGrad, from the Gramian.

    With preference ``p`` (default ``1/m``), ``w = sum_i v_i`` where
    ``v_i = argmin_v v^T G' v  s.t.  v >= p_i e_i``, so that ``J^T w = sum_i p_i pi_J(g_i)``: every
    gradient projected onto the dual cone ``{x : J x >= 0}``, so no objective increases for a
    small step. ``G' = G / tr(G) + reg_eps I`` as in TorchJD (``reg_eps = 0``: the exact
    projection), with zeros for ``G / tr(G)`` (weights ``p``) only when ``tr(G)`` is below
    ``tiny / eps`` of its dtype (TorchJD: when ``tr(G) < 1e-4``, which ``norm_eps=1e-4``
    restores). Weights are constants under differentiation.

    Args:
        pref_vector: preference over the objectives (default uniform ``1/m``).
        norm_eps: when ``G`` is zeroed instead of divided by its trace (the weights are then
            ``p``). ``None`` (default): only when ``tr(G) < tiny / eps`` of G's dtype (~1e-31
            in float32, ~1e-292 in float64: G no longer known to the dtype's precision), so the
            weights are the same at every scale (an aggregator rescales an underflowing
            ``J J^T``: only an all-zero J falls back). A number: TorchJD's absolute rule,
            ``tr(G) < norm_eps``; ``norm_eps=1e-4`` is TorchJD's default and output (gradients
            of norm ~1e-3 then get the preference-weighted mean, which can conflict).
        reg_eps: added to the diagonal of the normalised Gramian (``0``: exact projection).
        solver: a :mod:`jaxjd.solvers` object (default :class:`~jaxjd.solvers.Auto`: exact
            block principal pivoting) or an alias ``"auto"``, ``"bpp"``, ``"nesterov_pgd"``,
            ``"qpax"``. When the solve does not converge (``.solve`` reports it), the weights
            are NaN.

    Reference: Quinton & Rey, "Jacobian descent for multi-objective optimization",
    arXiv 2406.16232 (2024).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.upgrad_weighting(G), float), 4)
    array([1.1109, 0.7894])
    """

    pref_vector: VectorLike | None = vector("pref_vector")
    norm_eps: Scalar | None = number("norm_eps", check="nonnegative", optional=True)
    reg_eps: Scalar = number("reg_eps", 1e-4, check="nonnegative")
    solver: AbstractSolver = eqx.field(static=True, default="auto", converter=as_solver)

    def _solve(self, G, log2_t=None):
        G, pref = _dual_cone.conditioned(self, G, log2_t)
        V, info = project_onto_dual_cone(jnp.diag(pref), G, solver=self.solver)
        return jnp.sum(V, axis=0), info

    _weigh = _dual_cone.weigh
    _weigh_at_scale = _dual_cone.weigh_at_scale
    solve = _dual_cone.solve


class UPGrad(GramianWeightedAggregator):
    """UPGrad aggregator: ``J^T w`` with :class:`UPGradWeighting` weights (TorchJD's ``UPGrad``).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> np.round(np.asarray(jd.upgrad(J), float), 4)
    array([0.2929, 1.9004, 1.9004])
    """

    weighting_class = UPGradWeighting


upgrad = spelling(UPGrad, "upgrad", reads="jacobian")
upgrad_weighting = spelling(UPGradWeighting, "upgrad_weighting", reads="gramian")

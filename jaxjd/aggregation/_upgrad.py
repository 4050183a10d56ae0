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
    small step. ``G' = G / tr(G) + reg_eps I`` (zeros when ``tr(G) <= norm_eps``), TorchJD's
    defaults; ``reg_eps = 0`` gives the exact projection. Weights are constants under
    differentiation.

    Args:
        pref_vector: preference over the objectives (default uniform ``1/m``).
        norm_eps: the Gramian is divided by its trace, or zeroed when the trace is below this.
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
    norm_eps: Scalar = number("norm_eps", 1e-4, check="nonnegative")
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

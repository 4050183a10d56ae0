"""DualProj (adapted from GEM): the mean gradient projected onto the dual cone."""

from __future__ import annotations

import equinox as eqx

from .._typing import Scalar, VectorLike
from ..solvers import AbstractSolver, ProjectionInfo, as_solver, project_onto_dual_cone
from . import _dual_cone
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import number, spelling, vector


class DualProjWeighting(AbstractWeighting):
    r"""Weights of DualProj, from the Gramian: the preference-weighted mean gradient projected
    onto the dual cone ``{x : J x >= 0}``, ``w = argmin_v v^T G' v  s.t.  v >= p``, with the
    same ``G' = G / tr(G) + reg_eps I`` as :class:`UPGradWeighting`.

    Args:
        pref_vector: preference over the objectives (default uniform ``1/m``).
        norm_eps: the Gramian is divided by its trace, or zeroed when the trace is below this.
        reg_eps: added to the diagonal of the normalised Gramian (``0``: exact projection).
        solver: a :mod:`jaxjd.solvers` object or alias, as for :class:`UPGradWeighting`.

    Reference: Lopez-Paz & Ranzato, "Gradient episodic memory for continual learning",
    NeurIPS 2017; Quinton & Rey, arXiv 2406.16232 (2024).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.dualproj_weighting(G), float), 4)
    array([0.6109, 0.5   ])
    """

    pref_vector: VectorLike | None = vector("pref_vector")
    norm_eps: Scalar = number("norm_eps", 1e-4, check="nonnegative")
    reg_eps: Scalar = number("reg_eps", 1e-4, check="nonnegative")
    solver: AbstractSolver = eqx.field(static=True, default="auto", converter=as_solver)

    def _solve(self, G, log2_t=None):
        G, pref = _dual_cone.conditioned(self, G, log2_t)
        V, info = project_onto_dual_cone(pref[None, :], G, solver=self.solver)
        return V[0], ProjectionInfo(*(x[0] for x in info))

    _weigh = _dual_cone.weigh
    _weigh_at_scale = _dual_cone.weigh_at_scale
    solve = _dual_cone.solve


class DualProj(GramianWeightedAggregator):
    """DualProj aggregator: ``J^T w`` with :class:`DualProjWeighting` weights (TorchJD's
    ``DualProj``).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> np.round(np.asarray(jd.dualproj(J), float), 4)
    array([0.5563, 1.1109, 1.1109])
    """

    weighting_class = DualProjWeighting


dualproj = spelling(DualProj, "dualproj", reads="jacobian")
dualproj_weighting = spelling(DualProjWeighting, "dualproj_weighting", reads="gramian")

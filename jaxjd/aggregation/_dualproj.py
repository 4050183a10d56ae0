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
    same ``G' = G / tr(G) + reg_eps I`` and ``norm_eps`` rule as :class:`UPGradWeighting`.

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
    norm_eps: Scalar | None = number("norm_eps", check="nonnegative", optional=True)
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

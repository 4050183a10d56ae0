"""What UPGrad and DualProj share: TorchJD's conditioning of the Gramian and the solve."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..solvers import ProjectionInfo, normalize_regularize, project_onto_dual_cone
from ._fields import as_dtype, sized


def conditioned(weighting, G):
    """``(G', p)``: ``G' = G / tr(G) + reg_eps I`` (zeros when ``tr(G) <= norm_eps``) and the
    preference ``p`` (default ``1/m``)."""
    m = G.shape[0]
    if weighting.pref_vector is None:
        pref = jnp.full((m,), 1.0 / m, G.dtype)
    else:
        pref = sized(weighting.pref_vector, m, G.dtype, "pref_vector")
    norm_eps = as_dtype(weighting.norm_eps, G.dtype)
    reg_eps = as_dtype(weighting.reg_eps, G.dtype)
    return normalize_regularize(G, norm_eps, reg_eps), pref


def project(weighting, U, G):
    return project_onto_dual_cone(U, G, solver=weighting.solver)


def checked(weights, info: ProjectionInfo):
    """A solve that did not converge gives NaN weights, never a finite wrong update."""
    return jnp.where(jnp.all(info.converged), weights, jnp.nan)


def solve(weighting, gramian):
    """``weighting._solve`` on a prepared Gramian, jitted with the weighting's leaves traced."""
    from ._abstract import _prepared

    with jax.default_matmul_precision("highest"):
        return weighting._solve(_prepared(gramian))

"""What UPGrad and DualProj share: TorchJD's conditioning of the Gramian and the solve."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._tree import check_gramian
from ..solvers import ProjectionInfo, normalize_regularize
from ._abstract import _prepared
from ._fields import as_dtype, sized


def conditioned(weighting, G, log2_t=None):
    """``(G', p)``: ``G' = G / tr(G) + reg_eps I`` (zeros for ``G / tr(G)`` when
    ``tr(G) < tiny / eps``, or with a number ``norm_eps`` when ``tr(G) < norm_eps``: see
    :func:`~jaxjd.solvers.normalize_regularize`) and the preference ``p`` (default ``1/m``);
    ``log2_t``: ``G`` is ``2^log2_t`` times the true Gramian (the weights are the true one's:
    an absolute ``norm_eps`` is compared with the true trace)."""
    m = G.shape[0]
    if weighting.pref_vector is None:
        pref = jnp.full((m,), 1.0 / m, G.dtype)
    else:
        pref = sized(weighting.pref_vector, m, G.dtype, "pref_vector")
    norm_eps = None if weighting.norm_eps is None else as_dtype(weighting.norm_eps, G.dtype)
    reg_eps = as_dtype(weighting.reg_eps, G.dtype)
    return normalize_regularize(G, norm_eps, reg_eps, log2_t), pref


def checked(weights, info: ProjectionInfo):
    """A solve that did not converge gives NaN weights, never a finite wrong update."""
    return jnp.where(jnp.all(info.converged), weights, jnp.nan)


def weigh(self, gramian, state, key):
    """The weighting's ``_weigh``: its solve's weights, NaN unless it converged."""
    return checked(*self._solve(gramian)), state


def weigh_at_scale(self, gramian, log2_t, state, key, *losses):
    """The weighting's ``_weigh_at_scale``: scale-invariant but for an absolute ``norm_eps``
    test, taken on the true trace."""
    return checked(*self._solve(gramian, log2_t)), state


def _solve(weighting, gramian):
    with jax.default_matmul_precision("highest"):
        return weighting._solve(_prepared(gramian))


_solve_jit = eqx.filter_jit(_solve)


def solve(self, gramian: Float[Array, "m m"], /) -> tuple[Float[Array, " m"], ProjectionInfo]:
    """Weights and the solver's :class:`~jaxjd.solvers.ProjectionInfo` (converged flag,
    iterations, KKT residual; one entry per right-hand side). The weights are the solver's
    answer, also when it did not converge (calling the weighting gives NaN then)."""
    check_gramian(gramian)
    with jax.default_matmul_precision("highest"):  # one cache entry with the weighting's
        return _solve_jit(self, gramian)

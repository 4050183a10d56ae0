"""Conflict statistics from a Gramian: cheap enough to log every step inside ``jit``."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._tree import check_gramian

__all__ = ["ConflictStats", "conflict_statistics"]


class ConflictStats(NamedTuple):
    """What people look at when they ask "do my gradients conflict?".

    Attributes:
        cosine: (m, m) cosine similarities ``G_ij / (|g_i| |g_j|)`` (0 for zero gradients).
        conflict_fraction: fraction of pairs ``i < j`` with a negative cosine.
        min_cosine: the most negative (smallest) off-diagonal cosine (1 when m = 1).
        norm_ratio: largest over smallest non-zero gradient norm.
        directional_derivatives: ``g_i . d`` for the update ``d = J^T w`` (NaN without weights).
        non_conflicting: all directional derivatives are >= 0 (False without weights).
    """

    cosine: Float[Array, "m m"]
    conflict_fraction: Float[Array, ""]
    min_cosine: Float[Array, ""]
    norm_ratio: Float[Array, ""]
    directional_derivatives: Float[Array, " m"]
    non_conflicting: Array


def conflict_statistics(
    gramian: Float[Array, "m m"],
    weights: Float[Array, " m"] | None = None,
    *,
    directional_derivatives: Float[Array, " m"] | None = None,
) -> ConflictStats:
    r"""Conflict statistics of the gradients whose Gramian is ``gramian``; with the weights of an
    update ``d = J^T w`` also its directional derivatives ``J d = G w`` (for an update that is not
    ``J^T w``, e.g. GradDrop's, pass ``directional_derivatives = J d``, see
    :func:`jaxjd.row_dots`).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> s = jd.monitoring.conflict_statistics(G, jd.upgrad_weighting()(G))
    >>> float(s.conflict_fraction), round(float(s.min_cosine), 3), bool(s.non_conflicting)
    (1.0, -0.841, True)
    """
    m = check_gramian(gramian)
    G = jnp.asarray(gramian)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0))
    denom = norms[:, None] * norms[None, :]
    cosine = jnp.where(denom > 0, G / jnp.where(denom > 0, denom, 1.0), 0.0)
    off = ~jnp.eye(m, dtype=bool)
    pairs = max(m * (m - 1), 1)
    conflict_fraction = jnp.sum((cosine < 0) & off) / pairs
    min_cosine = jnp.min(jnp.where(off, cosine, 1.0))
    positive = norms > 0
    biggest = jnp.max(norms)
    smallest = jnp.min(jnp.where(positive, norms, jnp.inf))
    norm_ratio = jnp.where(jnp.any(positive), biggest / smallest, 1.0)
    if weights is not None and directional_derivatives is not None:
        raise ValueError("Pass weights or directional_derivatives, not both.")
    if weights is None and directional_derivatives is None:
        dd = jnp.full((m,), jnp.nan, G.dtype)
        nc = jnp.asarray(False)
    else:
        if weights is not None:
            dd = G @ jnp.asarray(weights, G.dtype)
        else:
            dd = jnp.asarray(directional_derivatives, G.dtype)
            if dd.shape != (m,):
                raise ValueError(f"directional_derivatives must have shape ({m},); got {dd.shape}.")
        tol = 1e-6 * jnp.sqrt(jnp.maximum(jnp.trace(G), 0.0)) * jnp.linalg.norm(dd)
        nc = jnp.all(dd >= -tol)
    return ConflictStats(cosine, conflict_fraction, min_cosine, norm_ratio, dd, nc)

"""Krum and Multi-Krum (Blanchard et al. 2017), from the Gramian."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ._base import GramianWeightedAggregator, Weighting, build_or_apply


class KrumWeighting(Weighting):
    r"""Weights of Multi-Krum: distances ``|g_i - g_j|`` from the Gramian, score of each row = sum
    of its ``m - f - 2`` smallest distances to the others (``f = n_byzantine``), weights
    ``1/n_selected`` on the ``n_selected`` lowest scores. Needs ``m >= f + 3`` and
    ``m >= n_selected`` (checked at trace time)."""

    n_byzantine: int = eqx.field(static=True)
    n_selected: int = eqx.field(static=True)

    def __init__(self, n_byzantine: int, n_selected: int = 1):
        if int(n_byzantine) != n_byzantine or n_byzantine < 0:
            raise ValueError(f"n_byzantine must be a non-negative integer; got {n_byzantine}.")
        if int(n_selected) != n_selected or n_selected < 1:
            raise ValueError(f"n_selected must be a positive integer; got {n_selected}.")
        self.n_byzantine = int(n_byzantine)
        self.n_selected = int(n_selected)

    def _weigh(self, gramian, key):
        m = check_gramian(gramian)
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Krum needs at least n_byzantine + 3 = {self.n_byzantine + 3} rows; got m = {m}."
            )
        if m < self.n_selected:
            raise ValueError(f"Krum needs at least n_selected = {self.n_selected} rows; got {m}.")
        G = jax.lax.stop_gradient(jnp.asarray(gramian, accumulation_dtype(gramian.dtype)))
        sq = jnp.diagonal(G)
        dist = jnp.sqrt(jnp.maximum(sq[None, :] + sq[:, None] - 2 * G, 0.0))
        n_closest = m - self.n_byzantine - 2
        smallest = -jax.lax.top_k(-dist, n_closest + 1)[0]
        scores = jnp.sum(smallest[:, 1:], axis=1)
        _, chosen = jax.lax.top_k(-scores, self.n_selected)
        return jnp.zeros((m,), G.dtype).at[chosen].add(1.0 / self.n_selected)


class Krum(GramianWeightedAggregator):
    """Multi-Krum aggregator: the mean of the ``n_selected`` most central rows."""

    weighting: KrumWeighting

    def __init__(self, n_byzantine: int, n_selected: int = 1):
        self.weighting = KrumWeighting(n_byzantine, n_selected)


def krum(jacobian=None, /, *, n_byzantine, n_selected=1):
    """Krum (Blanchard et al. 2017): ``krum(J, n_byzantine=f)`` returns the update,
    ``krum(n_byzantine=f)`` a :class:`Krum`."""
    return build_or_apply(Krum(n_byzantine, n_selected), jacobian)


def krum_weighting(gramian=None, /, *, n_byzantine, n_selected=1):
    """:class:`KrumWeighting`: weights from a Gramian, or the weighting itself."""
    return build_or_apply(KrumWeighting(n_byzantine, n_selected), gramian)

"""Krum and Multi-Krum (Blanchard et al. 2017), from the Gramian."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import spelling, static_int


class KrumWeighting(AbstractWeighting):
    r"""Weights of Multi-Krum: distances ``|g_i - g_j|`` from the Gramian, score of each row = sum
    of its ``m - f - 2`` smallest distances to the others, weights ``1/n_selected`` on the
    ``n_selected`` lowest scores. Needs ``m >= f + 3`` and ``m >= n_selected`` (checked at trace
    time).

    Args:
        n_byzantine: ``f``, the number of adversarial rows tolerated.
        n_selected: how many of the most central rows are averaged (1: Krum).

    Reference: Blanchard et al., "Machine learning with adversaries: Byzantine tolerant gradient
    descent", NeurIPS 2017.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> J = jnp.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-9.0, 5.0]])
    >>> jd.krum_weighting(J @ J.T, n_byzantine=1)
    Array([1., 0., 0., 0.], dtype=float32)
    """

    scale_degree = 0.0

    n_byzantine: int = static_int("n_byzantine", minimum=0)
    n_selected: int = static_int("n_selected", 1)

    def _weigh(self, G, state, key):
        m = G.shape[0]
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Krum needs at least n_byzantine + 3 = {self.n_byzantine + 3} rows; got m = {m}."
            )
        if m < self.n_selected:
            raise ValueError(
                f"Krum needs at least n_selected = {self.n_selected} rows; got m = {m}."
            )
        sq = jnp.diagonal(G)
        dist = jnp.sqrt(jnp.maximum(sq[None, :] + sq[:, None] - 2 * G, 0.0))
        n_closest = m - self.n_byzantine - 2
        smallest = -jax.lax.top_k(-dist, n_closest + 1)[0]
        scores = jnp.sum(smallest[:, 1:], axis=1)
        _, chosen = jax.lax.top_k(-scores, self.n_selected)
        return jnp.zeros((m,), G.dtype).at[chosen].add(1.0 / self.n_selected), state


class Krum(GramianWeightedAggregator):
    """Multi-Krum aggregator: the mean of the ``n_selected`` most central rows (TorchJD's
    ``Krum``)."""

    weighting_class = KrumWeighting


krum = spelling(Krum, "krum", reads="jacobian")
krum_weighting = spelling(KrumWeighting, "krum_weighting", reads="gramian")

"""CR-MOGM (Zhou et al., NeurIPS 2022): an exponential moving average of any weighting's weights."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ._base import StatefulWeighting, Weighting, as_static_vector


class CRMOGMState(NamedTuple):
    """The running weights and whether they have been set (by ``initial_weights`` or a step)."""

    weights: jax.Array
    started: jax.Array


class CRMOGMWeighting(StatefulWeighting):
    r"""``l_k = alpha l_{k-1} + (1 - alpha) l^_k`` around an inner (stateless) weighting's
    ``l^_k``; ``l_0 = initial_weights`` if given, else the first ``l^`` (so the first output is the
    inner one). ``alpha = 0`` passes through, ``alpha = 1`` freezes. The paper's schedule
    ``alpha_k = 1 - lr_k / lr_0`` can be followed by rebuilding with a new ``alpha``: the state
    carries over."""

    weighting: Weighting = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    initial_weights: tuple[float, ...] | None = eqx.field(static=True)

    def __init__(self, weighting: Weighting, alpha: float = 0.9, initial_weights=None):
        if not isinstance(weighting, Weighting) or isinstance(weighting, StatefulWeighting):
            raise TypeError("CRMOGMWeighting wraps a stateless jaxjd Weighting.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")
        self.weighting = weighting
        self.alpha = float(alpha)
        self.initial_weights = as_static_vector(initial_weights, "initial_weights")

    def init(self, num_objectives, dtype=jnp.float32):
        m = int(num_objectives)
        dtype = accumulation_dtype(dtype)
        if self.initial_weights is None:
            return CRMOGMState(jnp.zeros((m,), dtype), jnp.asarray(False))
        if len(self.initial_weights) != m:
            raise ValueError(
                f"initial_weights has length {len(self.initial_weights)}; expected m = {m}."
            )
        return CRMOGMState(jnp.asarray(self.initial_weights, dtype), jnp.asarray(True))

    def _update(self, matrix, state, key):
        m = check_gramian(matrix)
        if state.weights.shape != (m,):
            raise ValueError(
                f"The state holds {state.weights.shape[0]} objectives but the matrix has m = {m}."
            )
        hat = self.weighting._weigh(matrix, key).astype(state.weights.dtype)
        prev = jnp.where(state.started, state.weights, hat)
        new = self.alpha * prev + (1.0 - self.alpha) * hat
        return new, CRMOGMState(new, jnp.asarray(True))


def crmogm_weighting(weighting, *, alpha=0.9, initial_weights=None):
    """:class:`CRMOGMWeighting` around ``weighting`` (stateful: ``init`` then ``update``)."""
    return CRMOGMWeighting(weighting, alpha, initial_weights)

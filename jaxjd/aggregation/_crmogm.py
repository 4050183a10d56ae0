"""CR-MOGM (Zhou et al., NeurIPS 2022): an exponential moving average of any weighting's weights."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ._base import StatefulWeighting, Weighting, as_static_vector, positive_int


class CRMOGMState(NamedTuple):
    """The running weights, whether they have been set (by ``initial_weights`` or a step), and
    the inner weighting's state (``None`` for a stateless inner weighting)."""

    weights: jax.Array
    started: jax.Array
    inner: Any = None


class CRMOGMWeighting(StatefulWeighting):
    r"""``l_k = alpha l_{k-1} + (1 - alpha) l^_k`` around an inner (stateless) weighting's
    ``l^_k``; ``l_0 = initial_weights`` if given, else the first ``l^`` (so the first output is the
    inner one). ``alpha = 0`` passes through, ``alpha = 1`` freezes. A stateful inner weighting
    (e.g. GradVac) keeps its state inside this one's. The paper's schedule
    ``alpha_k = 1 - lr_k / lr_0`` can be followed by rebuilding with a new ``alpha``: the state
    carries over."""

    weighting: Weighting = eqx.field(static=True)
    alpha: float = eqx.field(static=True)
    initial_weights: tuple[float, ...] | None = eqx.field(static=True)

    def __init__(self, weighting: Weighting, alpha: float = 0.9, initial_weights=None):
        if not isinstance(weighting, Weighting):
            raise TypeError("CRMOGMWeighting wraps a jaxjd Weighting.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")
        self.weighting = weighting
        self.alpha = float(alpha)
        self.initial_weights = as_static_vector(initial_weights, "initial_weights")

    def init(self, num_objectives, dtype=jnp.float32):
        m = positive_int(num_objectives, "num_objectives")
        inner = self.weighting.init(m, dtype) if self._stateful else None
        dtype = accumulation_dtype(dtype)
        if self.initial_weights is None:
            return CRMOGMState(jnp.zeros((m,), dtype), jnp.asarray(False), inner)
        if len(self.initial_weights) != m:
            raise ValueError(
                f"initial_weights has length {len(self.initial_weights)}; expected m = {m}."
            )
        return CRMOGMState(jnp.asarray(self.initial_weights, dtype), jnp.asarray(True), inner)

    @property
    def _stateful(self):
        return isinstance(self.weighting, StatefulWeighting)

    @property
    def needs_key(self):  # type: ignore[override]
        return self.weighting.needs_key

    def _update(self, matrix, state, key):
        m = check_gramian(matrix)
        if state.weights.shape != (m,):
            raise ValueError(
                f"The state holds {state.weights.shape[0]} objectives but the matrix has m = {m}."
            )
        if self._stateful:
            hat, inner = self.weighting._update(matrix, state.inner, key)
        else:
            hat, inner = self.weighting._weigh(matrix, key), None
        hat = hat.astype(state.weights.dtype)
        prev = jnp.where(state.started, state.weights, hat)
        new = self.alpha * prev + (1.0 - self.alpha) * hat
        return new, CRMOGMState(new, jnp.asarray(True), inner)


def crmogm_weighting(weighting, *, alpha=0.9, initial_weights=None):
    """:class:`CRMOGMWeighting` around ``weighting`` (stateful: ``init`` then ``update``)."""
    return CRMOGMWeighting(weighting, alpha, initial_weights)

"""CR-MOGM (Zhou et al., NeurIPS 2022): an exponential moving average of any weighting's weights."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._typing import Scalar, VectorLike
from ._abstract import AbstractWeighting, GramianWeightedAggregator, _hook_args
from ._fields import as_dtype, number, sized, spelling, vector


class CRMOGMState(NamedTuple):
    """The running weights, whether they have been set (by ``initial_weights`` or a step), and
    the inner weighting's state (``EmptyState()`` for a stateless inner weighting)."""

    weights: jax.Array
    started: jax.Array
    inner: Any


def _weighting(value):
    if not isinstance(value, AbstractWeighting):
        raise TypeError(
            f"CRMOGMWeighting wraps a jaxjd weighting (an AbstractWeighting); got "
            f"{type(value).__name__}."
        )
    return value


class CRMOGMWeighting(AbstractWeighting):
    r"""``l_k = alpha l_{k-1} + (1 - alpha) l^_k`` around an inner weighting's ``l^_k``;
    ``l_0 = initial_weights`` if given, else the first ``l^`` (so the first output is the inner
    one). ``alpha = 0`` passes through, ``alpha = 1`` freezes. A stateful inner weighting (e.g.
    GradVac) keeps its state inside this one's. ``alpha`` is traced: the paper's schedule
    ``alpha_k = 1 - lr_k / lr_0`` can rebuild the weighting at every step without recompiling
    (the state carries over).

    Args:
        weighting: the inner weighting (any jaxjd weighting, stateful or not).
        alpha: the EMA coefficient, in [0, 1].
        initial_weights: ``l_0`` (length m), or None to start from the first inner weights.

    Reference: Zhou et al., "On the convergence of stochastic multi-objective gradient
    manipulation and beyond", NeurIPS 2022.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> weighting = jd.crmogm_weighting(jd.mgda_weighting(), alpha=0.5)
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> w, state = weighting.update(G, weighting.init(2))
    >>> [round(float(x), 4) for x in w]
    [0.6, 0.4]
    """

    weighting: AbstractWeighting = eqx.field(converter=_weighting)
    alpha: Scalar = number("alpha", 0.9, check="unit")
    initial_weights: VectorLike | None = vector("initial_weights")
    has_state = True

    def _init(self, m, dtype):
        inner = self.weighting.init(m, dtype)
        if self.initial_weights is None:
            return CRMOGMState(jnp.zeros((m,), dtype), jnp.asarray(False), inner)
        weights = sized(self.initial_weights, m, dtype, "initial_weights")
        return CRMOGMState(weights, jnp.asarray(True), inner)

    @property
    def rescalable(self) -> bool:
        """As the inner weighting: an aggregator may then form ``G`` from J scaled by a power of
        two (J J^T out of range), the inner weighting turns it into the true scale's weights
        (UPGrad's: the same at every scale) and they are averaged as they are."""
        return self.weighting.rescalable

    def _weigh(self, G, state, key, losses=None):
        hat, inner = self.weighting._weigh(G, state.inner, key, *_hook_args(self.weighting, losses))
        return self._average(hat, inner, state)

    def _weigh_at_scale(self, G, log2_t, state, key, losses=None):
        args = _hook_args(self.weighting, losses)
        hat, inner = self.weighting._weigh_at_scale(G, log2_t, state.inner, key, *args)
        return self._average(hat, inner, state)

    def _average(self, hat, inner, state):
        dtype = state.weights.dtype
        hat = hat.astype(dtype)
        alpha = as_dtype(self.alpha, dtype)
        prev = jnp.where(state.started, state.weights, hat)
        new = alpha * prev + (1.0 - alpha) * hat
        return new, CRMOGMState(new, jnp.asarray(True), inner)


class CRMOGM(GramianWeightedAggregator):
    """CR-MOGM aggregator (stateful): ``J^T w`` with :class:`CRMOGMWeighting` weights."""

    weighting_class = CRMOGMWeighting


crmogm = spelling(CRMOGM, "crmogm", reads="jacobian")
crmogm_weighting = spelling(CRMOGMWeighting, "crmogm_weighting", reads="gramian")

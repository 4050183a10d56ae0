"""GradNorm (Chen et al., ICML 2018): task weights trained to balance the gradient norms."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._adam import AdamState, adam_direction, adam_init
from .._typing import Scalar, VectorLike
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import as_dtype, number, sized, spelling, vector


class GradNormState(NamedTuple):
    """GradNorm's state: the logits ``s`` of the weights ``w = m softmax(s)``, the initial
    losses ``L(0)``, whether they are set, and the state of the Adam that trains ``s``."""

    logits: Array
    initial_losses: Array
    started: Array
    adam: AdamState


class GradNormWeighting(AbstractWeighting):
    r"""GradNorm's weights ``w = m softmax(s)``, with ``s`` trained on the gradient-norm loss

    ``sum_i |w_i |g_i| - c_i|``, ``c_i = mean_j(w_j |g_j|) r_i^alpha`` (a constant),
    ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``:

    tasks that trained less (larger relative loss) get larger gradient norms. ``|g_i|`` comes
    from the Gramian's diagonal. Each call returns the current ``w`` and takes one Adam step
    (learning rate ``lr``) on ``s``: LibMTL trains ``s`` with the model's optimizer; here the
    state holds it, so that nothing outside the protocol changes. Reads the losses
    (``losses=``). ``L(0)`` is ``initial_losses`` when given (LibMTL uses the first epoch's
    average losses, with ``w = 1`` during that epoch), else the first call's losses (the
    paper's).

    Args:
        alpha: the restoring force (LibMTL's and the paper's 1.5; 0 equalises the norms).
        lr: Adam's learning rate on ``s`` (``>= 0``).
        initial_losses: ``L(0)`` (m,), positive; default: the first call's losses.

    Reference: Chen et al., "GradNorm: gradient normalization for adaptive loss balancing in
    deep multitask networks", ICML 2018; LibMTL's ``GradNorm``.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> weighting = jd.gradnorm_weighting(lr=0.1)
    >>> G, losses = jnp.array([[4.0, 1.0], [1.0, 1.0]]), jnp.array([1.0, 1.0])
    >>> w, state = weighting.update(G, weighting.init(2), losses=losses)
    >>> w, state = weighting.update(G, state, losses=losses)
    >>> [round(float(x), 3) for x in w]
    [0.9, 1.1]
    """

    alpha: Scalar = number("alpha", 1.5, check="nonnegative")
    lr: Scalar = number("lr", 1e-3, check="nonnegative")
    initial_losses: VectorLike | None = vector("initial_losses")
    has_state = True
    reads_losses = True

    def _init(self, m, dtype):
        s = jnp.zeros((m,), dtype)
        if self.initial_losses is None:
            start, started = jnp.ones((m,), dtype), jnp.asarray(False)
        else:
            start, started = (
                sized(self.initial_losses, m, dtype, "initial_losses"),
                jnp.asarray(True),
            )
        return GradNormState(s, start, started, adam_init(s))

    def _weigh(self, G, state, key, losses):
        m = G.shape[0]
        dtype = state.logits.dtype
        L = losses.astype(dtype)
        L0 = jnp.where(state.started, state.initial_losses, L)
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(G), 0.0)).astype(dtype)
        ratios = L / L0
        r = ratios / jnp.mean(ratios)
        alpha = as_dtype(self.alpha, dtype)

        def balance_loss(s):
            scaled = m * jax.nn.softmax(s) * norms
            target = jax.lax.stop_gradient(jnp.mean(scaled) * r**alpha)
            return jnp.sum(jnp.abs(scaled - target))

        grad = jax.grad(balance_loss)(state.logits)
        direction, adam = adam_direction(grad, state.adam)
        logits = state.logits - as_dtype(self.lr, dtype) * direction
        weights = m * jax.nn.softmax(state.logits)
        return weights, GradNormState(logits, L0, jnp.asarray(True), adam)


class GradNorm(GramianWeightedAggregator):
    """GradNorm aggregator: ``J^T w`` with :class:`GradNormWeighting` weights (LibMTL's).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> agg = jd.gradnorm()
    >>> J = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> update, state = agg.update(J, agg.init(J), losses=jnp.array([1.0, 2.0]))
    >>> [float(x) for x in update]
    [2.0, 1.0]
    """

    weighting_class = GradNormWeighting


gradnorm = spelling(GradNorm, "gradnorm", reads="jacobian")
gradnorm_weighting = spelling(GradNormWeighting, "gradnorm_weighting", reads="gramian")

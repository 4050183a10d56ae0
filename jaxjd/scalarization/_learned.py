"""UW and IMTL-L (trainable per-loss parameters, kept in the caller's params pytree) and DWA
(explicit state: the average losses of the last two epochs)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._tree import accumulation_dtype
from .._typing import Scalar
from ..aggregation._abstract import _keep_unless
from ..aggregation._fields import as_dtype, number
from ._abstract import AbstractScalarizer, required_shape


def _zeros_like(values_like):
    return jnp.zeros(values_like.shape, accumulation_dtype(values_like.dtype))


class UW(AbstractScalarizer):
    r"""Uncertainty weighting: ``sum_i (exp(-s_i) L_i + s_i) / 2`` with learned log-variances
    ``s_i`` (Kendall et al., "Multi-task learning using uncertainty to weigh losses for scene
    geometry and semantics", CVPR 2018; TorchJD's ``UW``). ``params = uw.init_params(losses)``
    (zeros: uniform weights, as TorchJD; LibMTL starts at -0.5) goes in the params pytree.

    >>> import jax, jax.numpy as jnp
    >>> from jaxjd.scalarization import UW
    >>> uw, losses = UW(), jnp.array([1.0, 4.0])
    >>> jax.grad(lambda s: uw(losses, params=s))(uw.init_params(losses))
    Array([ 0. , -1.5], dtype=float32)
    """

    trainable = True

    def _init_params(self, values_like):
        return _zeros_like(values_like)

    def _scalarize(self, values, state, key, params):
        s = required_shape(params, values, "params (the log-variances)", "UW")
        return jnp.sum(0.5 * jnp.exp(-s) * values + 0.5 * s), state


class IMTLL(AbstractScalarizer):
    r"""IMTL-L: ``sum_i exp(s_i) L_i - s_i`` with learned log-scales ``s_i`` (Liu et al.,
    "Towards impartial multi-task learning", ICLR 2021; TorchJD's ``IMTLL``); zeros at the
    start (the plain sum). The parameters go in the params pytree, as for :class:`UW`."""

    trainable = True

    def _init_params(self, values_like):
        return _zeros_like(values_like)

    def _scalarize(self, values, state, key, params):
        s = required_shape(params, values, "params (the log-scales)", "IMTLL")
        return jnp.sum(jnp.exp(s) * values - s), state


class DWAState(NamedTuple):
    """DWA's state: this epoch's loss sum and batch count, the last two epochs' averages (oldest
    first) and how many epochs have ended (the weights are uniform until two have)."""

    loss_sum: Array
    batches: Array
    averages: Array  # (2, *losses.shape)
    epochs: Array


class DWA(AbstractScalarizer):
    r"""Dynamic weight average: ``sum_k lambda_k L_k`` with
    ``lambda = K softmax(w / T)``, ``w_k = A_k(t-1) / A_k(t-2)`` the ratio of task k's average
    losses over the last two epochs (uniform ``lambda = 1`` until two epochs have ended; Liu et
    al., "End-to-end multi-task learning with attention", CVPR 2019; TorchJD's ``DWA``). The
    weights are constants under differentiation.

    TorchJD keeps the history inside the object and rolls it with ``step()``; here it is the
    explicit state: ``state = dwa.init(losses)``, ``loss, state = dwa.update(losses, state)`` on
    every batch, ``state = dwa.end_epoch(state)`` after the last batch of each epoch. A batch
    with a NaN or Inf loss gives a non-finite scalar and leaves the state unchanged.

    Args:
        temperature: ``T > 0`` (the paper's 2).
    """

    has_state = True
    temperature: Scalar = number("temperature", 2.0, check="positive")

    def _init(self, values_like):
        z = _zeros_like(values_like)
        return DWAState(z, jnp.zeros((), jnp.int32), jnp.stack([z, z]), jnp.zeros((), jnp.int32))

    def _scalarize(self, values, state, key, params):
        if state.loss_sum.shape != values.shape:
            raise ValueError(
                f"DWA: the state was made for losses of shape {state.loss_sum.shape}; got "
                f"{values.shape} (make a new one with dwa.init(losses))."
            )
        older, newer = state.averages.astype(values.dtype)
        rates = (newer / older).ravel()
        t = as_dtype(self.temperature, values.dtype)
        weights = values.size * jax.nn.softmax(rates / t).reshape(values.shape)
        weights = jnp.where(state.epochs >= 2, weights, jnp.ones_like(values))
        weights = jax.lax.stop_gradient(weights)
        detached = jax.lax.stop_gradient(values).astype(state.loss_sum.dtype)
        new = state._replace(loss_sum=state.loss_sum + detached, batches=state.batches + 1)
        # the value policy of the stateful methods: a batch with a NaN or Inf loss gives a
        # non-finite scalar and leaves the history as it was
        finite = jnp.all(jnp.isfinite(detached))
        new = _keep_unless(finite, new, state)
        return jnp.sum(weights * values), new

    def end_epoch(self, state: DWAState) -> DWAState:
        """The epoch's average joins the history (the oldest average leaves it); nothing
        happens after an epoch without a batch, as in TorchJD."""
        average = state.loss_sum / jnp.maximum(state.batches, 1).astype(state.loss_sum.dtype)
        ended = state.batches > 0
        rolled = jnp.stack([state.averages[1], average])
        zero = jnp.zeros_like(state.loss_sum)
        return DWAState(
            jnp.where(ended, zero, state.loss_sum),
            jnp.where(ended, 0, state.batches),
            jnp.where(ended, rolled, state.averages),
            state.epochs + ended.astype(jnp.int32),
        )

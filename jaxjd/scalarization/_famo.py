"""FAMO: loss weights learned from how much each loss fell across the last step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jaxtyping import Array

from .._adam import AdamState, adam_direction, adam_init
from .._tree import accumulation_dtype
from .._typing import Scalar
from ..aggregation._abstract import _keep_unless
from ..aggregation._fields import as_dtype, number
from ._abstract import AbstractScalarizer, _checked_values, array, same_shape

_EPS = 1e-8  # FAMO's (and TorchJD's) shift inside the logarithms


class FAMOState(NamedTuple):
    """FAMO's state: the task logits ``w``, their Adam moments, the losses of the last call
    (what :meth:`FAMO.after_step` compares with) and whether such a call is pending."""

    logits: Array
    adam: AdamState  # Adam's moments on the logits
    last_losses: Array
    pending: Array  # bool


class FAMO(AbstractScalarizer):
    r"""Fast adaptive multitask optimization (Liu et al., NeurIPS 2023; TorchJD's ``FAMO``):
    the scalar ``c sum_i z_i log(L_i - b_i + eps)`` with ``z = softmax(w)`` and the constant
    ``c = (sum_i z_i / (L_i - b_i + eps))^-1``, whose gradient is a convex combination of the
    task gradients; it never needs the per-task gradients.

    The logits ``w`` learn from the step itself: after the optimizer step, evaluate the losses
    again on the same batch and call :meth:`after_step`. It takes one Adam step (with L2 weight
    decay, as ``torch.optim.Adam(weight_decay=)``) on ``w`` along the softmax's vector-Jacobian
    product with ``delta_i = log(L_i^before - b_i + eps) - log(L_i^after - b_i + eps)``.
    TorchJD mutates the module; here it is explicit state::

        state = famo.init(losses)
        loss, state = famo.update(losses, state)       # inside the differentiated function
        ...                                            # the optimizer step
        state = famo.after_step(new_losses, state)     # the same batch, after the step

    The losses must stay above ``b`` (the logarithm of a non-positive shifted loss is NaN). A
    call or an :meth:`after_step` with a non-finite loss leaves the state unchanged (the scalar
    is then non-finite); :meth:`after_step` without a call before it does nothing.

    Args:
        min_losses: ``b``, a lower bound of each loss (the losses' shape; default 0).
        lr: Adam's learning rate on the logits (``>= 0``; the paper's 0.025).
        weight_decay: the L2 coefficient on the logits (``>= 0``; 1e-3 as the paper's
            Algorithm 2, LibMTL and TorchJD; the official code uses 1e-5).
    """

    has_state = True
    min_losses: ArrayLike | None = array("min_losses")
    lr: Scalar = number("lr", 0.025, check="nonnegative")
    weight_decay: Scalar = number("weight_decay", 1e-3, check="nonnegative")

    def _init(self, values_like):
        dtype = accumulation_dtype(values_like.dtype)
        w = jnp.zeros(values_like.shape, dtype)
        return FAMOState(w, adam_init(w), jnp.zeros_like(w), jnp.zeros((), bool))

    def _check(self, values, state):
        if state.logits.shape != values.shape:
            raise ValueError(
                f"FAMO: the state was made for losses of shape {state.logits.shape}; got "
                f"{values.shape} (make a new one with famo.init(losses))."
            )

    def _shifted(self, values):
        b = same_shape(self.min_losses, values, "min_losses", "FAMO")
        return (values if b is None else values - b) + as_dtype(_EPS, values.dtype)

    def _scalarize(self, values, state, key, params):
        self._check(values, state)
        z = jax.nn.softmax(state.logits.ravel()).reshape(values.shape).astype(values.dtype)
        shifted = self._shifted(values)
        c = jax.lax.stop_gradient(1.0 / jnp.sum(z / shifted))
        scalar = jnp.sum(c * z * jnp.log(shifted))
        detached = jax.lax.stop_gradient(values).astype(state.last_losses.dtype)
        finite = jnp.all(jnp.isfinite(detached))
        new = state._replace(
            last_losses=jnp.where(finite, detached, state.last_losses),
            pending=state.pending | finite,
        )
        return scalar, new

    def after_step(self, values: ArrayLike, state: FAMOState, /) -> FAMOState:
        """The state after one Adam step on the logits, from the losses ``values`` measured on
        the same batch after the model's step (TorchJD's ``FAMO.update``)."""
        values = _checked_values(values, "FAMO")
        self._check(values, state)
        dtype = state.logits.dtype
        after = self._shifted(jax.lax.stop_gradient(values).astype(dtype))
        before = self._shifted(state.last_losses)
        delta = jnp.log(before) - jnp.log(after)
        _, vjp = jax.vjp(lambda w: jax.nn.softmax(w.ravel()), state.logits)
        (grad,) = vjp(delta.ravel())
        lr = as_dtype(self.lr, dtype)
        grad = grad + as_dtype(self.weight_decay, dtype) * state.logits  # L2, as torch's Adam
        direction, adam = adam_direction(grad, state.adam)
        logits = state.logits - lr * direction
        new = FAMOState(logits, adam, state.last_losses, jnp.zeros((), bool))
        return _keep_unless(state.pending & jnp.all(jnp.isfinite(delta)), new, state)

    def weights(self, state: FAMOState) -> Array:
        """The task weights ``z = softmax(w)`` the next call will use."""
        return jax.nn.softmax(state.logits.ravel()).reshape(state.logits.shape)

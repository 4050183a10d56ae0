"""Mean, Sum, Constant and Random (RLW): linear scalarizations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._abstract import AbstractScalarizer, array, required_shape


class Mean(AbstractScalarizer):
    """The mean of the losses (TorchJD's ``Mean``).

    >>> import jax.numpy as jnp
    >>> from jaxjd.scalarization import Mean
    >>> Mean()(jnp.array([1.0, 2.0, 6.0]))
    Array(3., dtype=float32)
    """

    def _scalarize(self, values, state, key, params):
        return jnp.mean(values), state


class Sum(AbstractScalarizer):
    """The sum of the losses (TorchJD's ``Sum``)."""

    def _scalarize(self, values, state, key, params):
        return jnp.sum(values), state


class Constant(AbstractScalarizer):
    """``sum_i w_i L_i`` with fixed weights of the losses' shape (TorchJD's ``Constant``).

    Args:
        weights: the weights, an array with the shape of the losses.
    """

    weights: ArrayLike = array("weights", optional=False)

    def _scalarize(self, values, state, key, params):
        w = required_shape(self.weights, values, "weights", "Constant")
        return jnp.sum(w * values), state


class Random(AbstractScalarizer):
    """Random loss weighting (RLW, Lin et al. 2022, Algorithm 2; TorchJD's ``Random``): weights
    ``softmax(z)`` with ``z`` standard normal, drawn from ``key`` at every step.

    Reference: Lin et al., "Reasonable effectiveness of random weighting: a litmus test for
    multi-task learning", TMLR 2022.
    """

    draws_key = True

    def _scalarize(self, values, state, key, params):
        z = jax.random.normal(key, (values.size,), values.dtype)
        w = jax.nn.softmax(z).reshape(values.shape)
        return jnp.sum(w * values), state

"""Constant: fixed weights given at construction."""

from __future__ import annotations

from .._typing import VectorLike
from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import sized, spelling, vector


class ConstantWeighting(AbstractWeighting):
    r"""``w`` fixed: ``J^T w`` for given weights (TorchJD's ``ConstantWeighting``). Reads only m.

    Args:
        weights: a 1-D vector of length m (an array leaf: new values do not retrace).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.constant_weighting(jnp.eye(2), weights=[0.2, 0.8])
    Array([0.2, 0.8], dtype=float32)
    """

    weights: VectorLike = vector("weights", optional=False)
    reads_gramian = False

    def _weigh(self, gramian, state, key):
        m = gramian.shape[0]
        return sized(self.weights, m, gramian.dtype, "weights"), state


class Constant(GramianWeightedAggregator):
    """``J^T w`` for fixed weights ``w`` (TorchJD's ``Constant``); no Gramian is formed.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.constant(jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), weights=[0.5, 0.5])
    Array([1., 1., 1.], dtype=float32)
    """

    weighting_class = ConstantWeighting


constant = spelling(Constant, "constant", reads="jacobian")
constant_weighting = spelling(ConstantWeighting, "constant_weighting", reads="gramian")

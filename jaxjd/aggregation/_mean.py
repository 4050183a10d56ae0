"""Mean: the average of the gradients (plain averaging of the losses)."""

from __future__ import annotations

import jax.numpy as jnp

from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import spelling


class MeanWeighting(AbstractWeighting):
    r"""``w = 1/m``: ``J^T w`` is the mean of the gradients. Reads only m, so an aggregator
    built on it never forms the Gramian.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.mean_weighting(jnp.eye(4))
    Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
    """

    reads_gramian = False

    def _weigh(self, gramian, state, key):
        m = gramian.shape[0]
        return jnp.full((m,), 1.0 / m, gramian.dtype), state


class Mean(GramianWeightedAggregator):
    """The mean of the rows of J (TorchJD's ``Mean``).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.mean(jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    Array([1., 1., 1.], dtype=float32)
    """

    weighting_class = MeanWeighting


mean = spelling(Mean, "mean", reads="jacobian")
mean_weighting = spelling(MeanWeighting, "mean_weighting", reads="gramian")

"""Sum: the sum of the gradients (gradient of the summed losses)."""

from __future__ import annotations

import jax.numpy as jnp

from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import spelling


class SumWeighting(AbstractWeighting):
    r"""``w = 1``: ``J^T w`` is the sum of the gradients. Reads only m.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.aggregation.SumWeighting()(jnp.eye(2))
    Array([1., 1.], dtype=float32)
    """

    reads_gramian = False

    def _weigh(self, gramian, state, key):
        return jnp.ones((gramian.shape[0],), gramian.dtype), state


class Sum(GramianWeightedAggregator):
    """The sum of the rows of J (TorchJD's ``Sum``).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.aggregation.Sum()(jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    Array([2., 2., 2.], dtype=float32)
    """

    weighting_class = SumWeighting


sum_rows = spelling(Sum, "sum_rows", reads="jacobian")
sum_weighting = spelling(SumWeighting, "sum_weighting", reads="gramian")

"""Random loss weighting (RLW, Lin et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._abstract import AbstractWeighting, GramianWeightedAggregator
from ._fields import spelling


class RandomWeighting(AbstractWeighting):
    r"""``w = softmax(z)``, ``z ~ N(0, I_m)`` drawn from the explicit PRNG ``key`` (the same key
    gives the same weights). Reads only m.

    Reference: Lin et al., "Reasonable effectiveness of random weighting", TMLR 2022.

    >>> import jax, jax.numpy as jnp, jaxjd as jd
    >>> w = jd.random_weighting(jnp.eye(3), key=jax.random.key(0))
    >>> round(float(w.sum()), 6)
    1.0
    """

    reads_gramian = False
    draws_key = True

    def _weigh(self, gramian, state, key):
        if key is None:
            raise ValueError(
                "Random weighting needs a PRNG key: call it with key=jax.random.key(0)."
            )
        # softmax without the max shift: jax's normal draws are bounded (|z| < 9 even in
        # float64), so exp cannot overflow, and one reduction fewer matters at this size.
        e = jnp.exp(jax.random.normal(key, (gramian.shape[0],), gramian.dtype))
        return e / jnp.sum(e), state


class Random(GramianWeightedAggregator):
    """``J^T softmax(z)``, ``z ~ N(0, I)`` from ``key`` (RLW; TorchJD's ``Random``): call as
    ``agg(J, key=key)``."""

    weighting_class = RandomWeighting


rlw = spelling(Random, "rlw", reads="jacobian")
random_weighting = spelling(RandomWeighting, "random_weighting", reads="gramian")

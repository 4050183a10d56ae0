"""Mean, Sum, Constant and Random: weightings that only read the number of objectives m."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ._base import (
    GramianWeightedAggregator,
    ShapeWeighting,
    as_static_vector,
    build_or_apply,
    vector_for,
)


class MeanWeighting(ShapeWeighting):
    """``w = 1/m``: the mean of the gradients (plain averaging of the losses)."""

    def _weights(self, m, dtype, key):
        return jnp.full((m,), 1.0 / m, dtype)


class SumWeighting(ShapeWeighting):
    """``w = 1``: the sum of the gradients."""

    def _weights(self, m, dtype, key):
        return jnp.ones((m,), dtype)


class ConstantWeighting(ShapeWeighting):
    """Fixed weights given at construction; their length must equal m."""

    weights: tuple[float, ...] = eqx.field(static=True)

    def __init__(self, weights):
        if weights is None:
            raise ValueError("ConstantWeighting needs a 1-D vector of weights.")
        self.weights = as_static_vector(weights, "weights")

    def _weights(self, m, dtype, key):
        return vector_for(self.weights, m, dtype, "weights")


class RandomWeighting(ShapeWeighting):
    """Random loss weighting (RLW, Lin et al. 2022): ``w = softmax(z)``, ``z ~ N(0, I_m)``, drawn
    from the explicit PRNG ``key``; the same key gives the same weights."""

    needs_key = True

    def _weights(self, m, dtype, key):
        if key is None:
            raise ValueError(
                "Random weighting needs a PRNG key: call it with key=jax.random.key(0)."
            )
        # softmax without the max shift: jax's normal draws are bounded (|z| < 9 even in
        # float64), so exp cannot overflow, and one reduction fewer matters at this size.
        e = jnp.exp(jax.random.normal(key, (m,), dtype))
        return e / jnp.sum(e)


class Mean(GramianWeightedAggregator):
    """The mean of the rows of J (no Gramian is formed)."""

    weighting: MeanWeighting

    def __init__(self):
        self.weighting = MeanWeighting()


class Sum(GramianWeightedAggregator):
    """The sum of the rows of J (no Gramian is formed)."""

    weighting: SumWeighting

    def __init__(self):
        self.weighting = SumWeighting()


class Constant(GramianWeightedAggregator):
    """``J^T w`` for fixed weights ``w`` (no Gramian is formed)."""

    weighting: ConstantWeighting

    def __init__(self, weights):
        self.weighting = ConstantWeighting(weights)


class Random(GramianWeightedAggregator):
    """``J^T softmax(z)``, ``z ~ N(0, I)`` from ``key`` (RLW). Call as ``agg(J, key=key)``."""

    weighting: RandomWeighting

    def __init__(self):
        self.weighting = RandomWeighting()


def mean(jacobian=None, /):
    """Mean of the rows: ``mean(J)`` returns the update, ``mean()`` a :class:`Mean`.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.mean(jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    Array([1., 1., 1.], dtype=float32)
    """
    return build_or_apply(Mean(), jacobian)


def sum(jacobian=None, /):
    """Sum of the rows: ``sum(J)`` returns the update, ``sum()`` a :class:`Sum`."""
    return build_or_apply(Sum(), jacobian)


def constant(jacobian=None, /, *, weights):
    """Fixed weights: ``constant(J, weights=w)`` returns ``J^T w``, ``constant(weights=w)`` a
    :class:`Constant`."""
    return build_or_apply(Constant(weights), jacobian)


def random(jacobian=None, /, *, key=None):
    """Random weights (RLW): ``random(J, key=key)`` returns the update, ``random()`` a
    :class:`Random` to call with ``key=``."""
    return build_or_apply(Random(), jacobian, key=key)


def mean_weighting(gramian=None, /):
    return build_or_apply(MeanWeighting(), gramian)


def sum_weighting(gramian=None, /):
    return build_or_apply(SumWeighting(), gramian)


def constant_weighting(gramian=None, /, *, weights):
    return build_or_apply(ConstantWeighting(weights), gramian)


def random_weighting(gramian=None, /, *, key=None):
    return build_or_apply(RandomWeighting(), gramian, key=key)

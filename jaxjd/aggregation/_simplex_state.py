"""The state MoDo and SDMGrad share: weights on the simplex, ``1/m`` at first."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SimplexWeightsState(NamedTuple):
    """The current weights on the simplex (initialised to ``1/m``)."""

    weights: jax.Array


def uniform_state(m: int, dtype) -> SimplexWeightsState:
    return SimplexWeightsState(jnp.full((m,), 1.0 / m, dtype))

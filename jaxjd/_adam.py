"""Adam's moments for the few methods that train their own parameters (FAMO's logits,
GradNorm's scales), written out so that they run under strict dtype promotion (optax's bias
correction mixes an integer count with Python floats)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array


class AdamState(NamedTuple):
    """First and second moments and the number of steps taken."""

    mu: Array
    nu: Array
    count: Array


def adam_init(x: Array) -> AdamState:
    return AdamState(jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros((), jnp.int32))


def adam_direction(
    grad: Array, state: AdamState, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> tuple[Array, AdamState]:
    """``(m_hat / (sqrt(v_hat) + eps), new state)``: Adam's step before the learning rate
    (``torch.optim.Adam`` and ``optax.scale_by_adam`` compute the same)."""
    dtype = grad.dtype
    one = jnp.ones((), dtype)
    b1_, b2_, eps_ = (jnp.asarray(v, dtype) for v in (b1, b2, eps))
    mu = b1_ * state.mu + (one - b1_) * grad
    nu = b2_ * state.nu + (one - b2_) * grad * grad
    count = state.count + 1
    t = count.astype(dtype)
    mu_hat = mu / (one - b1_**t)
    nu_hat = nu / (one - b2_**t)
    return mu_hat / (jnp.sqrt(nu_hat) + eps_), AdamState(mu, nu, count)

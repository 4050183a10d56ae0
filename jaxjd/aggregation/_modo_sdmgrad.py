"""MoDo (Chen et al., JMLR 2024) and SDMGrad (Xiao et al., NeurIPS 2023): stateful weightings of
a cross-batch product ``A = J1 J2^T`` (two independent mini-batches; not symmetric).

Get ``A`` with two Jacobians of the same losses on two batches::

    _, J1 = jd.value_and_jacobian(losses)(params, batch1)
    _, J2 = jd.value_and_jacobian(losses)(params, batch2)
    A = jd.cross_gramian(J1, J2)
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, check_gramian
from ._base import (
    StatefulWeighting,
    as_static_vector,
    check_nonnegative,
    check_positive,
    positive_int,
)
from ._base import vector_for as _vector_for
from ._cagrad import project_onto_simplex


class SimplexWeightsState(NamedTuple):
    """The current weights on the simplex (initialised to ``1/m``)."""

    weights: jax.Array


class _SimplexStateWeighting(StatefulWeighting):
    """A stateful weighting whose state is weights on the simplex, starting at ``1/m``."""

    def init(self, num_objectives, dtype=jnp.float32):
        m = positive_int(num_objectives, "num_objectives")
        return SimplexWeightsState(jnp.full((m,), 1.0 / m, accumulation_dtype(dtype)))


def _checked(matrix, state):
    m = check_gramian(matrix)
    if state.weights.shape != (m,):
        raise ValueError(
            f"The state holds {state.weights.shape[0]} objectives but the matrix has m = {m}: "
            "build a new state with init(m)."
        )
    A = jax.lax.stop_gradient(jnp.asarray(matrix, state.weights.dtype))
    return m, A


class MoDoWeighting(_SimplexStateWeighting):
    r"""MoDo: one projected step per call, ``l <- P_simplex(l - gamma (A l + rho l))``, warm
    started from the previous weights (``1/m`` at first); returns the new ``l``."""

    gamma: float = eqx.field(static=True)
    rho: float = eqx.field(static=True)

    def __init__(self, gamma: float = 0.1, rho: float = 0.1):
        self.gamma = check_positive(gamma, "gamma")
        self.rho = check_nonnegative(rho, "rho")

    def _update(self, matrix, state, key):
        _, A = _checked(matrix, state)
        lam = state.weights
        lam = project_onto_simplex(lam - self.gamma * (A @ lam + self.rho * lam))
        return lam, SimplexWeightsState(lam)


class SDMGradWeighting(_SimplexStateWeighting):
    r"""SDMGrad: ``a = A / (mean(sqrt(max(diag A, 0)))^2 + 1e-8)``; ``n_iter`` momentum steps
    ``v <- mu v + a (w + lambda w~)``, ``w <- P_simplex(w - lr v)`` warm started from the previous
    ``w``; returns ``(w + lambda w~) / (1 + lambda)`` (``w~`` = preference, default ``1/m``)."""

    lr: float = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    n_iter: int = eqx.field(static=True)
    lambda_: float = eqx.field(static=True)
    pref_vector: tuple[float, ...] | None = eqx.field(static=True)

    def __init__(self, lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref_vector=None):
        self.lr = check_positive(lr, "lr")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
        self.momentum = float(momentum)
        self.n_iter = positive_int(n_iter, "n_iter")
        self.lambda_ = check_nonnegative(lambda_, "lambda_")
        self.pref_vector = as_static_vector(pref_vector, "pref_vector")

    def _update(self, matrix, state, key):
        m, A = _checked(matrix, state)
        dtype = A.dtype
        if self.pref_vector is None:
            w_tilde = jnp.full((m,), 1.0 / m, dtype)
        else:
            w_tilde = _vector_for(self.pref_vector, m, dtype, "pref_vector")
        scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(A), 0.0)))
        a = A / (scale**2 + 1e-8)

        def step(i, carry):
            w, v = carry
            grad = a @ (w + self.lambda_ * w_tilde)
            v = jnp.where(i == 0, grad, self.momentum * v + grad)
            return project_onto_simplex(w - self.lr * v), v

        w, _ = jax.lax.fori_loop(0, self.n_iter, step, (state.weights, jnp.zeros((m,), dtype)))
        out = (w + self.lambda_ * w_tilde) / (1.0 + self.lambda_)
        return out, SimplexWeightsState(w)


def modo_weighting(*, gamma=0.1, rho=0.1):
    """:class:`MoDoWeighting` (stateful: ``init`` then ``update``)."""
    return MoDoWeighting(gamma, rho)


def sdmgrad_weighting(*, lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref_vector=None):
    """:class:`SDMGradWeighting` (stateful: ``init`` then ``update``)."""
    return SDMGradWeighting(lr, momentum, n_iter, lambda_, pref_vector)

"""SDMGrad (Xiao et al., NeurIPS 2023): a stateful weighting of a cross-batch product
``A = J1 J2^T`` (two independent mini-batches; not symmetric)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._linalg import project_onto_simplex
from .._typing import Scalar, VectorLike
from ._abstract import AbstractWeighting
from ._fields import as_dtype, number, sized, spelling, static_int, vector
from ._simplex_state import SimplexWeightsState, uniform_state


class SDMGradWeighting(AbstractWeighting):
    r"""SDMGrad: ``a = A / (mean(sqrt(max(diag A, 0)))^2 + 1e-8)``; ``n_iter`` momentum steps
    ``v <- mu v + a (w + lambda w~)``, ``w <- P_simplex(w - lr v)`` warm started from the previous
    ``w``; returns ``(w + lambda w~) / (1 + lambda)`` (``w~`` = preference, default ``1/m``).

    ``A = jd.cross_gramian(J1, J2)`` from the Jacobians of the same losses on two independent
    batches.

    Args:
        lr: the step size of the inner steps.
        momentum: ``mu``, in [0, 1).
        n_iter: inner steps per call.
        lambda_: the pull toward the preference.
        pref_vector: ``w~`` (default ``1/m``).

    Reference: Xiao et al., "Direction-oriented multi-objective learning: simple and provable
    stochastic algorithms", NeurIPS 2023.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> weighting = jd.sdmgrad_weighting()
    >>> A = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> w, state = weighting.update(A, weighting.init(2))
    >>> round(float(w.sum()), 6)
    1.0
    """

    lr: Scalar = number("lr", 10.0, check="positive")
    momentum: Scalar = number("momentum", 0.5, check="fraction")
    n_iter: int = static_int("n_iter", 20)
    lambda_: Scalar = number("lambda_", 0.3, check="nonnegative")
    pref_vector: VectorLike | None = vector("pref_vector")
    has_state = True

    def _init(self, m, dtype):
        return uniform_state(m, dtype)

    def _weigh(self, A, state, key):
        dtype = state.weights.dtype
        m = A.shape[0]
        A = A.astype(dtype)
        if self.pref_vector is None:
            w_tilde = jnp.full((m,), 1.0 / m, dtype)
        else:
            w_tilde = sized(self.pref_vector, m, dtype, "pref_vector")
        lr, momentum = as_dtype(self.lr, dtype), as_dtype(self.momentum, dtype)
        lambda_ = as_dtype(self.lambda_, dtype)
        scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(A), 0.0)))
        a = A / (scale**2 + 1e-8)

        def step(i, carry):
            w, v = carry
            grad = a @ (w + lambda_ * w_tilde)
            v = jnp.where(i == 0, grad, momentum * v + grad)
            return project_onto_simplex(w - lr * v), v

        w, _ = jax.lax.fori_loop(0, self.n_iter, step, (state.weights, jnp.zeros((m,), dtype)))
        out = (w + lambda_ * w_tilde) / (1.0 + lambda_)
        return out, SimplexWeightsState(w)


sdmgrad_weighting = spelling(SDMGradWeighting, "sdmgrad_weighting", reads="gramian")

"""MoDo (Chen et al., JMLR 2024): a stateful weighting of a cross-batch product ``A = J1 J2^T``
(two independent mini-batches; not symmetric)."""

from __future__ import annotations

from .._linalg import project_onto_simplex
from .._typing import Scalar
from ._abstract import AbstractWeighting
from ._fields import as_dtype, number, spelling
from ._simplex_state import SimplexWeightsState, uniform_state


class MoDoWeighting(AbstractWeighting):
    r"""MoDo: one projected step per call, ``l <- P_simplex(l - gamma (A l + rho l))``, warm
    started from the previous weights (``1/m`` at first); returns the new ``l``.

    ``A = jd.cross_gramian(J1, J2)`` from the Jacobians of the same losses on two independent
    batches (``jd.gramian(J)`` gives a biased but usable ``A``).

    Args:
        gamma: the step size of the weights.
        rho: the weights' regularisation.

    Reference: Chen et al., "Three-way trade-off in multi-objective learning: optimization,
    generalization and conflict-avoidance", JMLR 2024.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> weighting = jd.modo_weighting()
    >>> A = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> w, state = weighting.update(A, weighting.init(2))
    >>> [round(float(x), 4) for x in w]
    [1.0, 0.0]
    """

    gamma: Scalar = number("gamma", 0.1, check="positive")
    rho: Scalar = number("rho", 0.1, check="nonnegative")
    has_state = True

    def _init(self, m, dtype):
        return uniform_state(m, dtype)

    def _weigh(self, A, state, key):
        lam = state.weights
        A = A.astype(lam.dtype)
        gamma, rho = as_dtype(self.gamma, lam.dtype), as_dtype(self.rho, lam.dtype)
        lam = project_onto_simplex(lam - gamma * (A @ lam + rho * lam))
        return lam, SimplexWeightsState(lam)


modo_weighting = spelling(MoDoWeighting, "modo_weighting", reads="gramian")

"""ExcessMTL (He et al., ICML 2024): robust multi-task weights from per-task excess risks.

Needs coordinates: its state holds a running sum of squared gradients **the size of the
Jacobian** (m times the parameters), so it cannot be fed by a Gramian engine.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._tree import accumulation_dtype, num_objectives
from ._base import StatefulAggregator, check_positive


class ExcessMTLState(NamedTuple):
    """State of ExcessMTL.

    Attributes:
        weights: current task weights (m,), on the simplex (``1/m`` at first).
        sq_grad_sum: running sum of ``J**2``, a pytree like the Jacobian (m x n in total).
        baseline: the excess risks that later ones are divided by (m,).
        warmup_sum: sum of the excess risks seen during warm-up (m,).
        count: number of calls so far.
    """

    weights: jax.Array
    sq_grad_sum: PyTree[jax.Array]
    baseline: jax.Array
    warmup_sum: jax.Array
    count: jax.Array


class ExcessMTLWeighting(eqx.Module):
    r"""Weights of ExcessMTL, from the Jacobian (pytree).

    Each call: ``S += J**2``; excess risks ``e_i = sum_k J_ik^2 / sqrt(S_ik + 1e-7)`` (an AdaGrad
    diagonal Hessian, Eqs. 6-7). During the first ``n_warmup_steps`` calls the weights stay
    uniform and ``e`` is summed; the baseline is then the warm-up mean (or, without warm-up, the
    first call's ``e``, used raw on that call). Later ``e <- e / (baseline + 1e-7)`` and
    ``w <- softmax(log w + robust_step_size * e)`` (Eq. 9, in log space).
    State: :class:`ExcessMTLState`, Jacobian-sized.
    """

    robust_step_size: float = eqx.field(static=True)
    n_warmup_steps: int = eqx.field(static=True)

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0):
        self.robust_step_size = check_positive(robust_step_size, "robust_step_size")
        if int(n_warmup_steps) != n_warmup_steps or n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps must be an integer >= 0; got {n_warmup_steps}.")
        self.n_warmup_steps = int(n_warmup_steps)

    def init(self, jacobian: PyTree, /) -> ExcessMTLState:
        """Zero state for Jacobians shaped like ``jacobian`` (arrays or shape structs)."""
        m = num_objectives(jacobian)
        sums = jax.tree_util.tree_map(
            lambda leaf: jnp.zeros(leaf.shape, accumulation_dtype(leaf.dtype)), jacobian
        )
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(sums))
        zeros = jnp.zeros((m,), dtype)
        return ExcessMTLState(
            jnp.full((m,), 1.0 / m, dtype), sums, zeros, zeros, jnp.zeros((), jnp.int32)
        )

    def update(
        self, jacobian: PyTree, state: ExcessMTLState, /
    ) -> tuple[Float[Array, " m"], ExcessMTLState]:
        """``(weights, new_state)`` for this step's Jacobian."""
        m = num_objectives(jacobian)
        if state.weights.shape != (m,):
            raise ValueError(
                f"The state holds {state.weights.shape[0]} objectives but the Jacobian has "
                f"m = {m}: build a new state with init(jacobian)."
            )
        if jax.tree_util.tree_structure(jacobian) != jax.tree_util.tree_structure(
            state.sq_grad_sum
        ):
            raise ValueError("The Jacobian's pytree structure differs from the state's.")
        return _update_jit(self, jacobian, state)

    def _update(self, jacobian, state):
        dtype = state.weights.dtype
        squares = jax.tree_util.tree_map(
            lambda leaf, s: jnp.square(jax.lax.stop_gradient(leaf).astype(s.dtype)),
            jacobian,
            state.sq_grad_sum,
        )
        sums = jax.tree_util.tree_map(jnp.add, state.sq_grad_sum, squares)
        per_leaf = jax.tree_util.tree_map(
            lambda sq, s: jnp.sum(jnp.reshape(sq / jnp.sqrt(s + 1e-7), (sq.shape[0], -1)), 1),
            squares,
            sums,
        )
        excess = functools.reduce(jnp.add, jax.tree_util.tree_leaves(per_leaf)).astype(dtype)
        warm = state.count < self.n_warmup_steps
        first = state.count == self.n_warmup_steps
        if self.n_warmup_steps > 0:
            warmup_baseline = state.warmup_sum / self.n_warmup_steps
            baseline = jnp.where(first, warmup_baseline, state.baseline)
            scaled = excess / (baseline + 1e-7)
        else:
            baseline = jnp.where(first, excess, state.baseline)
            scaled = jnp.where(first, excess, excess / (baseline + 1e-7))
        stepped = jax.nn.softmax(jnp.log(state.weights) + self.robust_step_size * scaled)
        weights = jnp.where(warm, state.weights, stepped)
        new = ExcessMTLState(
            weights,
            sums,
            baseline,
            jnp.where(warm, state.warmup_sum + excess, state.warmup_sum),
            state.count + 1,
        )
        return weights, new


@functools.partial(jax.jit, static_argnums=0)
def _update_jit(weighting, jacobian, state):
    return weighting._update(jacobian, state)


class ExcessMTL(StatefulAggregator):
    """ExcessMTL aggregator (stateful, Jacobian-sized state): ``state = agg.init(J)``, then
    ``update, state = agg.update(J, state)``."""

    weighting: ExcessMTLWeighting

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0):
        self.weighting = ExcessMTLWeighting(robust_step_size, n_warmup_steps)

    def init(self, jacobian, /):
        return self.weighting.init(jacobian)

    def weights(self, jacobian, state, /, *, key=None):
        return self.weighting.update(jacobian, state)


def excess_mtl(*, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> ExcessMTL:
    """:class:`ExcessMTL` (He et al., ICML 2024), stateful."""
    return ExcessMTL(robust_step_size, n_warmup_steps)


def excess_mtl_weighting(
    *, robust_step_size: float = 1.0, n_warmup_steps: int = 0
) -> ExcessMTLWeighting:
    """:class:`ExcessMTLWeighting` (stateful, on the Jacobian: ``init`` then ``update``)."""
    return ExcessMTLWeighting(robust_step_size, n_warmup_steps)

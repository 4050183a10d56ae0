"""ExcessMTL (He et al., ICML 2024): robust multi-task weights from per-task excess risks.

Needs coordinates: its state holds a running sum of squared gradients **the size of the
Jacobian** (m times the parameters), so it cannot be fed by a Gramian engine.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from .._tree import accumulation_dtype, accumulation_dtype_of, combine, num_objectives
from .._typing import Scalar
from ._abstract import AbstractAggregator, Aggregation
from ._fields import as_dtype, number, spelling, static_int


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


class ExcessMTL(AbstractAggregator):
    r"""ExcessMTL: robust task weights from per-task excess risks, read from the Jacobian.

    Each call: ``S += J**2``; excess risks ``e_i = sum_k J_ik^2 / sqrt(S_ik + 1e-7)`` (an AdaGrad
    diagonal Hessian, Eqs. 6-7). During the first ``n_warmup_steps`` calls the weights stay
    uniform and ``e`` is summed; the baseline is then the warm-up mean (or, without warm-up, the
    first call's ``e``, used raw on that call). Later ``e <- e / (baseline + 1e-7)`` and
    ``w <- softmax(log w + robust_step_size * e)`` (Eq. 9, in log space); the update is
    ``J^T w``. State: :class:`ExcessMTLState`, Jacobian-sized (so no Gramian engine can feed
    it).

    Args:
        robust_step_size: the step of the weights' mirror ascent.
        n_warmup_steps: calls with uniform weights that set the baseline.

    Reference: He et al., "Robust multi-task learning with excess risks", ICML 2024.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> agg = jd.excess_mtl()
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> update, state = agg.update(J, agg.init(J))
    >>> int(state.count)
    1
    """

    robust_step_size: Scalar = number("robust_step_size", 1.0, check="positive")
    n_warmup_steps: int = static_int("n_warmup_steps", 0, minimum=0)
    has_state = True

    def _init(self, jacobian: PyTree) -> ExcessMTLState:
        m = num_objectives(jacobian)
        sums = jax.tree_util.tree_map(
            lambda leaf: jnp.zeros(leaf.shape, accumulation_dtype(leaf.dtype)), jacobian
        )
        dtype = accumulation_dtype_of(*jax.tree_util.tree_leaves(sums))
        zeros = jnp.zeros((m,), dtype)
        return ExcessMTLState(
            jnp.full((m,), 1.0 / m, dtype), sums, zeros, zeros, jnp.zeros((), jnp.int32)
        )

    def _aggregate(self, jacobian, state, key):
        if jax.tree_util.tree_structure(jacobian) != jax.tree_util.tree_structure(
            state.sq_grad_sum
        ):
            raise ValueError("The Jacobian's pytree structure differs from the state's.")
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
        step = as_dtype(self.robust_step_size, dtype)
        stepped = jax.nn.softmax(jnp.log(state.weights) + step * scaled)
        weights = jnp.where(warm, state.weights, stepped)
        new = ExcessMTLState(
            weights,
            sums,
            baseline,
            jnp.where(warm, state.warmup_sum + excess, state.warmup_sum),
            state.count + 1,
        )
        return Aggregation(combine(weights, jacobian), weights, new)


excess_mtl = spelling(ExcessMTL, "excess_mtl", reads="jacobian")

"""MoCo and DB-MTL (from LibMTL): aggregators that track each task's gradient in their state
(Jacobian-sized, like ExcessMTL's) and read the loss values."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._tree import (
    accumulation_dtype,
    accumulation_dtype_of,
    combine,
    gramian,
    num_objectives,
    power_of_two_exponent,
)
from .._typing import Scalar
from ._abstract import AbstractAggregator, Aggregation
from ._fields import as_dtype, number, spelling

_EPS = 1e-8  # LibMTL's, in the norms and the logarithm


def _zeros_like_rows(jacobian):
    return jax.tree_util.tree_map(
        lambda leaf: jnp.zeros(leaf.shape, accumulation_dtype(leaf.dtype)), jacobian
    )


def _check_structure(jacobian, tracked, name: str) -> None:
    if jax.tree_util.tree_structure(jacobian) != jax.tree_util.tree_structure(tracked):
        raise ValueError(f"{name}: the Jacobian's pytree structure differs from the state's.")


def _constant(jacobian, like):
    """``J`` as a constant in the state's dtypes."""
    return jax.tree_util.tree_map(
        lambda leaf, t: jax.lax.stop_gradient(leaf).astype(t.dtype), jacobian, like
    )


def _scaled_rows(tree, scale):
    """``diag(scale) J``, leaf by leaf."""
    return jax.tree_util.tree_map(
        lambda x: jnp.reshape(scale.astype(x.dtype), (-1,) + (1,) * (x.ndim - 1)) * x, tree
    )


def _row_norms(tree) -> Array:
    """``|g_i|`` for every row, with each row scaled by a power of two near its largest entry
    before squaring (exact), so that rows of 1e-20 or 1e20 keep their norm in float32."""
    rows = [jnp.reshape(x, (x.shape[0], -1)) for x in jax.tree_util.tree_leaves(tree)]
    top = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), axis=1, initial=0) for x in rows])
    usable = (top > 0) & jnp.isfinite(top)
    _, e = jnp.frexp(jnp.where(usable, top, 1.0))
    parts = [jnp.sum(jnp.square(jnp.ldexp(x, -e[:, None])), 1) for x in rows]
    return jnp.ldexp(jnp.sqrt(functools.reduce(jnp.add, parts)), e)


def _decayed(rate, sigma, t, dtype):
    """LibMTL's step size ``rate / t^sigma`` at step ``t`` (from 1)."""
    return as_dtype(rate, dtype) / t.astype(dtype) ** as_dtype(sigma, dtype)


def _like_row(update, jacobian):
    """The update (one row's structure) in the Jacobian leaves' dtypes."""
    return jax.tree_util.tree_map(lambda u, leaf: u.astype(leaf.dtype), update, jacobian)


class MoCoState(NamedTuple):
    """MoCo's state: the tracked gradients ``y`` (a pytree like the Jacobian), the task weights
    ``lambda`` (m,) and the number of calls so far."""

    y: PyTree[Array]
    weights: Array
    count: Array


class MoCo(AbstractAggregator):
    r"""MoCo, as LibMTL runs it. At call ``t`` (from 1), with
    ``h_i = L_i g_i / (|g_i| + 1e-8)``:

    ``y <- y - beta_t (y - h)``, ``lambda <- softmax(lambda - gamma_t (y y^T + rho I) lambda)``
    and the update ``y^T lambda``, with ``beta_t = beta / t^beta_sigma`` and
    ``gamma_t = gamma / t^gamma_sigma`` (``y = 0``, ``lambda = 1/m`` at first).

    Reads the losses (``losses=``) and tracks ``y``, a pytree the size of the Jacobian, in its
    state (so no Gramian engine can feed it). The update is not ``J^T w`` for this step's J:
    ``aggregate(...).weights`` is ``None``; ``state.weights`` holds ``lambda``.

    Args:
        beta, beta_sigma: the tracking rate and its decay (LibMTL's defaults 0.5, 0.5).
        gamma, gamma_sigma: the rate of ``lambda`` and its decay (0.1, 0.5).
        rho: the L2 regularisation of ``lambda``'s step (0).

    Reference: Fernando et al., "Mitigating gradient bias in multi-objective learning: a
    provably convergent approach", ICLR 2023; LibMTL's ``MoCo``.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> agg = jd.moco()
    >>> J, losses = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), jnp.array([1.0, 2.0])
    >>> update, state = agg.update(J, agg.init(J), losses=losses)
    >>> [round(float(x), 4) for x in update]
    [0.2374, 0.1396, 0.1396]
    """

    beta: Scalar = number("beta", 0.5, check="nonnegative")
    beta_sigma: Scalar = number("beta_sigma", 0.5, check="nonnegative")
    gamma: Scalar = number("gamma", 0.1, check="nonnegative")
    gamma_sigma: Scalar = number("gamma_sigma", 0.5, check="nonnegative")
    rho: Scalar = number("rho", 0.0, check="nonnegative")
    has_state = True
    reads_losses = True

    def _init(self, jacobian):
        m = num_objectives(jacobian)
        y = _zeros_like_rows(jacobian)
        dtype = accumulation_dtype_of(*jax.tree_util.tree_leaves(y))
        return MoCoState(y, jnp.full((m,), 1.0 / m, dtype), jnp.zeros((), jnp.int32))

    def _aggregate(self, jacobian, state, key, losses):
        _check_structure(jacobian, state.y, "MoCo")
        dtype = state.weights.dtype
        t = state.count + 1
        J = _constant(jacobian, state.y)
        h = _scaled_rows(J, losses.astype(dtype) / (_row_norms(J) + _EPS))
        beta = _decayed(self.beta, self.beta_sigma, t, dtype)
        y = jax.tree_util.tree_map(lambda y, h: y - beta.astype(y.dtype) * (y - h), state.y, h)
        gamma = _decayed(self.gamma, self.gamma_sigma, t, dtype)
        weights = _moco_softmax(y, state.weights, gamma, as_dtype(self.rho, dtype))
        update = _like_row(combine(weights, y), jacobian)
        return Aggregation(update, None, MoCoState(y, weights, t))


def _moco_softmax(y, lam, gamma, rho):
    """``softmax(lam - gamma (y y^T + rho I) lam)`` with ``y y^T`` formed at a power-of-two
    scale ``s`` (``y y^T = s^2 u``): rows of norm 1e30 (float32 losses of 1e30) overflowed it,
    and the softmax of Inf logits was NaN where float64's is one-hot. The logits are shifted by
    ``gamma s^2 min(u lam)`` (the softmax is unchanged): the entries where ``u lam`` is smallest
    keep a finite logit and the others may go to ``-inf`` (weight 0) without a NaN."""
    e = power_of_two_exponent(jax.tree_util.tree_leaves(y), lam.dtype)
    u = gramian(jax.tree_util.tree_map(lambda x: jnp.ldexp(x, -e), y)).astype(lam.dtype) @ lam
    delta = u - jnp.min(u)
    c = gamma * jnp.ldexp(jnp.ones((), lam.dtype), 2 * e)  # gamma s^2 (Inf out of range)
    shift = jnp.where(delta > 0, c * delta, 0.0)
    return jax.nn.softmax(lam - gamma * rho * lam - jnp.where(jnp.isnan(delta), delta, shift))


class DBMTLState(NamedTuple):
    """DB-MTL's state: the tracked gradients of the log-losses (a pytree like the Jacobian) and
    the number of calls so far."""

    buffer: PyTree[Array]
    count: Array


class DBMTL(AbstractAggregator):
    r"""DB-MTL, as LibMTL runs it:
    the rows are the gradients of the log-losses, ``g_i / (L_i + 1e-8)``; at call ``t`` (from
    1) ``b <- h + beta_t (b - h)`` with ``beta_t = beta / t^beta_sigma`` (``b = 0`` at first),
    and the update is ``sum_i a_i b_i`` with ``a_i = max_j |b_j| / (|b_i| + 1e-8)``: every
    tracked gradient brought to the largest norm.

    Reads the losses (``losses=``) and keeps ``b``, a pytree the size of the Jacobian, in its
    state. ``aggregate(...).weights`` is ``None`` (the update combines ``b``, not this J).

    Args:
        beta, beta_sigma: the tracking rate and its decay (LibMTL's defaults 0.9 and 0).

    Reference: Lin et al., "Dual-balancing for multi-task learning", arXiv 2308.12029, 2023;
    LibMTL's ``DB_MTL``.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> agg = jd.db_mtl()
    >>> J, losses = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]), jnp.array([1.0, 2.0])
    >>> update, state = agg.update(J, agg.init(J), losses=losses)
    >>> [round(float(x), 4) for x in update]
    [0.0129, 0.1688, 0.1688]
    """

    beta: Scalar = number("beta", 0.9, check="nonnegative")
    beta_sigma: Scalar = number("beta_sigma", 0.0, check="nonnegative")
    has_state = True
    reads_losses = True

    def _init(self, jacobian):
        return DBMTLState(_zeros_like_rows(jacobian), jnp.zeros((), jnp.int32))

    def _aggregate(self, jacobian, state, key, losses):
        _check_structure(jacobian, state.buffer, "DBMTL")
        leaves = jax.tree_util.tree_leaves(state.buffer)
        dtype = accumulation_dtype_of(*leaves)
        t = state.count + 1
        h = _scaled_rows(_constant(jacobian, state.buffer), 1.0 / (losses.astype(dtype) + _EPS))
        beta = _decayed(self.beta, self.beta_sigma, t, dtype)
        buffer = jax.tree_util.tree_map(
            lambda b, h: h + beta.astype(b.dtype) * (b - h), state.buffer, h
        )
        norms = _row_norms(buffer)
        alpha = jnp.max(norms) / (norms + _EPS)
        update = _like_row(combine(alpha, buffer), jacobian)
        return Aggregation(update, None, DBMTLState(buffer, t))


moco = spelling(MoCo, "moco", reads="jacobian")
db_mtl = spelling(DBMTL, "db_mtl", reads="jacobian")

"""The layerwise engine: the Gramian of m output cotangents' rows ``J_t = c_t^T d fun / d params``,
layer by layer, without forming J (few objectives, wide layers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._spmd import replicated, whole
from .._tree import accumulation_dtype_of
from ._jaxpr import _analyse, _Traced


class LayerwiseFactors(NamedTuple):
    """What the layerwise engine keeps for ``J^T w``.

    Attributes:
        ghost: for the dense uses formed without their rows, ``param index -> (X, D)``.
        rows: the other parameters' rows ``param index -> (m, -1)``.
        treedef: the parameters' structure.
        leaves: the parameters' leaves.
    """

    ghost: dict
    rows: dict
    treedef: Any
    leaves: list


def task_gramian_vjp(
    fun: Callable, params: PyTree, *args: Any
) -> tuple[PyTree, Callable[..., tuple[Float[Array, "m m"] | None, LayerwiseFactors]]]:
    r"""The Gramian of the rows ``J_t = c_t^T d fun / d params`` for m output cotangents
    ``c_t``, layer by layer, without forming J.

    Returns ``(out, pullback)``: ``out = fun(params, *args)`` (any pytree) and
    ``pullback(cotangents, gramian=True) -> (G, factors)`` for cotangents shaped like ``out``
    with a leading axis m. One vmapped VJP carries the m cotangents back to the output of every
    dense use ``y = x @ W`` (cotangents ``D_t``), and with ``K = X X^T`` over the rows of x,
    ``<X^T D_t, X^T D_u> = sum(D_t * (K D_u))``; when that is dearer than ``X^T D_t`` itself
    (few rows, narrow layers) the rows are formed. Every other parameter used by one equation
    gets its rows from that equation's own VJP; the rest (used twice, inside a loop or a custom
    derivative) from the same vmapped VJP. :func:`task_weighted_grad` forms ``J^T w`` from the
    factors: ``X^T (sum_t w_t D_t)`` for the dense uses.
    """
    traced = _Traced(fun, params, args)
    leaves, n = traced.leaves, traced.n
    plan = _analyse(traced.closed, n, None)
    zeros = traced.perturbation_zeros(plan)
    fallback = [i for i in range(n) if i not in plan.structural]

    def run(pert, fb):
        return traced.run(plan, pert, traced.with_fallback(fallback, fb))

    outs, vjp_fn, captured = jax.vjp(run, zeros, [leaves[i] for i in fallback], has_aux=True)
    out = jax.tree_util.tree_unflatten(traced.out_def, outs)

    def pullback(cotangents, gramian=True):
        cots = traced.out_def.flatten_up_to(cotangents)
        m = cots[0].shape[0] if cots else 0
        if m == 0 or any(c.shape[:1] != (m,) for c in cots):
            raise ValueError("The cotangents need one shared, non-empty leading axis m.")
        deltas, fb_rows = jax.vmap(vjp_fn)(cots)
        acc = accumulation_dtype_of(*cots)
        G = jnp.zeros((m, m), acc) if gramian else None
        ghost, rows = {}, {}
        for k, p in plan.dense.items():
            d_in = captured[k].shape[-1]
            X = captured[k].reshape(-1, d_in).astype(acc)
            D = deltas[k].reshape(m, X.shape[0], -1).astype(acc)
            R, d_out = X.shape[0], D.shape[-1]
            ghost_cost = R * R * d_in + m * R * R * d_out + m * m * R * d_out
            rows_cost = m * R * d_in * d_out + m * m * d_in * d_out
            # Both forms as plain matrix products over (R, m * d_out): einsums with the task axis
            # in the middle run at a fraction of the GEMM speed on CPU.
            Dr = jnp.swapaxes(D, 0, 1).reshape(R, m * d_out)
            if gramian and ghost_cost >= rows_cost:
                XtD = jnp.matmul(X.T, Dr, out_sharding=whole(X))
                rows[p] = jnp.swapaxes(XtD.reshape(d_in, m, d_out), 0, 1)
            else:
                ghost[p] = (X, D)
                if gramian:
                    # With the rows sharded over devices (data parallel), X and D are gathered
                    # whole for G; J^T w contracts the local ones.
                    Xw, Dw, Drw = replicated((X, D, Dr))
                    KD = jnp.swapaxes(((Xw @ Xw.T) @ Drw).reshape(R, m, d_out), 0, 1)
                    G = G + Dw.reshape(m, -1) @ KD.reshape(m, -1).T
        for k, (p, eqn, pos) in plan.local.items():
            rows[p] = _op_vjp_rows(eqn, pos, captured[k], deltas[k])
        rows.update(zip(fallback, fb_rows))
        rows = {p: replicated(r.reshape(m, -1).astype(acc)) for p, r in rows.items()}
        if gramian:
            for r in rows.values():
                G = G + r @ r.T
        return G, LayerwiseFactors(ghost, rows, traced.treedef, leaves)

    return out, pullback


def task_weighted_grad(weights: Float[Array, " m"], factors: LayerwiseFactors) -> PyTree:
    """``J^T w`` for every parameter from :func:`task_gramian_vjp`'s factors."""
    ghost, rows, treedef, leaves = factors
    out: list = [None] * len(leaves)
    for p, (X, D) in ghost.items():
        out[p] = jnp.matmul(
            X.T, jnp.tensordot(weights.astype(D.dtype), D, axes=1), out_sharding=whole(X)
        )
    for p, r in rows.items():
        out[p] = weights.astype(r.dtype) @ r
    out = [g.reshape(leaf.shape).astype(leaf.dtype) for g, leaf in zip(out, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _op_vjp_rows(eqn, pos, invals, deltas):
    """Rows ``c_t^T d out / d operand`` of one equation's operand at ``pos``, for stacked output
    cotangents (its own VJP, vmapped)."""
    params = eqn.primitive.get_bind_params(eqn.params)

    def f(w):
        args = list(invals)
        args[pos] = w
        return eqn.primitive.bind(*args, **params)

    _, vjp = jax.vjp(f, invals[pos])
    return jax.vmap(lambda d: vjp(d)[0])(deltas)


def layerwise_parts(fun, params, *args):
    """Losses, their Gramian and the factors for ``J^T w``, by :func:`task_gramian_vjp` with
    the unit cotangents of the (flattened) losses."""
    losses, pullback = task_gramian_vjp(fun, params, *args)
    if not isinstance(losses, jax.Array) or losses.size == 0:
        raise ValueError("method='layerwise' needs a non-empty array of losses.")
    m = losses.size
    basis = jnp.eye(m, dtype=losses.dtype).reshape((m, *losses.shape))
    G, factors = pullback(basis)
    return losses, G, factors

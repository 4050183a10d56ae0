"""The layerwise engine: the Gramian of m output cotangents' rows ``J_t = c_t^T d fun / d params``,
layer by layer, without forming J (few objectives, wide layers)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._spmd import replicated, vary, varying_axes, whole, whole_along
from .._tree import accumulation_dtype_of
from ._jaxpr import _analyse, _Traced


class LayerwiseFactors(NamedTuple):
    """What the layerwise engine keeps for ``J^T w``.

    Attributes:
        ghost: for the dense uses formed without their rows, ``param index -> (X, D)``.
        rows: the other parameters' rows ``param index -> (m, -1)``.
        treedef: the parameters' structure.
        leaves: the parameters' leaves.
        axis_name: the ``shard_map`` axis the ghost factors' rows are split over (their part
            of ``J^T w`` is summed over it), or ``None``.
    """

    ghost: dict
    rows: dict
    treedef: Any
    leaves: list
    axis_name: Hashable | None = None


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

    ``pullback(cotangents, axis_name=name)``, inside ``shard_map`` with the rows of the batch
    split over ``name`` and ``fun``'s output the local batch's (per-task means): ``G`` is the
    Gramian of the mean over the devices of their Jacobians, exactly, from the gathered X and D
    (scaled by 1 / devices) for the dense uses and the mean of the other rows, and the factors
    give that mean's ``J^T w``. Only activations, cotangents, the non-dense rows and the update
    cross the devices.
    """
    traced = _Traced(fun, params, args)
    leaves, n = traced.leaves, traced.n
    plan = _analyse(traced.closed, n, None)
    zeros = vary(traced.perturbation_zeros(plan), varying_axes(args))
    fallback = [i for i in range(n) if i not in plan.structural]

    def run(pert, fb):
        return traced.run(plan, pert, traced.with_fallback(fallback, fb))

    outs, vjp_fn, captured = jax.vjp(run, zeros, [leaves[i] for i in fallback], has_aux=True)
    out = jax.tree_util.tree_unflatten(traced.out_def, outs)

    def pullback(cotangents, gramian=True, axis_name=None):
        cots = traced.out_def.flatten_up_to(cotangents)
        m = cots[0].shape[0] if cots else 0
        if m == 0 or any(c.shape[:1] != (m,) for c in cots):
            raise ValueError("The cotangents need one shared, non-empty leading axis m.")
        deltas, fb_rows = jax.vmap(vjp_fn)(cots)
        acc = accumulation_dtype_of(*cots)
        devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
        if axis_name is not None:  # the mean of the devices' Jacobians: D / devices
            deltas = {k: d * jnp.asarray(1.0 / devices, d.dtype) for k, d in deltas.items()}

        G = jnp.zeros((m, m), acc)
        ghost, rows = {}, {}
        for k, p in plan.dense.items():
            d_in = plan.d_in[k]
            X = captured[k].reshape(-1, d_in).astype(acc)
            D = deltas[k].reshape(m, X.shape[0], -1).astype(acc)
            R, d_out = X.shape[0], D.shape[-1]
            ghost_cost = R * R * d_in + m * R * R * d_out + m * m * R * d_out
            rows_cost = m * R * d_in * d_out + m * m * d_in * d_out
            # Both forms as plain matrix products over (R, m * d_out): einsums with the task axis
            # in the middle run at a fraction of the GEMM speed on CPU.
            Dr = jnp.swapaxes(D, 0, 1).reshape(R, m * d_out)
            # Across devices, the rows' all-reduce (m d_in d_out) against the gather of X and D
            # (R d_in + R m d_out over all the devices): the cheaper crossing decides.
            gathered = R * devices * (d_in + m * d_out) if axis_name is not None else 0
            if gramian and (ghost_cost >= rows_cost or gathered >= m * d_in * d_out):
                XtD = jnp.matmul(X.T, Dr, out_sharding=whole(X))
                if axis_name is not None:
                    XtD = jax.lax.psum(XtD, axis_name)  # D already carries 1 / devices
                rows[p] = jnp.swapaxes(XtD.reshape(d_in, m, d_out), 0, 1)
            else:
                ghost[p] = (X, D)
                if gramian:
                    # With the rows sharded over devices (data parallel), X and D are gathered
                    # whole for G; J^T w contracts the local ones.
                    Xw, Dw = whole_along(X, 0, axis_name), whole_along(D, 1, axis_name)
                    Drw = whole_along(Dr, 0, axis_name)
                    Rw = Xw.shape[0]
                    KD = jnp.swapaxes(((Xw @ Xw.T) @ Drw).reshape(Rw, m, d_out), 0, 1)
                    G = G + Dw.reshape(m, -1) @ KD.reshape(m, -1).T
        local_rows = {}
        for k, (p, eqn, pos) in plan.local.items():
            local_rows[p] = _op_vjp_rows(eqn, pos, captured[k], deltas[k])
        if axis_name is not None:  # the fallback rows came from the unscaled cotangents
            fb_rows = [jax.lax.pmean(r, axis_name) for r in fb_rows]
            local_rows = {p: jax.lax.psum(r, axis_name) for p, r in local_rows.items()}
        rows.update(local_rows)
        rows.update(zip(fallback, fb_rows))
        rows = {p: replicated(r.reshape(m, -1).astype(acc)) for p, r in rows.items()}
        if gramian:
            for r in rows.values():
                G = G + r @ r.T
        return (G if gramian else None), LayerwiseFactors(
            ghost, rows, traced.treedef, leaves, axis_name
        )

    return out, pullback


def task_weighted_grad(weights: Float[Array, " m"], factors: LayerwiseFactors) -> PyTree:
    """``J^T w`` for every parameter from :func:`task_gramian_vjp`'s factors."""
    ghost, rows, treedef, leaves, axis_name = factors
    out: list = [None] * len(leaves)
    for p, (X, D) in ghost.items():
        out[p] = jnp.matmul(
            X.T, jnp.tensordot(weights.astype(D.dtype), D, axes=1), out_sharding=whole(X)
        )
        if axis_name is not None:
            out[p] = jax.lax.psum(out[p], axis_name)
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

"""The per-sample engine: Gramians without per-sample gradients (the "ghost" trick), for
instance-wise risk minimisation on an ordinary JAX function ``losses(params, batch) -> (B,)``.

A dense use ``y = x @ W`` (x: ``(B, ..., d_in)``; a W of higher rank contracted on its leading
axes is read as a ``d_in x d_out`` matrix) gives sample b the gradient
``X_b^T D_b`` (``X_b``: its rows of x, ``D_b``: the matching rows of the cotangent of y), so
``<g_b, g_c> = sum (X_b X_c^T) * (D_b D_c^T)``: the Gramian needs only activations and output
cotangents, which one backward pass of ``sum(losses)`` gives for every sample at once (the
samples are independent). A bias added after a broadcast (or a reshape adding size-1 axes) gives
``g_b = sum_l D_bl``, a scale multiplying a per-sample ``u`` (layer norm's) ``sum_l D_bl u_bl``.
A convolution kernel or an embedding table gets sample b's gradient from its own op's VJP on
sample b's captured operands and cotangent (vmapped; no pass through the rest of the network).
All are found by reading the function's jaxpr (a parameter cast to another float dtype counts
as the parameter; the activation, convolution input, embedding indices or per-sample operand
must be computed from the batch arguments: a constant whose leading size happens to be B is no
batch); every other parameter (used twice, passed through a jitted function as is,
...) falls back to per-sample gradients of that parameter only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from .._spmd import vary, varying_axes, whole, whole_along
from .._tree import accumulation_dtype
from ._jaxpr import _analyse, _Traced


class PerSampleFactors(NamedTuple):
    """What the per-sample engine captured, for ``J^T w`` without a second backward pass.

    Attributes:
        plan: the analysed uses of the parameters (dense, bias, local).
        captured: the dense uses' inputs ``X`` and the local equations' operands.
        deltas: the cotangents ``D`` at those equations' outputs, ``(T, ...)``.
        row_grads: per-sample gradients of the bias and local parameters, ``(B T, -1)``.
        fallback_grads: per-sample gradients of the other parameters, ``(B T, *shape)``.
        treedef: the parameters' structure.
        leaves: the parameters' leaves.
        shape: ``(B, T)``.
        fallback: the key paths (``jax.tree_util.keystr``) of the parameters that fell back to
            per-sample gradients (used twice, inside a loop, ...): read it to see whether a
            model stays on the fast path.
    """

    plan: Any
    captured: dict
    deltas: dict
    row_grads: dict
    fallback_grads: dict
    treedef: Any
    leaves: list
    shape: tuple
    fallback: tuple = ()


def per_sample_gramian_parts(
    fun: Callable, params: PyTree, *args: Any, axis_name: Hashable | None = None
) -> tuple[Float[Array, "..."], Float[Array, "m m"], PerSampleFactors]:
    """``(losses, G, factors)`` for ``fun(params, *args) -> (B,)`` losses, one per independent
    sample, or ``(B, T, ...)`` (T losses per sample, instance-wise multi-task: m = B T rows in
    the order of ``ravel(losses)``): the per-sample Gramian and, for the weighted update without
    a second backward pass, the captured factors and the fallback per-sample gradients. With T
    losses per sample one vmapped backward pass carries T cotangents (loss t of every sample).

    ``axis_name`` (inside ``shard_map``, the batch split over that mesh axis): ``G`` is the
    global batch's (device after device, ``D B`` samples), from the factors gathered over the
    axis (activations and output cotangents, never per-sample gradients of dense layers);
    ``losses`` and ``factors`` stay local."""
    # Under shard_map the parameters are made to vary like the batch: derivatives of local
    # losses then stay local (JAX would otherwise sum them over the devices), and are summed
    # once, explicitly, where the global update is formed.
    axes = varying_axes(args) if axis_name is not None else ()
    params = vary(params, axes)
    traced = _Traced(fun, params, args)
    closed, leaves, n = traced.closed, traced.leaves, traced.n
    if len(closed.out_avals) != 1 or closed.out_avals[0].ndim < 1:
        raise ValueError(
            "method='per_sample' needs one array of losses of shape (B,) or (B, T), one row per "
            f"sample; got {[a.shape for a in closed.out_avals]}. Use method='jacobian' or "
            "'columns'."
        )
    shape = closed.out_avals[0].shape
    B, T = shape[0], math.prod(shape[1:])
    m = B * T
    if m == 0:
        raise ValueError("The function returned no losses (m = 0).")
    plan = _analyse(closed, n, B)
    zeros = vary(traced.perturbation_zeros(plan), axes)
    fallback = [i for i in range(n) if i not in plan.structural]

    def run(pert):
        (losses,), captured = traced.run(plan, pert, leaves)
        return losses, captured

    losses, vjp_fn, captured = jax.vjp(run, zeros, has_aux=True)
    if losses.ndim == 1:
        (deltas,) = vjp_fn(jnp.ones_like(losses))
        deltas = {k: d[None] for k, d in deltas.items()}  # every cotangent gets a T axis
    else:  # cotangent t: ones on loss t of every sample
        basis = jnp.eye(T, dtype=losses.dtype).reshape((T, 1, *shape[1:]))
        (deltas,) = jax.vmap(vjp_fn)(jnp.broadcast_to(basis, (T, *shape)))
    acc = accumulation_dtype(losses.dtype)

    def rows(g, B=B):  # (T, B, ...) -> (B T, -1), sample-major like ravel(losses)
        return jnp.swapaxes(g.reshape(T, B, -1), 0, 1).reshape(B * T, -1).astype(acc)

    # With the batch sharded over devices (jit with NamedSharding, or shard_map's axis_name),
    # the factors are gathered whole (activations and cotangents, not per-sample gradients of
    # dense layers) and every device forms the same global Gramian.
    Bg = B if axis_name is None else B * jax.lax.axis_size(axis_name)
    mg = Bg * T
    G = jnp.zeros((mg, mg), acc)
    for k in (*plan.dense, *plan.dense_t):
        X, D = _dense_factors(plan, captured, deltas, k, B, T)
        X, D = whole_along(X.astype(acc), 0, axis_name), whole_along(D.astype(acc), 1, axis_name)
        L = X.shape[1]
        if L * L > X.shape[2] * D.shape[-1]:
            g = rows(jnp.einsum("bld,tble->tbde", X, D), Bg)
            G = G + g @ g.T
        elif T == 1:
            G = G + jnp.einsum("bld,cmd,ble,cme->bc", X, X, D[0], D[0], optimize=True)
        else:
            GT = jnp.einsum("bld,cmd,tble,ucme->btcu", X, X, D, D, optimize=True)
            G = G + GT.reshape(mg, mg)
    row_grads = {}
    for k, (p, keep) in plan.bias.items():  # sum the cotangent over the broadcast axes
        D = deltas[k]
        row_grads[p] = rows(jnp.sum(D, axis=_summed_axes(D, keep)))
    for k, (p, keep, _) in plan.scale.items():  # ... times the other operand
        D = deltas[k]
        row_grads[p] = rows(jnp.sum(D * captured[k][None], axis=_summed_axes(D, keep)))
    for k, (p, eqn, pos) in plan.local.items():
        g = jax.vmap(
            lambda d, eqn=eqn, pos=pos, k=k: _local_per_sample(eqn, pos, captured[k], d, B)
        )(deltas[k])
        row_grads[p] = rows(g)
    for g in row_grads.values():
        g = whole_along(g, 0, axis_name)
        G = G + g @ g.T
    fb_grads = {}
    if fallback:

        def losses_of(fb):
            return traced.run(plan, {}, traced.with_fallback(fallback, fb))[0][0]

        jac = jax.jacrev(losses_of)([leaves[i] for i in fallback])
        for i, Ji in zip(fallback, jac):
            Ji = Ji.reshape(m, *leaves[i].shape)
            g = whole_along(Ji.reshape(m, -1).astype(acc), 0, axis_name)
            fb_grads[i] = Ji
            G = G + g @ g.T
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    factors = PerSampleFactors(
        plan,
        captured,
        deltas,
        row_grads,
        fb_grads,
        traced.treedef,
        leaves,
        (B, T),
        tuple(paths[i] for i in fallback),
    )
    return losses, G, factors


def local_weights(weights: Array, shape: tuple, axis_name: Hashable) -> Array:
    """This device's block of the global batch's weights (``shape``: the local losses'),
    inside ``shard_map``."""
    B = shape[0]
    w = weights.reshape(-1, *shape[1:])
    start = jax.lax.axis_index(axis_name) * B
    return jax.lax.dynamic_slice_in_dim(w, start, B, axis=0)


def _dense_factors(plan, captured, deltas, k, B, T):
    """``X`` ``(B, L, d_in)`` and ``D`` ``(T, B, L, d_out)`` of a dense use: ``y = x @ W``, or
    ``y = W @ x^T`` (``plan.dense_t``: the cotangent has the out-features first, ``(T, d_out,
    B, ...)``, and sample b's gradient is the transpose, ``D_b^T X_b``)."""
    d_in = plan.d_in[k] if k in plan.dense else captured[k].shape[-1]
    X = captured[k].reshape(B, -1, d_in)
    D = deltas[k]
    if k in plan.dense_t:
        D = jnp.moveaxis(D, 1, -1)
    return X, D.reshape(T, B, X.shape[1], -1)


def _summed_axes(D, keep):
    """The axes of a cotangent ``(T, B, ...)`` not holding the leaf's (``keep``: the output's)."""
    return tuple(a + 1 for a in range(1, D.ndim - 1) if a not in keep)


def _local_per_sample(eqn, pos, invals, delta, B):
    """Per-sample gradients of the parameter at position ``pos`` of ``eqn``: the op's VJP on
    each sample's slice (vmapped), given its captured operands and output cotangent."""
    batched = [i != pos and jnp.ndim(v) > 0 and v.shape[0] == B for i, v in enumerate(invals)]
    params = eqn.primitive.get_bind_params(eqn.params)
    sliced = [v.reshape(B, 1, *v.shape[1:]) if b else None for v, b in zip(invals, batched)]

    def one(slices, d):
        def f(w):
            args = [s if b else v for s, v, b in zip(slices, invals, batched)]
            args[pos] = w
            return eqn.primitive.bind(*args, **params)

        _, vjp = jax.vjp(f, invals[pos])
        return vjp(d)[0]

    in_axes = ([0 if b else None for b in batched], 0)
    return jax.vmap(one, in_axes=in_axes)(sliced, delta.reshape(B, 1, *delta.shape[1:]))


def weighted_grad_from_factors(weights: Float[Array, " m"], factors: PerSampleFactors) -> PyTree:
    """``sum_b w_b g_b`` for every parameter from the captured factors (no second backward)."""
    plan, captured, deltas, row_grads, fb_grads, treedef, leaves, (B, T) = factors[:8]
    out = [None] * len(leaves)
    for k, p in (*plan.dense.items(), *plan.dense_t.items()):
        X, D = _dense_factors(plan, captured, deltas, k, B, T)
        acc = accumulation_dtype(X.dtype)
        W = weights.reshape(B, T).astype(acc)
        # The batch contraction of sharded factors: local sums and one all-reduce.
        if T == 1:
            g = jnp.einsum("b,bld,ble->de", W[:, 0], X, D[0], out_sharding=whole(X))
        else:
            g = jnp.einsum("bt,bld,tble->de", W, X, D, out_sharding=whole(X))
        g = g.T if k in plan.dense_t else g
        out[p] = g.reshape(leaves[p].shape).astype(leaves[p].dtype)
    for p, g in row_grads.items():
        wg = jnp.matmul(weights.astype(g.dtype), g, out_sharding=whole(g))
        out[p] = wg.reshape(leaves[p].shape).astype(leaves[p].dtype)
    for p, J in fb_grads.items():
        wJ = jnp.einsum("b,b...->...", weights.astype(J.dtype), J, out_sharding=whole(J))
        out[p] = wJ.astype(leaves[p].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)

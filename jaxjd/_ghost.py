"""Per-sample Gramians without per-sample gradients (the "ghost" trick), for instance-wise risk
minimisation on an ordinary JAX function ``losses(params, batch) -> (B,)``.

A dense use ``y = x @ W`` (x: ``(B, ..., d_in)``) gives sample b the gradient
``X_b^T D_b`` (``X_b``: its rows of x, ``D_b``: the matching rows of the cotangent of y), so
``<g_b, g_c> = sum (X_b X_c^T) * (D_b D_c^T)``: the Gramian needs only activations and output
cotangents, which one backward pass of ``sum(losses)`` gives for every sample at once (the
samples are independent). A bias added after a broadcast gives ``g_b = sum_l D_bl``. A
convolution kernel or an embedding table gets sample b's gradient from its own op's VJP on
sample b's captured operands and cotangent (vmapped; no pass through the rest of the network).
All are found by reading the function's jaxpr; every other parameter (used twice, a layer-norm
scale, ...) falls back to per-sample gradients of that parameter only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax.extend import core as jcore


@dataclass
class _Plan:
    dense: dict = field(default_factory=dict)  # eqn id -> param index
    bias: dict = field(default_factory=dict)  # add-eqn id -> (param index, broadcast dims)
    local: dict = field(default_factory=dict)  # eqn id -> (param index, eqn, param position)
    structural: set = field(default_factory=set)


def _is_var(v):
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def _is_local(eqn, pos, batch_size):
    """A convolution kernel or an embedding table: sample b's gradient is the op's own VJP on
    sample b's slice of the other operands and of the output cotangent (batch axis 0 in, 0 out,
    and no operand shape recorded in the op's parameters)."""
    name = eqn.primitive.name
    out = eqn.outvars[0].aval
    if out.ndim == 0 or out.shape[0] != batch_size:
        return False
    others = [v.aval for i, v in enumerate(eqn.invars) if i != pos]
    if name == "conv_general_dilated" and pos == 1:
        dn = eqn.params["dimension_numbers"]
        return (
            dn.lhs_spec[0] == 0
            and dn.out_spec[0] == 0
            and eqn.params["batch_group_count"] == 1
            and others[0].shape[0] == batch_size
        )
    if name == "gather" and pos == 0:
        dn = eqn.params["dimension_numbers"]
        return (
            not dn.operand_batching_dims
            and others[0].ndim >= 1
            and others[0].shape[0] == batch_size
            and 0 not in dn.offset_dims
        )
    return False


def _analyse(closed, n_params, batch_size):
    """Which parameters can be treated structurally, and at which equations."""
    uses = {}  # param index -> list of (kind, eqn id, extra)
    bias_of = {}  # broadcast output var -> (param index, broadcast eqn id, dims)

    visits = {}  # eqn id -> how many times the evaluation reaches it (a jitted function called
    # twice shares its inner equations: capturing at them would mix the calls)

    def walk(jaxpr, env):
        for eqn in jaxpr.eqns:
            visits[id(eqn)] = visits.get(id(eqn), 0) + 1
            ins = [env.get(v) if _is_var(v) else None for v in eqn.invars]
            name = eqn.primitive.name
            if name in ("jit", "pjit") and "jaxpr" in eqn.params:
                inner = eqn.params["jaxpr"].jaxpr
                walk(inner, {iv: p for iv, p in zip(inner.invars, ins) if p is not None})
                continue
            for pos, p in enumerate(ins):
                if p is None:
                    continue
                kind = "other"
                if name == "dot_general" and pos == 1:
                    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
                    if (
                        not lb
                        and not rb
                        and rhs.ndim == 2
                        and tuple(rc) == (0,)
                        and tuple(lc) == (lhs.ndim - 1,)
                        and lhs.ndim >= 2
                        and lhs.shape[0] == batch_size
                    ):
                        kind = "dense"
                elif _is_local(eqn, pos, batch_size):
                    kind = "local"
                elif name == "broadcast_in_dim":
                    dims = tuple(eqn.params["broadcast_dimensions"])
                    out = eqn.outvars[0].aval
                    if 0 not in dims and all(
                        eqn.invars[0].aval.shape[i] == out.shape[d] for i, d in enumerate(dims)
                    ):
                        kind = "broadcast"
                        bias_of[eqn.outvars[0]] = (p, dims)
                uses.setdefault(p, []).append((kind, id(eqn), (eqn, pos)))
            if name == "add":
                for pos, v in enumerate(eqn.invars):
                    if _is_var(v) and v in bias_of:
                        other = eqn.invars[1 - pos].aval
                        p, dims = bias_of[v]
                        if other.ndim >= 1 and other.shape == eqn.outvars[0].aval.shape:
                            uses.setdefault(p, []).append(("bias_add", id(eqn), dims))
                        else:
                            uses.setdefault(p, []).append(("other", id(eqn)))
                continue
            for v in eqn.invars:  # a broadcast bias used by anything but one add
                if _is_var(v) and v in bias_of:
                    uses.setdefault(bias_of[v][0], []).append(("other", id(eqn)))

    walk(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars[:n_params])})
    plan = _Plan()
    for p, us in uses.items():
        if any(visits[u[1]] > 1 for u in us):
            continue  # falls back: its equation runs more than once
        kinds = [u[0] for u in us]
        if kinds == ["dense"]:
            plan.dense[us[0][1]] = p
            plan.structural.add(p)
        elif kinds == ["local"]:
            plan.local[us[0][1]] = (p, *us[0][2])
            plan.structural.add(p)
        elif kinds == ["broadcast", "bias_add"]:
            plan.bias[us[1][1]] = (p, us[1][2])
            plan.structural.add(p)
    return plan


def _evaluate(jaxpr, consts, args, hook):
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in ("jit", "pjit") and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]
            outvals = _evaluate(inner.jaxpr, inner.consts, invals, hook)
        else:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outvals = list(ans) if eqn.primitive.multiple_results else [ans]
            outvals = hook(eqn, invals, outvals)
        for v, val in zip(eqn.outvars, outvals):
            if not isinstance(v, jcore.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def per_sample_gramian_parts(fun: Callable, params, *args):
    """``(losses, G, factors)`` for ``fun(params, *args) -> (B,)`` losses, one per independent
    sample: the per-sample Gramian and, for the weighted update without a second backward pass,
    the captured factors and the fallback per-sample gradients."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    n = len(leaves)
    rest, rest_def = jax.tree_util.tree_flatten(args)

    def flat_fun(*flat):
        p = jax.tree_util.tree_unflatten(treedef, flat[:n])
        return fun(p, *jax.tree_util.tree_unflatten(rest_def, flat[n:]))

    closed = jax.make_jaxpr(flat_fun)(*leaves, *rest)
    if len(closed.out_avals) != 1 or closed.out_avals[0].ndim != 1:
        raise ValueError(
            "method='per_sample' needs losses of shape (B,), one per sample; got "
            f"{[a.shape for a in closed.out_avals]}. Use method='jacobian' or 'columns'."
        )
    B = closed.out_avals[0].shape[0]
    if B == 0:
        raise ValueError("The function returned no losses (m = 0).")
    plan = _analyse(closed, n, B)
    flat_inputs = [*leaves, *rest]

    def run(perturbations, param_leaves):
        captured = {}

        def hook(eqn, invals, outvals):
            k = id(eqn)
            if k in plan.dense:
                captured[k] = invals[0]
            if k in plan.local:
                captured[k] = tuple(invals)
            if k in perturbations:
                return [outvals[0] + perturbations[k]]
            return outvals

        ins = [*param_leaves, *flat_inputs[n:]]
        (losses,) = _evaluate(closed.jaxpr, closed.consts, ins, hook)
        return losses, captured

    # Shapes of the perturbed outputs: one abstract run.
    def probe():
        shapes = {}

        def hook(eqn, invals, outvals):
            if id(eqn) in plan.dense or id(eqn) in plan.bias or id(eqn) in plan.local:
                shapes[id(eqn)] = jax.ShapeDtypeStruct(outvals[0].shape, outvals[0].dtype)
            return outvals

        jax.eval_shape(
            lambda *a: _evaluate(closed.jaxpr, closed.consts, list(a), hook), *flat_inputs
        )
        return shapes

    shapes = probe()
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    fallback = [i for i in range(n) if i not in plan.structural]
    losses, vjp_fn, captured = jax.vjp(lambda pert: run(pert, leaves), zeros, has_aux=True)
    (deltas,) = vjp_fn(jnp.ones_like(losses))
    acc = jnp.promote_types(losses.dtype, jnp.float32)
    G = jnp.zeros((B, B), acc)
    for k in plan.dense:
        X = captured[k].reshape(B, -1, captured[k].shape[-1]).astype(acc)
        D = deltas[k].reshape(B, -1, deltas[k].shape[-1]).astype(acc)
        L = X.shape[1]
        if L * L <= X.shape[2] * D.shape[2]:
            G = G + jnp.einsum("bld,cmd,ble,cme->bc", X, X, D, D, optimize=True)
        else:
            g = jnp.einsum("bld,ble->bde", X, D).reshape(B, -1)
            G = G + g @ g.T
    row_grads = {}
    for k, (p, dims) in plan.bias.items():
        D = deltas[k]
        axes = tuple(a for a in range(1, D.ndim) if a not in dims)
        g = jnp.sum(D, axis=axes).reshape(B, -1).astype(acc)
        row_grads[p] = g
        G = G + g @ g.T
    for k, (p, eqn, pos) in plan.local.items():
        g = _local_per_sample(eqn, pos, captured[k], deltas[k], B)
        row_grads[p] = g.reshape(B, -1).astype(acc)
        G = G + row_grads[p] @ row_grads[p].T
    fb_grads = {}
    if fallback:

        def losses_of(fb):
            ps = list(leaves)
            for i, leaf in zip(fallback, fb):
                ps[i] = leaf
            return run({}, ps)[0]

        jac = jax.jacrev(losses_of)([leaves[i] for i in fallback])
        for i, Ji in zip(fallback, jac):
            g = Ji.reshape(B, -1).astype(acc)
            fb_grads[i] = Ji
            G = G + g @ g.T
    factors = (plan, captured, deltas, row_grads, fb_grads, treedef, leaves)
    return losses, G, factors


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


def weighted_grad_from_factors(weights, factors):
    """``sum_b w_b g_b`` for every parameter from the captured factors (no second backward)."""
    plan, captured, deltas, row_grads, fb_grads, treedef, leaves = factors
    out = [None] * len(leaves)
    for k, p in plan.dense.items():
        X = captured[k].reshape(weights.shape[0], -1, captured[k].shape[-1])
        D = deltas[k].reshape(weights.shape[0], -1, deltas[k].shape[-1])
        acc = jnp.promote_types(X.dtype, jnp.float32)
        out[p] = jnp.einsum("b,bld,ble->de", weights.astype(acc), X, D).astype(leaves[p].dtype)
    for p, g in row_grads.items():
        out[p] = (weights.astype(g.dtype) @ g).reshape(leaves[p].shape).astype(leaves[p].dtype)
    for p, J in fb_grads.items():
        out[p] = jnp.tensordot(weights.astype(J.dtype), J, axes=1).astype(leaves[p].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)

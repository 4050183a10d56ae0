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

import math
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
    """Per sample (``batch_size`` given): a convolution kernel or an embedding table, whose
    sample-b gradient is the op's own VJP on sample b's slice of the other operands and of the
    output cotangent (batch axis 0 in, 0 out, and no operand shape recorded in the op's
    parameters). Per task (``batch_size=None``): any single-output primitive without an inner
    jaxpr and with a floating output, whose rows are its VJP on the stacked cotangents."""
    name = eqn.primitive.name
    out = eqn.outvars[0].aval
    if batch_size is None:
        return (
            not eqn.primitive.multiple_results
            and jnp.issubdtype(out.dtype, jnp.inexact)
            and not any(
                isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)) for v in eqn.params.values()
            )
        )
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
                        and (
                            lhs.ndim >= 2 and lhs.shape[0] == batch_size
                            if batch_size is not None
                            else jnp.issubdtype(lhs.dtype, jnp.inexact)
                        )
                    ):
                        kind = "dense"
                elif _is_local(eqn, pos, batch_size):
                    kind = "local"
                elif name == "broadcast_in_dim" and batch_size is not None:
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


class _Traced:
    """``fun(params, *args)`` as a jaxpr over the flat parameter leaves and inputs, evaluated with
    a hook that captures the operands of chosen equations and perturbs their outputs."""

    def __init__(self, fun, params, args):
        self.leaves, self.treedef = jax.tree_util.tree_flatten(params)
        self.n = n = len(self.leaves)
        self.rest, rest_def = jax.tree_util.tree_flatten(args)
        out_defs = []

        def flat_fun(*flat):
            p = jax.tree_util.tree_unflatten(self.treedef, flat[:n])
            out = fun(p, *jax.tree_util.tree_unflatten(rest_def, flat[n:]))
            outs, out_def = jax.tree_util.tree_flatten(out)
            out_defs.append(out_def)
            return outs

        self.closed = jax.make_jaxpr(flat_fun)(*self.leaves, *self.rest)
        self.out_def = out_defs[0]

    def run(self, plan, perturbations, param_leaves):
        """The outputs (flat) and the captured operands, ``perturbations`` added to the outputs
        of the equations they are keyed by."""
        captured = {}

        def hook(eqn, invals, outvals):
            k = id(eqn)
            if k in plan.dense:
                captured[k] = invals[0]
            if k in plan.local:
                captured[k] = tuple(invals)
            if k in perturbations:
                return [outvals[0] + perturbations[k], *outvals[1:]]
            return outvals

        ins = [*param_leaves, *self.rest]
        return _evaluate(self.closed.jaxpr, self.closed.consts, ins, hook), captured

    def perturbation_zeros(self, plan):
        """Zeros shaped like the output of every equation the plan treats structurally."""
        keys = {*plan.dense, *plan.bias, *plan.local}
        shapes = {}

        def hook(eqn, invals, outvals):
            if id(eqn) in keys:
                shapes[id(eqn)] = jax.ShapeDtypeStruct(outvals[0].shape, outvals[0].dtype)
            return outvals

        jax.eval_shape(
            lambda *a: _evaluate(self.closed.jaxpr, self.closed.consts, list(a), hook),
            *self.leaves,
            *self.rest,
        )
        return {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}

    def with_fallback(self, fallback, values):
        ps = list(self.leaves)
        for i, leaf in zip(fallback, values):
            ps[i] = leaf
        return ps


def per_sample_gramian_parts(fun: Callable, params, *args):
    """``(losses, G, factors)`` for ``fun(params, *args) -> (B,)`` losses, one per independent
    sample, or ``(B, T, ...)`` (T losses per sample, instance-wise multi-task: m = B T rows in
    the order of ``ravel(losses)``): the per-sample Gramian and, for the weighted update without
    a second backward pass, the captured factors and the fallback per-sample gradients. With T
    losses per sample one vmapped backward pass carries T cotangents (loss t of every sample)."""
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
    zeros = traced.perturbation_zeros(plan)
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
    acc = jnp.promote_types(losses.dtype, jnp.float32)

    def rows(g):  # (T, B, ...) -> (B T, -1), sample-major like ravel(losses)
        return jnp.swapaxes(g.reshape(T, B, -1), 0, 1).reshape(m, -1).astype(acc)

    G = jnp.zeros((m, m), acc)
    for k in plan.dense:
        X = captured[k].reshape(B, -1, captured[k].shape[-1]).astype(acc)
        D = deltas[k].reshape(T, B, X.shape[1], -1).astype(acc)
        L = X.shape[1]
        if L * L > X.shape[2] * D.shape[-1]:
            g = rows(jnp.einsum("bld,tble->tbde", X, D))
            G = G + g @ g.T
        elif T == 1:
            G = G + jnp.einsum("bld,cmd,ble,cme->bc", X, X, D[0], D[0], optimize=True)
        else:
            GT = jnp.einsum("bld,cmd,tble,ucme->btcu", X, X, D, D, optimize=True)
            G = G + GT.reshape(m, m)
    row_grads = {}
    for k, (p, dims) in plan.bias.items():
        D = deltas[k]
        axes = tuple(a + 1 for a in range(1, D.ndim - 1) if a not in dims)
        row_grads[p] = rows(jnp.sum(D, axis=axes))
    for k, (p, eqn, pos) in plan.local.items():
        g = jax.vmap(
            lambda d, eqn=eqn, pos=pos, k=k: _local_per_sample(eqn, pos, captured[k], d, B)
        )(deltas[k])
        row_grads[p] = rows(g)
    for g in row_grads.values():
        G = G + g @ g.T
    fb_grads = {}
    if fallback:

        def losses_of(fb):
            return traced.run(plan, {}, traced.with_fallback(fallback, fb))[0][0]

        jac = jax.jacrev(losses_of)([leaves[i] for i in fallback])
        for i, Ji in zip(fallback, jac):
            Ji = Ji.reshape(m, *leaves[i].shape)
            g = Ji.reshape(m, -1).astype(acc)
            fb_grads[i] = Ji
            G = G + g @ g.T
    factors = (plan, captured, deltas, row_grads, fb_grads, traced.treedef, leaves, (B, T))
    return losses, G, factors


def task_gramian_vjp(fun: Callable, params, *args):
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
        acc = jnp.promote_types(jnp.result_type(*cots), jnp.float32)
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
                rows[p] = jnp.swapaxes((X.T @ Dr).reshape(d_in, m, d_out), 0, 1)
            else:
                ghost[p] = (X, D)
                if gramian:
                    KD = jnp.swapaxes(((X @ X.T) @ Dr).reshape(R, m, d_out), 0, 1)
                    G = G + D.reshape(m, -1) @ KD.reshape(m, -1).T
        for k, (p, eqn, pos) in plan.local.items():
            rows[p] = _op_vjp_rows(eqn, pos, captured[k], deltas[k])
        rows.update(zip(fallback, fb_rows))
        rows = {p: r.reshape(m, -1).astype(acc) for p, r in rows.items()}
        if gramian:
            for r in rows.values():
                G = G + r @ r.T
        return G, (ghost, rows, traced.treedef, leaves)

    return out, pullback


def task_weighted_grad(weights, factors):
    """``J^T w`` for every parameter from :func:`task_gramian_vjp`'s factors."""
    ghost, rows, treedef, leaves = factors
    out = [None] * len(leaves)
    for p, (X, D) in ghost.items():
        out[p] = X.T @ jnp.tensordot(weights.astype(D.dtype), D, axes=1)
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
    plan, captured, deltas, row_grads, fb_grads, treedef, leaves, (B, T) = factors
    out = [None] * len(leaves)
    for k, p in plan.dense.items():
        X = captured[k].reshape(B, -1, captured[k].shape[-1])
        D = deltas[k].reshape(T, B, X.shape[1], -1)
        acc = jnp.promote_types(X.dtype, jnp.float32)
        W = weights.reshape(B, T).astype(acc)
        if T == 1:
            g = jnp.einsum("b,bld,ble->de", W[:, 0], X, D[0])
        else:
            g = jnp.einsum("bt,bld,tble->de", W, X, D)
        out[p] = g.astype(leaves[p].dtype)
    for p, g in row_grads.items():
        out[p] = (weights.astype(g.dtype) @ g).reshape(leaves[p].shape).astype(leaves[p].dtype)
    for p, J in fb_grads.items():
        out[p] = jnp.tensordot(weights.astype(J.dtype), J, axes=1).astype(leaves[p].dtype)
    return jax.tree_util.tree_unflatten(treedef, out)

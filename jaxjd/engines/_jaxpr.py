"""The shared jaxpr reader of the per-sample and layerwise engines: which parameters a function
uses in a dense product, a broadcast bias add or one other equation (``_analyse``), and an
interpreter that evaluates the jaxpr while capturing those equations' operands and perturbing
their outputs (``_Traced``), so that one VJP gives the cotangents at every layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax.extend import core as jcore


@dataclass
class _Plan:
    dense: dict = field(default_factory=dict)  # eqn id -> param index
    d_in: dict = field(default_factory=dict)  # dense eqn id -> W's contracted size
    # eqn id -> param index, for y = W @ x^T (W first, out-features first: equinox's Linear
    # under vmap); per-sample engine only
    dense_t: dict = field(default_factory=dict)
    bias: dict = field(default_factory=dict)  # add-eqn id -> (param index, the leaf's axes)
    # mul-eqn id -> (param index, the leaf's axes, the other operand's position); per sample
    scale: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)  # eqn id -> (param index, eqn, param position)
    structural: set = field(default_factory=set)


def _is_var(v):
    return isinstance(v, jcore.Var) and not isinstance(v, jcore.Literal)


def _is_local(eqn, pos, batch_size, is_batched):
    """Per sample (``batch_size`` given): a convolution kernel or an embedding table, whose
    sample-b gradient is the op's own VJP on sample b's slice of the other operands and of the
    output cotangent (batch axis 0 in, 0 out, and no operand shape recorded in the op's
    parameters). Per task (``batch_size=None``): any single-output primitive without an inner
    jaxpr and with a floating output, whose rows are its VJP on the stacked cotangents."""
    name = eqn.primitive.name
    if not eqn.outvars:  # a callback
        return False
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
            and is_batched(eqn.invars[0])
        )
    if name == "gather" and pos == 0:
        dn = eqn.params["dimension_numbers"]
        return (
            not dn.operand_batching_dims
            and others[0].ndim >= 1
            and others[0].shape[0] == batch_size
            and is_batched(eqn.invars[1])
            and 0 not in dn.offset_dims
        )
    return False


def _dense_kind(eqn, pos, batch_size, is_batched):
    """``"dense"`` for ``y = x @ W`` (the parameter W on the right, contracted on its leading
    axes with x's trailing ones: a Linear, or Flax's LinearGeneral and attention projections,
    W ``(in..., out...)`` read as a matrix; per sample, x batched on axis 0), ``"dense_t"`` for
    ``y = W @ x^T`` (W on the left, contracted on its second axis, x batched on axis 0:
    equinox's Linear under vmap; per sample only), else ``"other"``."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    if lb or rb:
        return "other"
    kc = len(rc)  # W (in..., out...) contracted on its leading axes with x's trailing ones
    if (
        pos == 1
        and 1 <= kc < rhs.ndim
        and tuple(rc) == tuple(range(kc))
        and tuple(lc) == tuple(range(lhs.ndim - kc, lhs.ndim))
    ):
        if batch_size is None:
            return "dense" if jnp.issubdtype(lhs.dtype, jnp.inexact) else "other"
        per_sample = lhs.ndim > kc and lhs.shape[0] == batch_size and is_batched(eqn.invars[0])
        return "dense" if per_sample else "other"
    if (
        pos == 0
        and batch_size is not None
        and lhs.ndim == 2
        and tuple(lc) == (1,)
        and rhs.ndim >= 2
        and tuple(rc) == (rhs.ndim - 1,)
        and rhs.shape[0] == batch_size
        and is_batched(eqn.invars[1])
    ):
        return "dense_t"
    return "other"


def _carry_axes(eqn, axes):
    """Where a broadcast parameter's axes (``axes[i]``: the axis of the operand holding the
    leaf's axis i, ``None`` for the leaf's size-1 axes) sit in the output of a
    ``broadcast_in_dim`` or of a ``reshape`` that only adds or drops size-1 axes; ``None`` for
    any other reshape."""
    src, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if eqn.primitive.name == "broadcast_in_dim":
        dims = eqn.params["broadcast_dimensions"]
        return tuple(None if a is None else int(dims[a]) for a in axes)
    if eqn.params.get("dimensions") is not None:
        return None
    big_in = [i for i, s in enumerate(src) if s != 1]
    big_out = [j for j, s in enumerate(out) if s != 1]
    if [src[i] for i in big_in] != [out[j] for j in big_out]:
        return None
    where = dict(zip(big_in, big_out))
    return tuple(None if a is None else where[a] for a in axes)


def _analyse(closed, n_params, batch_size):
    """Which parameters can be treated structurally, and at which equations."""
    uses = {}  # param index -> list of (kind, eqn id, extra)
    # a parameter broadcast (broadcast_in_dim, or a reshape adding size-1 axes: Flax's bias):
    # var -> (param index, the var's axis of each of the leaf's axes, None where size 1)
    bias_of = {}

    visits = {}  # eqn id -> how many times the evaluation reaches it (a jitted function called
    # twice shares its inner equations: capturing at them would mix the calls)

    # Per sample, the vars computed from the batch arguments: an activation, a convolution's
    # input or an embedding's indices must be one of them to be read per sample (a constant
    # whose leading size happens to equal B, such as the positions 0..L-1 with L = B, is not).
    batched = set(closed.jaxpr.invars[n_params:])

    def is_batched(v):
        return batch_size is None or (_is_var(v) and v in batched)

    def walk(jaxpr, env):
        for eqn in jaxpr.eqns:
            visits[id(eqn)] = visits.get(id(eqn), 0) + 1
            ins = [env.get(v) if _is_var(v) else None for v in eqn.invars]
            name = eqn.primitive.name
            out = eqn.outvars[0].aval if eqn.outvars else None  # (a callback has none)
            if name in ("jit", "pjit") and "jaxpr" in eqn.params:
                inner = eqn.params["jaxpr"].jaxpr
                for iv, v in zip(inner.invars, eqn.invars):
                    if _is_var(v) and v in bias_of:
                        bias_of[iv] = bias_of[v]
                    if _is_var(v) and v in batched:
                        batched.add(iv)
                inner_env = {iv: p for iv, p in zip(inner.invars, ins) if p is not None}
                walk(inner, inner_env)
                passed_through(inner, inner_env, id(eqn))
                for ov, iv in zip(eqn.outvars, inner.outvars):
                    if _is_var(iv) and iv in batched:
                        batched.add(ov)
                continue
            if any(_is_var(v) and v in batched for v in eqn.invars):
                batched.update(eqn.outvars)
            if (
                name == "convert_element_type"
                and ins[0] is not None
                and out is not None
                and jnp.issubdtype(out.dtype, jnp.inexact)
            ):
                # a cast parameter (float32 weights in a float64 or bfloat16 computation) stands
                # for the parameter: its gradient is the cast's, cast back
                env[eqn.outvars[0]] = ins[0]
                uses.setdefault(ins[0], []).append(("cast", id(eqn)))
                continue
            src = eqn.invars[0] if eqn.invars else None
            if (
                name in ("broadcast_in_dim", "reshape")
                and batch_size is not None
                and src is not None
                and _is_var(src)
                and (ins[0] is not None or src in bias_of)
            ):
                if ins[0] is not None:
                    p = ins[0]
                    axes = tuple(i if s != 1 else None for i, s in enumerate(src.aval.shape))
                else:
                    p, axes = bias_of[src]
                axes = _carry_axes(eqn, axes)
                if axes is None:
                    uses.setdefault(p, []).append(("other", id(eqn)))
                else:
                    bias_of[eqn.outvars[0]] = (p, axes)
                    uses.setdefault(p, []).append(("broadcast", id(eqn)))
                continue
            for pos, p in enumerate(ins):
                if p is None:
                    continue
                kind = "other"
                dense = (
                    _dense_kind(eqn, pos, batch_size, is_batched)
                    if name == "dot_general"
                    else "other"
                )
                if name == "dot_general" and pos == 1:
                    kind = dense
                elif dense == "dense_t":
                    kind = dense
                elif _is_local(eqn, pos, batch_size, is_batched):
                    kind = "local"
                uses.setdefault(p, []).append((kind, id(eqn), (eqn, pos)))
            for pos, v in enumerate(eqn.invars):
                if not (_is_var(v) and v in bias_of):
                    continue
                # a broadcast parameter added to (a bias) or multiplying (a scale: layer norm's)
                # a per-sample array (B, ...) (of the output's shape, or broadcast to it), the
                # leaf's axes off the batch axis; the other axes are summed over
                p, axes = bias_of[v]
                other = eqn.invars[1 - pos].aval if len(eqn.invars) == 2 else None
                keep = tuple(a for a in axes if a is not None)
                if (
                    name in ("add", "mul")
                    and other is not None
                    and is_batched(eqn.invars[1 - pos])
                    and out is not None
                    and other.ndim == out.ndim >= 1
                    and all(o in (1, s) for o, s in zip(other.shape, out.shape))
                    and out.shape[0] == batch_size
                    and 0 not in keep
                    and list(keep) == sorted(keep)
                    and jnp.issubdtype(out.dtype, jnp.inexact)
                ):
                    kind = "bias_add" if name == "add" else "scale_mul"
                    uses.setdefault(p, []).append((kind, id(eqn), (keep, 1 - pos)))
                else:
                    uses.setdefault(p, []).append(("other", id(eqn)))

    def passed_through(jaxpr, env, eqn_id):
        """A parameter (or its broadcast) returned as is leaves the jaxpr untracked: no
        structural reading of it."""
        for v in jaxpr.outvars:
            if _is_var(v) and (v in env or v in bias_of):
                p = env[v] if v in env else bias_of[v][0]
                uses.setdefault(p, []).append(("other", eqn_id))

    env = {v: i for i, v in enumerate(closed.jaxpr.invars[:n_params])}
    walk(closed.jaxpr, env)
    visits[None] = 1
    passed_through(closed.jaxpr, env, None)
    plan = _Plan()
    for p, us in uses.items():
        if any(visits[u[1]] > 1 for u in us):
            continue  # falls back: its equation runs more than once
        us = [u for u in us if u[0] != "cast"]
        kinds = [u[0] for u in us]
        if not kinds:
            continue
        chain = kinds[:-1] == ["broadcast"] * (len(kinds) - 1)
        if kinds == ["dense"]:
            plan.dense[us[0][1]] = p
            eqn = us[0][2][0]
            rc = eqn.params["dimension_numbers"][0][1]
            plan.d_in[us[0][1]] = math.prod(eqn.invars[1].aval.shape[: len(rc)])
            plan.structural.add(p)
        elif kinds == ["dense_t"]:
            plan.dense_t[us[0][1]] = p
            plan.structural.add(p)
        elif kinds == ["local"]:
            plan.local[us[0][1]] = (p, *us[0][2])
            plan.structural.add(p)
        elif chain and kinds[-1] == "bias_add":
            plan.bias[us[-1][1]] = (p, us[-1][2][0])
            plan.structural.add(p)
        elif chain and kinds[-1] == "scale_mul":
            plan.scale[us[-1][1]] = (p, *us[-1][2])
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
            if k in plan.dense_t:
                captured[k] = invals[1]
            if k in plan.local:
                captured[k] = tuple(invals)
            if k in plan.scale:
                captured[k] = invals[plan.scale[k][2]]
            if k in perturbations:
                return [outvals[0] + perturbations[k], *outvals[1:]]
            return outvals

        ins = [*param_leaves, *self.rest]
        return _evaluate(self.closed.jaxpr, self.closed.consts, ins, hook), captured

    def perturbation_zeros(self, plan):
        """Zeros shaped like the output of every equation the plan treats structurally."""
        keys = {*plan.dense, *plan.dense_t, *plan.bias, *plan.scale, *plan.local}
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

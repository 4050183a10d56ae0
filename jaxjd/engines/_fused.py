"""The one fused step ``J -> G -> w -> J^T w`` behind both front-ends: the losses' Gramian from an
engine, the weights from any weighting (stateful ones through ``state=``), and ``J^T w`` from the
engine's factors or a second backward pass ``grad(w . losses)``."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .._spmd import vary_like
from .._tree import accumulation_dtype
from ..aggregation import (
    AbstractAggregator,
    AbstractWeighting,
    EmptyState,
    GramianWeightedAggregator,
)
from ._filter import filter_positions
from ._gramian import AXIS_METHODS, _check_method, gather_rows, value_and_gramian
from ._layerwise import layerwise_parts, task_gramian_vjp, task_weighted_grad
from ._mtl import _heads_pullback, mtl_value_and_jacobian
from ._per_sample import local_weights, per_sample_gramian_parts, weighted_grad_from_factors


def _given_state(method, state):
    """The state to run ``method`` with: ``state``, or ``EmptyState()`` for a stateless one."""
    if state is not None:
        return state
    if method.stateful:
        raise TypeError(
            f"{type(method).__name__} is stateful: pass state= (from its init) and read the new "
            "state from the last entry of the result."
        )
    return EmptyState()


def _weigh(weighting, G, state, key, losses):
    """``(w, new_state)``: the weights, constants under differentiation (``state`` from
    :func:`_given_state`, called before any work so that a missing state fails at once; the
    losses, flattened, go to the weightings that read them)."""
    w, new_state = weighting.update(G, state, key=key, losses=jnp.ravel(losses))
    return jax.lax.stop_gradient(w), new_state


def value_and_weighted_grad(
    fun: Callable,
    weighting: AbstractWeighting,
    *,
    method: str = "jacobian",
    gramian_filter: Any = None,
    has_aux: bool = False,
    chunk_size: int | None = None,
    wrt: Any = None,
    axis_name: Hashable | None = None,
) -> Callable:
    r"""One call from losses to an aggregated gradient: ``G`` of the losses, ``w = weighting(G)``,
    then ``grad_params (w . losses)`` (``= J^T w`` by linearity: a second backward pass instead of
    holding ``J``).

    Returns ``g(params, *args, key=None, state=None) -> (losses, weights, grad)``
    (``((losses, aux), ...)`` with ``has_aux``; ``new_state`` appended when ``state`` is given)
    where ``fun(params, *args)`` returns the losses, of shape ``(m,)``, ``(B,)`` (instance-wise
    risk minimisation) or ``(B, T)`` (instance-wise multi-task: flattened to ``B*T``
    objectives, weights returned in the losses' shape). ``weighting`` is any jaxjd weighting
    (``jd.upgrad_weighting()``, ...): a stateful one needs ``state=weighting.init(m)``, a
    stateless one takes ``EmptyState()`` or nothing; random ones read ``key``.

    Partial JD: ``gramian_filter`` (an equinox filter spec: a pytree prefix of ``params`` with
    booleans, or a callable on leaves) selects the parameters whose Jacobian defines ``G`` (e.g.
    the last layers); the update still covers every parameter. With ``method="per_sample"`` or
    ``"layerwise"`` (and no filter) the update is formed from the factors the Gramian captured
    (``X^T diag(w) D`` or ``X^T sum_t w_t D_t`` for dense layers): no second backward pass.
    ``wrt`` differentiates only the leaves of ``params`` it selects (see
    :func:`value_and_jacobian`; the gradient is ``None`` elsewhere, which ``eqx.apply_updates``
    skips); ``gramian_filter`` then applies to those.

    Data parallel: under ``jax.jit`` with the batch arguments sharded (``NamedSharding``) every
    method gives the single-device result; the m x m solve runs whole on every device. Inside
    ``shard_map``, pass ``axis_name`` (the mesh axis the batch is split over; ``"per_sample"`` or
    ``"jacobian"``): the weights are those of the global batch's Gramian (built from the
    gathered factors, or rows), the gradient is summed over the devices, and the losses and
    weights returned are this device's.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> def losses(p, x):
    ...     return (x @ p) ** 2  # one loss per sample
    >>> step = jd.value_and_weighted_grad(losses, jd.upgrad_weighting())
    >>> values, w, g = step(jnp.array([1.0, -1.0]), jnp.array([[1.0, 0.0], [0.0, 2.0]]))
    >>> values.tolist(), w.shape, g.shape
    ([1.0, 4.0], (2,), (2,))
    """
    _check_method(method)
    if axis_name is not None and method not in AXIS_METHODS:
        raise ValueError(
            f"axis_name needs method='per_sample' or 'jacobian' (the batch's rows gathered over "
            f"the devices); got method={method!r}."
        )
    if not isinstance(weighting, AbstractWeighting):
        raise TypeError(
            "value_and_weighted_grad needs a jaxjd weighting (e.g. jd.upgrad_weighting()); got "
            f"{type(weighting).__name__}."
        )

    if wrt is not None:
        return filter_positions(
            lambda f: value_and_weighted_grad(
                f,
                weighting,
                method=method,
                gramian_filter=gramian_filter,
                has_aux=has_aux,
                chunk_size=chunk_size,
                axis_name=axis_name,
            ),
            (fun,),
            wrt,
            "value_and_weighted_grad",
        )

    # Inside shard_map (axis_name): the weighting sees the global batch's losses, each device
    # returns its block of the weights, and the gradient is summed over the axis.
    def global_losses(losses):
        return losses if axis_name is None else gather_rows(losses, axis_name)

    def mine(w, shape):
        return jnp.reshape(w, shape) if axis_name is None else local_weights(w, shape, axis_name)

    def summed(grad):
        return grad if axis_name is None else jax.lax.psum(grad, axis_name)

    def wrapped(params, *args, key=None, state=None):
        given = _given_state(weighting, state)
        if axis_name is not None:
            params = vary_like(params, args)  # derivatives of the local losses stay local
        if method == "per_sample" and gramian_filter is None and not has_aux:
            # The captured factors give J^T w directly: no second backward pass.
            losses, G, factors = per_sample_gramian_parts(fun, params, *args, axis_name=axis_name)
            w, new_state = _weigh(weighting, G, given, key, global_losses(losses))
            w = mine(w, losses.shape)
            out = (losses, w, summed(weighted_grad_from_factors(jnp.ravel(w), factors)))
            return out if state is None else (*out, new_state)
        if method == "layerwise" and gramian_filter is None and not has_aux:
            losses, G, factors = layerwise_parts(fun, params, *args)
            w, new_state = _weigh(weighting, G, given, key, losses)
            out = (losses, jnp.reshape(w, losses.shape), task_weighted_grad(w, factors))
            return out if state is None else (*out, new_state)
        if gramian_filter is None:

            def losses_of(p):
                return fun(p, *args)

            chosen = params
        else:
            chosen, rest = eqx.partition(params, gramian_filter)
            if not jax.tree_util.tree_leaves(chosen):
                raise ValueError("gramian_filter selects no parameter.")

            def losses_of(p):
                return fun(eqx.combine(p, rest), *args)

        value, G = value_and_gramian(
            losses_of, has_aux=has_aux, method=method, chunk_size=chunk_size, axis_name=axis_name
        )(chosen)
        losses = value[0] if has_aux else value
        w, new_state = _weigh(weighting, G, given, key, global_losses(losses))
        w = mine(w, losses.shape)

        def weighted(p):
            out = fun(p, *args)
            out = out[0] if has_aux else out
            return jnp.sum(jnp.reshape(w, out.shape).astype(out.dtype) * out)

        out = (value, w, summed(jax.grad(weighted)(params)))
        return out if state is None else (*out, new_state)

    return wrapped


MTL_METHODS = ("layerwise", "jacobian")


def mtl_value_and_grad(
    trunk: Callable,
    heads: Callable,
    aggregator: AbstractAggregator,
    *,
    method: str | None = None,
    wrt: Any = None,
    axis_name: Hashable | None = None,
) -> Callable:
    """One call for a multi-task train step: the trunk's Jacobian (or Gramian) aggregated by
    ``aggregator``, the heads' ordinary gradients.

    Returns ``f(trunk_params, head_params, *args, key=None, state=None) -> (losses, (trunk_grad,
    head_grads), weights)``, with ``new_state`` appended when ``state`` is given (a stateful
    aggregator needs it: ``state = aggregator.init(J_like)``; a stateless one takes
    ``EmptyState()``, so one loop serves every method). ``weights`` is ``None`` for aggregators
    that do not weigh the rows (GradDrop, TrimmedMean); ``key`` goes to random ones.

    ``method``: ``"layerwise"`` (the default for a
    :class:`~jaxjd.aggregation.GramianWeightedAggregator`) forms the Gramian as
    :func:`mtl_value_and_gramian` does and ``J^T w`` from the same factors (``X^T sum_t w_t
    D_t`` for a dense use): the trunk Jacobian is never materialised and the per-task weight
    gradients of wide dense layers are never formed. ``"jacobian"`` (the default, and the only
    choice, for the other aggregators) materialises it with :func:`mtl_value_and_jacobian`.
    ``wrt``: the leaves of both parameter pytrees to differentiate (see
    :func:`value_and_jacobian`).

    Data parallel: under ``jax.jit`` with the batch sharded, nothing to add. Inside
    ``shard_map`` with the batch split over the mesh axis ``axis_name`` (the heads' losses
    being means over the local batch), the step aggregates the Jacobian of the global mean
    losses (the mean of the devices' Jacobians) and returns those losses and the mean head
    gradients. ``"layerwise"`` gathers only the activations and task cotangents of the dense
    layers (and averages the other rows); ``"jacobian"`` averages the trunk Jacobian (m
    gradient-sized all-reduces).
    """
    if wrt is not None:
        return filter_positions(
            lambda t, h: mtl_value_and_grad(t, h, aggregator, method=method, axis_name=axis_name),
            (trunk, heads),
            wrt,
            "mtl_value_and_grad",
        )
    if not isinstance(aggregator, AbstractAggregator):
        raise TypeError(
            f"mtl_value_and_grad needs a jaxjd aggregator; got {type(aggregator).__name__}."
        )
    weighted = isinstance(aggregator, GramianWeightedAggregator)
    if method is None:
        method = "layerwise" if weighted else "jacobian"
    if method not in MTL_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {MTL_METHODS}.")
    if method == "layerwise" and not weighted:
        raise ValueError(
            f"method='layerwise' needs a Gramian-weighted aggregator; {type(aggregator).__name__} "
            "reads the Jacobian itself: use method='jacobian'."
        )
    vj = mtl_value_and_jacobian(trunk, heads)

    def local(trunk_params, head_params, args):
        if axis_name is None:
            return trunk_params, head_params
        return vary_like((trunk_params, head_params), args)

    def mean(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    def by_layers(trunk_params, head_params, *args, key=None, state=None):
        given = _given_state(aggregator, state)
        trunk_params, head_params = local(trunk_params, head_params, args)
        features, pullback = task_gramian_vjp(trunk, trunk_params, *args)
        losses, cotangents, head_grads = _heads_pullback(heads, head_params, features, args)
        losses, head_grads = mean((losses, head_grads))
        weighting = aggregator.weighting  # pyright: ignore[reportAttributeAccessIssue]
        m = losses.size
        if weighting.reads_gramian:
            G, factors = pullback(cotangents, axis_name=axis_name)
        else:  # weights from m alone: no Gramian
            _, factors = pullback(cotangents, gramian=False, axis_name=axis_name)
            G = jax.ShapeDtypeStruct((m, m), accumulation_dtype(losses.dtype))
        weights, new_state = _weigh(weighting, G, given, key, losses)
        out = (losses, (task_weighted_grad(weights, factors), head_grads), weights)
        return out if state is None else (*out, new_state)

    def by_jacobian(trunk_params, head_params, *args, key=None, state=None):
        inner = _given_state(aggregator, state)
        trunk_params, head_params = local(trunk_params, head_params, args)
        losses, J, head_grads = mean(vj(trunk_params, head_params, *args))
        trunk_grad, weights, new_state = aggregator.aggregate(J, inner, key=key, losses=losses)
        out = (losses, (trunk_grad, head_grads), weights)
        return out if state is None else (*out, new_state)

    return by_layers if method == "layerwise" else by_jacobian

"""Jacobian engine: per-objective gradients as a pytree with a leading axis m."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._ghost import task_gramian_vjp, task_weighted_grad
from ._tree import accumulation_dtype, combine


def value_and_jacobian(
    fun: Callable, argnums: int = 0, has_aux: bool = False, chunk_size: int | None = None
) -> Callable:
    """Like ``jax.value_and_grad`` for a function returning a vector of m losses.

    Returns ``f(*args) -> (losses, J)`` (or ``((losses, aux), J)`` with ``has_aux``), where ``J``
    has the structure of ``args[argnums]`` with a leading axis m: one row per loss, from a single
    forward pass and m vmapped VJPs. ``chunk_size`` bounds memory by running the VJPs in chunks
    (``lax.map``); the result does not depend on it. Losses of any shape are flattened to m.

    Any pytree of parameters works (dicts, flax ``params``). For an equinox module, split the
    arrays from the rest and differentiate the arrays::

        params, static = eqx.partition(model, eqx.is_inexact_array)
        losses, J = jd.value_and_jacobian(
            lambda p, x, y: losses_fn(eqx.combine(p, static), x, y)
        )(params, x, y)  # J mirrors params: None where the model has no array

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> f = lambda p: jnp.array([p @ jnp.array([-1.0, 1.0]), p @ p])
    >>> losses, J = jd.value_and_jacobian(f)(jnp.array([1.0, 2.0]))
    >>> J
    Array([[-1.,  1.],
           [ 2.,  4.]], dtype=float32)
    """
    if not isinstance(argnums, int):
        raise TypeError("value_and_jacobian differentiates one argument: argnums must be an int.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}.")

    def wrapped(*args, **kwargs):
        def f(x):
            return fun(*args[:argnums], x, *args[argnums + 1 :], **kwargs)

        if has_aux:
            losses, vjp, aux = jax.vjp(f, args[argnums], has_aux=True)
        else:
            losses, vjp = jax.vjp(f, args[argnums])
        m = losses.size
        if m == 0:
            raise ValueError("The function returned no losses (m = 0).")
        basis = jnp.eye(m, dtype=losses.dtype).reshape((m, *losses.shape))
        if chunk_size is None:
            J = jax.vmap(lambda c: vjp(c)[0])(basis)
        else:
            J = jax.lax.map(lambda c: vjp(c)[0], basis, batch_size=chunk_size)
        return ((losses, aux) if has_aux else losses), J

    return wrapped


def mean_over_microbatches(fun: Callable) -> Callable:
    """Accumulates ``fun(params, batch, *rest) -> (losses, J)`` over micro-batches.

    Returns ``g(params, batches, *rest)`` where every leaf of ``batches`` has a leading axis of
    micro-batches: a ``lax.scan`` that keeps one running sum of the outputs (one Jacobian in
    memory) and returns their mean. When each loss is a mean over its micro-batch (of equal
    sizes), that is the losses and the Jacobian of the whole batch, which then go to one
    aggregation: JD's answer for the whole batch, unlike aggregating per micro-batch (use this
    instead of wrapping ``jd_aggregate`` in ``optax.MultiSteps``).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> def losses(p, batch):  # two losses, each a mean over the micro-batch
    ...     return jnp.stack([jnp.mean(batch @ p), jnp.mean((batch @ p) ** 2)])
    >>> step = jd.mean_over_microbatches(jd.value_and_jacobian(losses))
    >>> batches = jnp.arange(12.0).reshape(3, 2, 2)  # 3 micro-batches of 2 samples
    >>> values, J = step(jnp.array([1.0, -1.0]), batches)
    >>> J.shape, J[0].tolist()
    ((2, 2), [5.0, 6.0])
    """

    def wrapped(params, batches, *rest):
        leaves = jax.tree_util.tree_leaves(batches)
        if not leaves:
            raise ValueError("batches has no array leaves.")
        counts = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
        if len(counts) != 1 or None in counts:
            raise ValueError(
                "Every leaf of batches needs the same leading axis (the micro-batches); got "
                f"{sorted(c for c in counts if c is not None)}."
            )
        (count,) = counts
        first = jax.tree_util.tree_map(lambda b: b[0], batches)
        shapes = jax.eval_shape(lambda b: fun(params, b, *rest), first)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(total, batch):
            out = fun(params, batch, *rest)
            return jax.tree_util.tree_map(jnp.add, total, out), None

        total, _ = jax.lax.scan(body, zeros, batches)
        return jax.tree_util.tree_map(lambda t: t / count, total)

    return wrapped


def _heads_pullback(heads, head_params, features, args):
    """Losses, the m stacked feature cotangents and the heads' gradient of the summed losses,
    from one vmapped VJP of the heads (each head only sees its own loss)."""
    losses, heads_vjp = jax.vjp(lambda h, f: heads(h, f, *args), head_params, features)
    m = losses.size
    if m == 0:
        raise ValueError("The heads returned no losses (m = 0).")
    basis = jnp.eye(m, dtype=losses.dtype).reshape((m, *losses.shape))
    # The heads' gradient of the summed losses is the sum of the task rows (linearity).
    head_rows, feature_cotangents = jax.vmap(heads_vjp)(basis)
    head_grads = jax.tree_util.tree_map(lambda r: jnp.sum(r, axis=0), head_rows)
    return losses, feature_cotangents, head_grads


def mtl_value_and_jacobian(trunk: Callable, heads: Callable) -> Callable:
    """The multi-task split (TorchJD's ``mtl_backward``): a shared trunk and task-specific heads.

    ``trunk(trunk_params, *args) -> features`` (any pytree) and
    ``heads(head_params, features, *args) -> losses`` (m losses). Returns
    ``f(trunk_params, head_params, *args) -> (losses, trunk_jacobian, head_grads)``: the trunk's
    m-row Jacobian from **one** vmapped VJP of the stacked feature cotangents (never m full
    backward passes), and the heads' ordinary gradient of the sum of the losses (each head only
    sees its own loss).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> trunk = lambda w, x: jnp.tanh(x @ w)
    >>> heads = lambda h, f, x: jnp.stack([jnp.mean(f @ h[0]), jnp.mean((f @ h[1]) ** 2)])
    >>> f = jd.mtl_value_and_jacobian(trunk, heads)
    >>> losses, J, head_grads = f(jnp.ones((3, 4)), jnp.ones((2, 4)), jnp.ones((5, 3)))
    >>> losses.shape, J.shape, head_grads.shape
    ((2,), (2, 3, 4), (2, 4))
    """

    def wrapped(trunk_params, head_params, *args):
        features, trunk_vjp = jax.vjp(lambda p: trunk(p, *args), trunk_params)
        losses, cotangents, head_grads = _heads_pullback(heads, head_params, features, args)
        trunk_jacobian = jax.vmap(lambda c: trunk_vjp(c)[0])(cotangents)
        return losses, trunk_jacobian, head_grads

    return wrapped


def mtl_value_and_gramian(trunk: Callable, heads: Callable) -> Callable:
    r"""Like :func:`mtl_value_and_jacobian` but returns the trunk's m x m Gramian ``J J^T``
    instead of J, formed layer by layer from the m task cotangents at each layer (for a dense
    use ``y = x @ W``: ``sum(D_t * (X X^T) D_u)``), never materialising the trunk Jacobian.

    >>> import jax, jax.numpy as jnp, jaxjd as jd
    >>> trunk = lambda w, x: jnp.tanh(x @ w)
    >>> heads = lambda h, f, x: jnp.stack([jnp.mean(f @ h[0]), jnp.mean((f @ h[1]) ** 2)])
    >>> args = jnp.ones((3, 4)) / 3, jnp.ones((2, 4)), jnp.ones((5, 3))
    >>> losses, G, head_grads = jd.mtl_value_and_gramian(trunk, heads)(*args)
    >>> _, J, _ = jd.mtl_value_and_jacobian(trunk, heads)(*args)
    >>> bool(jnp.allclose(G, jd.gramian(J)))
    True
    """

    def wrapped(trunk_params, head_params, *args):
        features, pullback = task_gramian_vjp(trunk, trunk_params, *args)
        losses, cotangents, head_grads = _heads_pullback(heads, head_params, features, args)
        G, _ = pullback(cotangents)
        return losses, G, head_grads

    return wrapped


MTL_METHODS = ("layerwise", "jacobian")


def mtl_value_and_grad(
    trunk: Callable, heads: Callable, aggregator, *, method: str | None = None
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
    """
    from .aggregation import AbstractAggregator, GramianWeightedAggregator

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

    def by_layers(trunk_params, head_params, *args, key=None, state=None):
        features, pullback = task_gramian_vjp(trunk, trunk_params, *args)
        losses, cotangents, head_grads = _heads_pullback(heads, head_params, features, args)
        weighting = aggregator.weighting
        m = losses.size
        if weighting.reads_gramian:
            G, factors = pullback(cotangents)
        else:  # weights from m alone: no Gramian
            _, factors = pullback(cotangents, gramian=False)
            G = jax.ShapeDtypeStruct((m, m), accumulation_dtype(losses.dtype))
        inner = _given_state(aggregator, state)
        weights, new_state = weighting.update(G, inner, key=key)
        out = (losses, (task_weighted_grad(weights, factors), head_grads), weights)
        return out if state is None else (*out, new_state)

    def by_jacobian(trunk_params, head_params, *args, key=None, state=None):
        losses, J, head_grads = vj(trunk_params, head_params, *args)
        inner = _given_state(aggregator, state)
        trunk_grad, weights, new_state = aggregator.aggregate(J, inner, key=key)
        out = (losses, (trunk_grad, head_grads), weights)
        return out if state is None else (*out, new_state)

    return by_layers if method == "layerwise" else by_jacobian


def _given_state(method, state):
    """The state to run ``method`` with: ``state``, or ``EmptyState()`` for a stateless one."""
    from .aggregation import EmptyState

    if state is not None:
        return state
    if method.stateful:
        raise TypeError(
            f"{type(method).__name__} is stateful: pass state= (from its init) and read the new "
            "state from the last entry of the result."
        )
    return EmptyState()

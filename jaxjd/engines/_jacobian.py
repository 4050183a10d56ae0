"""The Jacobian engine: J of a vector of losses (m vmapped VJPs), and its mean over
micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._spmd import vary_like
from ._filter import filter_argnum


def value_and_jacobian(
    fun: Callable,
    argnums: int = 0,
    has_aux: bool = False,
    chunk_size: int | None = None,
    wrt: Any = None,
) -> Callable:
    """Like ``jax.value_and_grad`` for a function returning a vector of m losses.

    Returns ``f(*args) -> (losses, J)`` (or ``((losses, aux), J)`` with ``has_aux``), where ``J``
    has the structure of ``args[argnums]`` with a leading axis m: one row per loss, from a single
    forward pass and m vmapped VJPs. ``chunk_size`` bounds memory by running the VJPs in chunks
    (``lax.map``); the result does not depend on it. Losses of any shape are flattened to m.

    Any pytree of parameters works (dicts, flax ``params``). ``wrt`` (every engine takes it)
    differentiates only the leaves it selects, an equinox filter spec (a callable on leaves or
    a pytree prefix of booleans), as ``eqx.filter_grad`` and ``nnx.grad`` do: for a model that
    also holds integer counters, PRNG keys or other objects (an equinox module, the state of a
    Flax NNX module from ``nnx.split``) pass ``wrt=eqx.is_inexact_array``; ``J`` then mirrors
    the model with ``None`` where nothing was differentiated::

        losses, J = jd.value_and_jacobian(losses_fn, wrt=eqx.is_inexact_array)(model, x, y)

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
    if wrt is not None:
        return filter_argnum(
            lambda f: value_and_jacobian(f, argnums, has_aux, chunk_size),
            fun,
            argnums,
            wrt,
            "value_and_jacobian",
        )

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
        basis = vary_like(jnp.eye(m, dtype=losses.dtype).reshape((m, *losses.shape)), losses)
        if chunk_size is None:
            J = jax.vmap(lambda c: vjp(c)[0])(basis)
        else:
            J = jax.lax.map(lambda c: vjp(c)[0], basis, batch_size=chunk_size)
        return ((losses, aux) if has_aux else losses), J

    return wrapped


def mean_over_microbatches(
    fun: Callable, *, batch_argnums: int | Sequence[int] | None = None
) -> Callable:
    """Accumulates ``fun(params, *args) -> (losses, J)`` over micro-batches.

    Returns ``g(params, *args)`` where every leaf of the batched arguments has a leading axis of
    micro-batches (the same count for all): a ``lax.scan`` that keeps one running sum of the
    outputs (one Jacobian in memory) and returns their mean. When each loss is a mean over its
    micro-batch (of equal sizes), that is the losses and the Jacobian of the whole batch, which
    then go to one aggregation: JD's answer for the whole batch, unlike aggregating per
    micro-batch (use this instead of wrapping ``jd_aggregate`` in ``optax.MultiSteps``).

    Args:
        fun: ``fun(params, *args) -> (losses, J)``, e.g. ``jaxjd.value_and_jacobian(f)``.
        batch_argnums: positions in ``(params, *args)`` of the micro-batched arguments; by
            default every argument after ``params`` (inputs and targets alike). The others are
            passed whole to every micro-batch.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> def losses(p, batch):  # two losses, each a mean over the micro-batch
    ...     return jnp.stack([jnp.mean(batch @ p), jnp.mean((batch @ p) ** 2)])
    >>> step = jd.mean_over_microbatches(jd.value_and_jacobian(losses))
    >>> batches = jnp.arange(12.0).reshape(3, 2, 2)  # 3 micro-batches of 2 samples
    >>> values, J = step(jnp.array([1.0, -1.0]), batches)
    >>> J.shape, J[0].tolist()
    ((2, 2), [5.0, 6.0])
    """
    if batch_argnums is not None:
        argnums = (batch_argnums,) if isinstance(batch_argnums, int) else tuple(batch_argnums)
        if not argnums or any(not isinstance(i, int) or i < 1 for i in argnums):
            raise ValueError(
                "batch_argnums are positions >= 1 in (params, *args) (0 is params, never split); "
                f"got {batch_argnums}."
            )

    def wrapped(params, *args):
        if not args:
            raise ValueError("mean_over_microbatches needs at least one micro-batched argument.")
        chosen = range(1, len(args) + 1) if batch_argnums is None else argnums
        if max(chosen) > len(args):
            raise ValueError(f"batch_argnums {tuple(chosen)} but only {len(args)} arguments.")
        batched = {i - 1 for i in chosen}
        batches = tuple(args[i] for i in sorted(batched))
        leaves = jax.tree_util.tree_leaves(batches)
        if not leaves:
            raise ValueError("The micro-batched arguments have no array leaves.")
        counts = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
        if len(counts) != 1 or None in counts:
            raise ValueError(
                "Every leaf of the micro-batched arguments needs the same leading axis (the "
                f"micro-batches); got {sorted(c for c in counts if c is not None)} (scalars "
                "have none). Pass batch_argnums= to name the batched arguments."
            )
        (count,) = counts

        def call(batch):
            it = iter(batch)
            full = [next(it) if i in batched else a for i, a in enumerate(args)]
            return fun(params, *full)

        first = jax.tree_util.tree_map(lambda b: b[0], batches)
        shapes = jax.eval_shape(call, first)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(total, batch):
            return jax.tree_util.tree_map(jnp.add, total, call(batch)), None

        total, _ = jax.lax.scan(body, zeros, batches)
        return jax.tree_util.tree_map(lambda t: t / count, total)

    return wrapped

"""Jacobian engine: per-objective gradients as a pytree with a leading axis m."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def value_and_jacobian(
    fun: Callable, argnums: int = 0, has_aux: bool = False, chunk_size: int | None = None
) -> Callable:
    """Like ``jax.value_and_grad`` for a function returning a vector of m losses.

    Returns ``f(*args) -> (losses, J)`` (or ``((losses, aux), J)`` with ``has_aux``), where ``J``
    has the structure of ``args[argnums]`` with a leading axis m: one row per loss, from a single
    forward pass and m vmapped VJPs. ``chunk_size`` bounds memory by running the VJPs in chunks
    (``lax.map``); the result does not depend on it. Losses of any shape are flattened to m.

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

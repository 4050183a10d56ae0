"""Multi-task learning: a shared trunk's Jacobian or Gramian and the heads' ordinary gradients, in
one pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._spmd import vary_like
from ._filter import filter_positions
from ._layerwise import task_gramian_vjp


def _heads_pullback(heads, head_params, features, args):
    """Losses, the m stacked feature cotangents and the heads' gradient of the summed losses,
    from one vmapped VJP of the heads (each head only sees its own loss)."""
    losses, heads_vjp = jax.vjp(lambda h, f: heads(h, f, *args), head_params, features)
    m = losses.size
    if m == 0:
        raise ValueError("The heads returned no losses (m = 0).")
    basis = vary_like(jnp.eye(m, dtype=losses.dtype).reshape((m, *losses.shape)), losses)
    # The heads' gradient of the summed losses is the sum of the task rows (linearity).
    head_rows, feature_cotangents = jax.vmap(heads_vjp)(basis)
    head_grads = jax.tree_util.tree_map(lambda r: jnp.sum(r, axis=0), head_rows)
    return losses, feature_cotangents, head_grads


def mtl_value_and_jacobian(trunk: Callable, heads: Callable, *, wrt: Any = None) -> Callable:
    """The multi-task split (TorchJD's ``mtl_backward``): a shared trunk and task-specific heads.

    ``trunk(trunk_params, *args) -> features`` (any pytree) and
    ``heads(head_params, features, *args) -> losses`` (m losses). Returns
    ``f(trunk_params, head_params, *args) -> (losses, trunk_jacobian, head_grads)``: the trunk's
    m-row Jacobian from **one** vmapped VJP of the stacked feature cotangents (never m full
    backward passes), and the heads' ordinary gradient of the sum of the losses (each head only
    sees its own loss). ``wrt``: the leaves of both parameter pytrees to differentiate (see
    :func:`value_and_jacobian`).

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> trunk = lambda w, x: jnp.tanh(x @ w)
    >>> heads = lambda h, f, x: jnp.stack([jnp.mean(f @ h[0]), jnp.mean((f @ h[1]) ** 2)])
    >>> f = jd.mtl_value_and_jacobian(trunk, heads)
    >>> losses, J, head_grads = f(jnp.ones((3, 4)), jnp.ones((2, 4)), jnp.ones((5, 3)))
    >>> losses.shape, J.shape, head_grads.shape
    ((2,), (2, 3, 4), (2, 4))
    """

    if wrt is not None:
        return filter_positions(
            lambda t, h: mtl_value_and_jacobian(t, h), (trunk, heads), wrt, "mtl_value_and_jacobian"
        )

    def wrapped(trunk_params, head_params, *args):
        features, trunk_vjp = jax.vjp(lambda p: trunk(p, *args), trunk_params)
        losses, cotangents, head_grads = _heads_pullback(heads, head_params, features, args)
        trunk_jacobian = jax.vmap(lambda c: trunk_vjp(c)[0])(cotangents)
        return losses, trunk_jacobian, head_grads

    return wrapped


def mtl_value_and_gramian(trunk: Callable, heads: Callable, *, wrt: Any = None) -> Callable:
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

    if wrt is not None:
        return filter_positions(
            lambda t, h: mtl_value_and_gramian(t, h), (trunk, heads), wrt, "mtl_value_and_gramian"
        )

    def wrapped(trunk_params, head_params, *args):
        features, pullback = task_gramian_vjp(trunk, trunk_params, *args)
        losses, cotangents, head_grads = _heads_pullback(heads, head_params, features, args)
        G, _ = pullback(cotangents)
        return losses, G, head_grads

    return wrapped

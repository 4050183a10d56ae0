"""GradDrop (Chen et al., NeurIPS 2020): random sign-consistent masking, coordinate-wise."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import num_objectives
from ._base import Aggregator, as_static_vector, build_or_apply, vector_for


def _identity(x):
    return x


class GradDrop(Aggregator):
    r"""GradDrop: per coordinate, purity ``P = (1 + sum_i J_i / sum_i |J_i|) / 2``, one uniform
    draw ``U`` (shared by the rows), masks ``M_i = [f(P) > U][J_i > 0] + [f(P) < U][J_i < 0]`` and
    the update ``sum_i (leak_i + (1 - leak_i) M_i) J_i``. Needs coordinates (works leaf by leaf on
    a pytree, one draw per coordinate of the flattened row, from the explicit ``key``); ``f``
    should be monotone increasing (default identity), ``leak`` defaults to zeros."""

    f: Callable = eqx.field(static=True)
    leak: tuple[float, ...] | None = eqx.field(static=True)
    needs_key = True

    def __init__(self, f: Callable = _identity, leak=None):
        if not callable(f):
            raise TypeError("f must be callable.")
        self.f = f
        self.leak = as_static_vector(leak, "leak")

    def __call__(self, jacobian, /, *, key=None):
        m = num_objectives(jacobian)
        if key is None:
            raise ValueError("GradDrop needs a PRNG key: call it with key=jax.random.key(0).")
        leaves, treedef = jax.tree_util.tree_flatten(jacobian)
        # One uniform per coordinate of the flattened row, so a pytree and its matrix view get
        # the same draws.
        sizes = [leaf[0].size for leaf in leaves]
        dtype_u = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
        u_all = jax.random.uniform(key, (sum(sizes),), dtype_u)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def one(leaf, start):
            dtype = jnp.promote_types(leaf.dtype, jnp.float32)
            x = leaf.astype(dtype)
            leak = (
                jnp.zeros((m,), dtype)
                if self.leak is None
                else vector_for(self.leak, m, dtype, "leak")
            )
            leak = jnp.reshape(leak, (m,) + (1,) * (x.ndim - 1))
            purity = 0.5 * (1.0 + jnp.sum(x, axis=0) / jnp.sum(jnp.abs(x), axis=0))
            u = jnp.reshape(u_all[start : start + x[0].size], x.shape[1:]).astype(dtype)
            fp = self.f(purity)
            mask = ((fp > u) & (x > 0)) | ((fp < u) & (x < 0))
            out = jnp.sum((leak + (1.0 - leak) * mask) * x, axis=0)
            return out.astype(leaf.dtype)

        outs = [one(x, start) for x, start in zip(leaves, starts)]
        return jax.tree_util.tree_unflatten(treedef, outs)


def graddrop(jacobian=None, /, *, f=_identity, leak=None, key=None):
    """GradDrop: ``graddrop(J, key=key)`` returns the update, ``graddrop(**hyper)`` a
    :class:`GradDrop` to call with ``key=``."""
    return build_or_apply(GradDrop(f, leak), jacobian, key=key)

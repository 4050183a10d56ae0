"""GradDrop (Chen et al., NeurIPS 2020): random sign-consistent masking, coordinate-wise."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import accumulation_dtype, accumulation_dtype_of, num_objectives
from .._typing import VectorLike
from ._abstract import AbstractAggregator, Aggregation
from ._fields import sized, spelling, vector


def _identity(x):
    return x


def _callable(f):
    if not callable(f):
        raise TypeError("f must be callable.")
    return f


class GradDrop(AbstractAggregator):
    r"""GradDrop: per coordinate, purity ``P = (1 + sum_i J_i / sum_i |J_i|) / 2``, one uniform
    draw ``U`` (shared by the rows), masks ``M_i = [f(P) > U][J_i > 0] + [f(P) < U][J_i < 0]`` and
    the update ``sum_i (leak_i + (1 - leak_i) M_i) J_i``. Needs coordinates (works leaf by leaf on
    a pytree, one draw per coordinate of the flattened row, from the explicit ``key``); ``f``
    should be monotone increasing (default identity), ``leak`` defaults to zeros.

    Args:
        f: the monotone map applied to the purity.
        leak: per-row fraction of the gradient always kept (default zeros).

    Reference: Chen et al., "Just pick a sign: optimizing deep multitask models with gradient
    sign dropout", NeurIPS 2020.

    >>> import jax, jax.numpy as jnp, jaxjd as jd
    >>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    >>> jd.graddrop(J, key=jax.random.key(0)).shape
    (3,)
    """

    f: Callable = eqx.field(static=True, default=_identity, converter=_callable)
    leak: VectorLike | None = vector("leak")
    draws_key = True

    def _aggregate(self, jacobian, state, key):
        m = num_objectives(jacobian)
        if key is None:
            raise ValueError("GradDrop needs a PRNG key: call it with key=jax.random.key(0).")
        leaves, treedef = jax.tree_util.tree_flatten(jacobian)
        # One uniform per coordinate of the flattened row, so a pytree and its matrix view get
        # the same draws.
        sizes = [leaf[0].size for leaf in leaves]
        dtype_u = accumulation_dtype_of(*leaves)
        u_all = jax.random.uniform(key, (sum(sizes),), dtype_u)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]

        def one(leaf, start):
            dtype = accumulation_dtype(leaf.dtype)
            x = leaf.astype(dtype)
            leak = (
                jnp.zeros((m,), dtype) if self.leak is None else sized(self.leak, m, dtype, "leak")
            )
            leak = jnp.reshape(leak, (m,) + (1,) * (x.ndim - 1))
            purity = 0.5 * (1.0 + jnp.sum(x, axis=0) / jnp.sum(jnp.abs(x), axis=0))
            u = jnp.reshape(u_all[start : start + x[0].size], x.shape[1:]).astype(dtype)
            fp = self.f(purity)
            mask = ((fp > u)[None] & (x > 0)) | ((fp < u)[None] & (x < 0))
            out = jnp.sum((leak + (1.0 - leak) * mask.astype(dtype)) * x, axis=0)
            # A coordinate with a NaN or Inf entry is NaN: XLA rewrites ``0 * x`` of a dropped
            # entry as a select, which would turn a NaN into 0 under jit only.
            out = jnp.where(jnp.all(jnp.isfinite(x), axis=0), out, jnp.nan)
            return out.astype(leaf.dtype)

        outs = [one(x, start) for x, start in zip(leaves, starts)]
        return Aggregation(jax.tree_util.tree_unflatten(treedef, outs), None, state)


graddrop = spelling(GradDrop, "graddrop", reads="jacobian")

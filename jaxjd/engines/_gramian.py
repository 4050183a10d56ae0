"""Gramian engines: ``G = J J^T`` of a vector of losses, by the Jacobian, by columns (never
holding J), per sample (the ghost Gramian) or layer by layer."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

from .._spmd import replicated, vary_like, whole_along
from .._tree import gramian
from ._filter import filter_argnum
from ._jacobian import value_and_jacobian
from ._layerwise import layerwise_parts
from ._per_sample import per_sample_gramian_parts

METHODS = ("jacobian", "columns", "per_sample", "layerwise")
AXIS_METHODS = ("per_sample", "jacobian")


def gather_rows(tree: Any, axis_name: Hashable) -> Any:
    """Every leaf all-gathered along its first axis over ``axis_name`` (device after device),
    invariant."""
    return jax.tree_util.tree_map(lambda x: whole_along(x, 0, axis_name), tree)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")


def value_and_gramian(
    fun: Callable,
    argnums: int = 0,
    has_aux: bool = False,
    method: str = "jacobian",
    chunk_size: int | None = None,
    wrt: Any = None,
    axis_name: Hashable | None = None,
) -> Callable:
    r"""Like :func:`value_and_jacobian`, but returns the Gramian ``G = J J^T`` (m x m) of the
    losses with respect to ``args[argnums]``.

    Methods:

    * ``"jacobian"``: materialise ``J`` (m vmapped VJPs, in chunks of ``chunk_size``) and form
      ``G`` leaf by leaf. Memory O(m * params); fastest when that fits.
    * ``"columns"``: never holds ``J``: one forward pass linearised once, then for each objective
      ``k`` one VJP ``v = J^T e_k`` and one JVP ``J v`` (column ``k`` of ``G``), ``chunk_size``
      at a time under ``lax.map``. Memory O(chunk_size * params + m^2).

    * ``"per_sample"``: for instance-wise risk minimisation, losses ``(B,)`` of independent
      samples (no batch statistics mixing them), or ``(B, T)`` (T losses per sample, m = B T;
      one vmapped backward pass of T cotangents): the ghost Gramian. Dense uses ``x @ W`` give
      ``(X X^T) * (D D^T)`` from activations and output cotangents captured in **one** backward
      pass of ``sum(losses)``, biases added after a broadcast give ``D`` summed, convolution
      kernels and embedding tables get per-sample gradients from their own op's VJP on the
      captured slices; they are found by reading the function's jaxpr, so any ordinary JAX
      function of ``(params, batch)`` works. Every other parameter (used twice, a scale, ...)
      falls back to per-sample gradients of that parameter alone. No ``has_aux``/``chunk_size``.
    * ``"layerwise"``: any m losses (flattened); one vmapped VJP carries the m unit cotangents
      to the output of every layer instead of to the parameters. A dense use ``y = x @ W`` then
      gives ``G_tu += sum(D_t * (X X^T) D_u)`` (or the rows ``X^T D_t`` when that is cheaper), a
      parameter used by one other equation gets its rows from that equation's VJP, the rest
      from the same vmapped VJP. Memory O(m * activations + the non-dense rows) instead of
      O(m * params); for few objectives on wide layers. No ``has_aux``/``chunk_size``.

    Losses of any shape are flattened to m (so ``(B, T)`` instance-wise multi-task losses give a
    ``B*T x B*T`` Gramian) by every method. ``wrt``: the leaves of ``args[argnums]`` to
    differentiate (see :func:`value_and_jacobian`).

    ``axis_name``: inside ``shard_map``, with the batch (the losses' first axis) split over
    that mesh axis, ``G`` is the global batch's (``D B`` rows, device after device) and the
    losses stay local. ``"per_sample"`` gathers the factors (activations and output
    cotangents), ``"jacobian"`` the local Jacobian's rows; the other two methods refuse it.
    Under ``jax.jit`` with sharded arguments no ``axis_name`` is needed: every method works.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> f = lambda p: jnp.array([p @ jnp.array([-1.0, 1.0]), p @ p])
    >>> losses, G = jd.value_and_gramian(f, method="columns")(jnp.array([1.0, 2.0]))
    >>> G
    Array([[ 2.,  2.],
           [ 2., 20.]], dtype=float32)
    """
    _check_method(method)
    if not isinstance(argnums, int):
        raise TypeError("value_and_gramian differentiates one argument: argnums must be an int.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}.")
    if axis_name is not None and method not in AXIS_METHODS:
        raise ValueError(
            f"axis_name needs method='per_sample' or 'jacobian' (the batch's rows gathered over "
            f"the devices); got method={method!r}."
        )
    if wrt is not None:
        return filter_argnum(
            lambda f: value_and_gramian(
                f, argnums, has_aux, method, chunk_size, axis_name=axis_name
            ),
            fun,
            argnums,
            wrt,
            "value_and_gramian",
        )
    if method in ("per_sample", "layerwise"):
        if has_aux or chunk_size is not None:
            raise ValueError(f"method={method!r} supports neither has_aux nor chunk_size.")

        def by_samples(*args, **kwargs):
            def f(x, *others):
                return fun(*others[:argnums], x, *others[argnums:], **kwargs)

            others = args[:argnums] + args[argnums + 1 :]
            if method == "layerwise":
                losses, G, _ = layerwise_parts(f, args[argnums], *others)
            else:
                losses, G, _ = per_sample_gramian_parts(
                    f, args[argnums], *others, axis_name=axis_name
                )
            return losses, G

        return by_samples
    if method == "jacobian":
        vj = value_and_jacobian(fun, argnums=argnums, has_aux=has_aux, chunk_size=chunk_size)

        def by_jacobian(*args, **kwargs):
            if axis_name is None:
                value, J = vj(*args, **kwargs)
                return value, gramian(J)
            # The parameters vary like the batch: the local losses' rows stay local.
            others = args[:argnums] + args[argnums + 1 :]
            args = (*args[:argnums], vary_like(args[argnums], others), *args[argnums + 1 :])
            value, J = vj(*args, **kwargs)
            return value, gramian(gather_rows(J, axis_name))

        return by_jacobian

    def by_columns(*args, **kwargs):
        def f(x):
            out = fun(*args[:argnums], x, *args[argnums + 1 :], **kwargs)
            return out if has_aux else (out, None)

        losses, jvp, aux = jax.linearize(f, args[argnums], has_aux=True)
        if losses.size == 0:
            raise ValueError("The function returned no losses (m = 0).")
        vjp = jax.linear_transpose(jvp, args[argnums])
        m = losses.size
        basis = vary_like(jnp.eye(m, dtype=losses.dtype).reshape((m, *losses.shape)), losses)

        def column(e):
            (v,) = vjp(e)
            return jnp.reshape(jvp(v), (m,))

        rows = replicated(jax.lax.map(column, basis, batch_size=chunk_size))
        G = 0.5 * (rows + rows.T)
        return ((losses, aux) if has_aux else losses), G

    return by_columns

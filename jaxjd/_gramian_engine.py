"""Gramian engines: ``G = J J^T`` of a vector of losses without keeping the Jacobian, and the
one-call weighted gradient (Gramian -> weights -> ``grad(w . losses)``), with partial JD."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ._ghost import (
    per_sample_gramian_parts,
    task_gramian_vjp,
    task_weighted_grad,
    weighted_grad_from_factors,
)
from ._jacobian import _given_state, value_and_jacobian
from ._tree import gramian

METHODS = ("jacobian", "columns", "per_sample", "layerwise")


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")


def value_and_gramian(
    fun: Callable,
    argnums: int = 0,
    has_aux: bool = False,
    method: str = "jacobian",
    chunk_size: int | None = None,
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
    ``B*T x B*T`` Gramian) by every method.

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
    if method in ("per_sample", "layerwise"):
        if has_aux or chunk_size is not None:
            raise ValueError(f"method={method!r} supports neither has_aux nor chunk_size.")

        def by_samples(*args, **kwargs):
            def f(x, *others):
                return fun(*others[:argnums], x, *others[argnums:], **kwargs)

            others = args[:argnums] + args[argnums + 1 :]
            if method == "layerwise":
                losses, G, _ = _layerwise_parts(f, args[argnums], *others)
            else:
                losses, G, _ = per_sample_gramian_parts(f, args[argnums], *others)
            return losses, G

        return by_samples
    if method == "jacobian":
        vj = value_and_jacobian(fun, argnums=argnums, has_aux=has_aux, chunk_size=chunk_size)

        def by_jacobian(*args, **kwargs):
            value, J = vj(*args, **kwargs)
            return value, gramian(J)

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
        basis = jnp.eye(m, dtype=losses.dtype).reshape((m, *losses.shape))

        def column(e):
            (v,) = vjp(e)
            return jnp.reshape(jvp(v), (m,))

        rows = jax.lax.map(column, basis, batch_size=chunk_size)
        G = 0.5 * (rows + rows.T)
        return ((losses, aux) if has_aux else losses), G

    return by_columns


def _layerwise_parts(fun, params, *args):
    """Losses, their Gramian and the factors for ``J^T w``, by :func:`task_gramian_vjp` with
    the unit cotangents of the (flattened) losses."""
    losses, pullback = task_gramian_vjp(fun, params, *args)
    if not isinstance(losses, jax.Array) or losses.size == 0:
        raise ValueError("method='layerwise' needs a non-empty array of losses.")
    m = losses.size
    basis = jnp.eye(m, dtype=losses.dtype).reshape((m, *losses.shape))
    G, factors = pullback(basis)
    return losses, G, factors


def value_and_weighted_grad(
    fun: Callable,
    weighting,
    *,
    method: str = "jacobian",
    gramian_filter: Any = None,
    has_aux: bool = False,
    chunk_size: int | None = None,
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

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> def losses(p, x):
    ...     return (x @ p) ** 2  # one loss per sample
    >>> step = jd.value_and_weighted_grad(losses, jd.upgrad_weighting())
    >>> values, w, g = step(jnp.array([1.0, -1.0]), jnp.array([[1.0, 0.0], [0.0, 2.0]]))
    >>> values.tolist(), w.shape, g.shape
    ([1.0, 4.0], (2,), (2,))
    """
    from .aggregation import AbstractWeighting

    _check_method(method)
    if not isinstance(weighting, AbstractWeighting):
        raise TypeError(
            "value_and_weighted_grad needs a jaxjd weighting (e.g. jd.upgrad_weighting()); got "
            f"{type(weighting).__name__}."
        )

    def weigh(G, state, key):
        w, new_state = weighting.update(G, _given_state(weighting, state), key=key)
        return jax.lax.stop_gradient(w), new_state

    def wrapped(params, *args, key=None, state=None):
        if method == "per_sample" and gramian_filter is None and not has_aux:
            # The captured factors give J^T w directly: no second backward pass.
            losses, G, factors = per_sample_gramian_parts(fun, params, *args)
            w, new_state = weigh(G, state, key)
            grad = weighted_grad_from_factors(w, factors)
            out = (losses, jnp.reshape(w, losses.shape), grad)
            return out if state is None else (*out, new_state)
        if method == "layerwise" and gramian_filter is None and not has_aux:
            losses, G, factors = _layerwise_parts(fun, params, *args)
            w, new_state = weigh(G, state, key)
            out = (losses, jnp.reshape(w, losses.shape), task_weighted_grad(w, factors))
            return out if state is None else (*out, new_state)
        if gramian_filter is None:

            def losses_of(p):
                return fun(p, *args)

            value, G = value_and_gramian(
                losses_of, has_aux=has_aux, method=method, chunk_size=chunk_size
            )(params)
        else:
            chosen, rest = eqx.partition(params, gramian_filter)
            if not jax.tree_util.tree_leaves(chosen):
                raise ValueError("gramian_filter selects no parameter.")

            def losses_of(p):
                return fun(eqx.combine(p, rest), *args)

            value, G = value_and_gramian(
                losses_of, has_aux=has_aux, method=method, chunk_size=chunk_size
            )(chosen)
        losses = value[0] if has_aux else value
        w, new_state = weigh(G, state, key)

        def weighted(p):
            out = fun(p, *args)
            out = out[0] if has_aux else out
            return jnp.sum(jnp.reshape(w, out.shape).astype(out.dtype) * out)

        grad = jax.grad(weighted)(params)
        out = (value, jnp.reshape(w, losses.shape), grad)
        return out if state is None else (*out, new_state)

    return wrapped

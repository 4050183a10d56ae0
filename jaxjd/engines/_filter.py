"""``wrt=``: differentiate only some leaves of a parameter pytree (as ``eqx.filter_grad`` and
``nnx.grad`` do), e.g. the float arrays of a model that also holds integer counters, PRNG keys
or Python objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax


def _split(tree, wrt, engine: str):
    diff, static = eqx.partition(tree, wrt)
    if not jax.tree_util.tree_leaves(diff):
        raise ValueError(f"{engine}: wrt selects no leaf of the parameters.")
    return diff, static


def filter_positions(build: Callable, funs: tuple, wrt: Any, engine: str) -> Callable:
    """``build(*funs)`` called on the leaves that ``wrt`` selects.

    ``funs[i]`` takes its parameters as argument 0 and is called, by the engine that ``build``
    makes, with ``args[i]`` (the engine's own call is ``engine(*params, *rest)``): each parameter
    pytree is split into the selected leaves (what the engine differentiates, and what its
    Jacobian, Gramian parts and gradients mirror, ``None`` elsewhere) and the rest, which is put
    back before each call of ``funs[i]``. ``wrt`` is an equinox filter spec: a callable on
    leaves (``eqx.is_inexact_array``) or a pytree prefix of booleans. ``None``: every leaf.
    """
    if wrt is None:
        return build(*funs)
    k = len(funs)

    def wrapped(*args, **kwargs):
        parts = [_split(p, wrt, engine) for p in args[:k]]
        rebuilt = [
            (lambda p, *a, _f=f, _s=static, **kw: _f(eqx.combine(p, _s), *a, **kw))
            for f, (_, static) in zip(funs, parts)
        ]
        return build(*rebuilt)(*(d for d, _ in parts), *args[k:], **kwargs)

    return wrapped


def filter_argnum(build: Callable, fun: Callable, argnums: int, wrt: Any, engine: str) -> Callable:
    """``build(fun)``, an engine differentiating ``args[argnums]``, on the leaves ``wrt``
    selects (see :func:`filter_positions`)."""
    if wrt is None:
        return build(fun)

    def wrapped(*args, **kwargs):
        diff, static = _split(args[argnums], wrt, engine)

        def inner(*a, **kw):
            return fun(*a[:argnums], eqx.combine(a[argnums], static), *a[argnums + 1 :], **kw)

        return build(inner)(*args[:argnums], diff, *args[argnums + 1 :], **kwargs)

    return wrapped

"""The scalarizer protocol: losses (any shape) -> one scalar to differentiate, with explicit state
and keys as for the aggregators."""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._typing import Scalar
from ..aggregation._abstract import EmptyState, _Method
from ..aggregation._fields import vector


class AbstractScalarizer(_Method):
    r"""Reduces a vector (or any array) of losses to one scalar: the loss-level counterpart of
    an aggregator (TorchJD's ``torchjd.scalarization``). ``jax.grad`` of the scalar is the
    update direction; nothing else is needed from the model.

    Subclasses implement ``_scalarize(values, state, key, params) -> (scalar, state)``; stateful
    ones set ``has_state = True`` and implement ``_init(values_like)``; random ones set
    ``draws_key = True``; trainable ones (UW, IMTL-L) set ``trainable = True`` and implement
    ``_init_params(values_like)``. Stateless ones can be called: ``scalarizer(losses, key=key)``.

    Trainable parameters live in the caller's params pytree, not in the scalarizer or the
    optimizer state: ``params = {"model": ..., "uw": uw.init_params(losses)}`` and
    ``uw(losses, params=params["uw"])`` inside the loss, so that ``jax.grad``, the optimizer and
    checkpointing treat them like any other weight (in an optax state ``jax.grad`` would not
    see them).
    """

    trainable: ClassVar[bool] = False

    def init_params(self, values_like: Any) -> Any:
        """The initial trainable parameters for losses shaped like ``values_like`` (``None``
        when the scalarizer learns nothing)."""
        return self._init_params(values_like) if self.trainable else None

    def _init_params(self, values_like: Any) -> Any:
        return None

    def init(self, values_like: Any) -> Any:
        """The initial state for losses shaped like ``values_like`` (an array or a
        ``jax.ShapeDtypeStruct``); ``EmptyState()`` when stateless."""
        return self._init(values_like) if self.has_state else EmptyState()

    def _init(self, values_like: Any) -> Any:
        return EmptyState()

    def update(
        self,
        values: Float[Array, "..."],
        state: Any,
        /,
        *,
        key: PRNGKeyArray | None = None,
        params: Any = None,
    ) -> tuple[Scalar, Any]:
        """``(scalar, new_state)`` for this step's losses (``params``: a trainable
        scalarizer's parameters)."""
        name = type(self).__name__
        values = _checked_values(values, name)
        if self.draws_key and key is None:
            raise ValueError(f"{name} draws random weights: pass key=.")
        if self.trainable and params is None:
            raise ValueError(
                f"{name} learns parameters: pass params= (made by {name.lower()}.init_params("
                "losses) and kept in your params pytree, so that jax.grad trains them)."
            )
        if not self.trainable and params is not None:
            raise ValueError(f"{name} has no trainable parameters; got params=.")
        return self._scalarize(values, state, key, params)

    def __call__(
        self,
        values: Float[Array, "..."],
        /,
        *,
        key: PRNGKeyArray | None = None,
        params: Any = None,
    ) -> Scalar:
        """The scalar of a stateless scalarizer."""
        self._refuse_stateful("scalar")
        return self.update(values, EmptyState(), key=key, params=params)[0]

    @abc.abstractmethod
    def _scalarize(self, values, state, key, params) -> tuple[Scalar, Any]:
        """``(scalar, new_state)`` from checked floating ``values``."""


def _checked_values(values, name):
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise TypeError(f"{name} scalarizes floating losses; got dtype {values.dtype}.")
    if values.size == 0:
        raise ValueError(f"{name} needs at least one loss; got an empty array.")
    return values


def same_shape(param, values, name: str, method: str):
    """``param`` as an array of ``values``' dtype, after checking (at trace time) that it has
    the shape of the losses, as TorchJD requires."""
    if param is None:
        return None
    if tuple(np.shape(param)) != tuple(values.shape):
        raise ValueError(
            f"{method}: {name} must have the shape of the losses, {tuple(values.shape)}; got "
            f"{tuple(np.shape(param))}."
        )
    return jnp.asarray(param, values.dtype)


def required_shape(param, values, name: str, method: str) -> Array:
    """:func:`same_shape` for a required parameter (never ``None``)."""
    out = same_shape(param, values, name, method)
    if out is None:  # the converter refuses None for required parameters
        raise ValueError(f"{method}: {name} is required.")
    return out


def array(name: str, *, optional: bool = True) -> Any:
    """A float array hyper-parameter with the shape of the losses (weights, reference point),
    stored as an array leaf; its shape is checked against the losses at trace time."""
    return vector(name, optional=optional, any_shape=True)

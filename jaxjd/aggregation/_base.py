"""The two shapes every method takes: a Weighting (Gramian -> weights) and an Aggregator
(Jacobian pytree -> update with the structure of one row)."""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._tree import accumulation_dtype, check_gramian, combine, gramian, num_objectives


class Weighting(eqx.Module):
    r"""Maps a Gramian :math:`G = J J^\top` (m x m) to weights :math:`w` (m,).

    Hyper-parameters are static fields, so a configured weighting is hashable: it can be closed
    over, or passed to ``jax.jit`` either as a static argument or as an ordinary (leafless)
    pytree argument.
    """

    needs_key: ClassVar[bool] = False

    def __call__(
        self, gramian: Float[Array, "m m"], /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        """Weights of the objectives whose Gramian is ``gramian``."""
        check_gramian(gramian)
        return _weigh_jit(self, gramian, key)

    @abc.abstractmethod
    def _weigh(self, gramian, key) -> Float[Array, " m"]:
        """The weights (traced once per configuration and shape)."""

    def weights_from_jacobian(
        self, jacobian: PyTree, /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        """Weights for a Jacobian pytree (forms the Gramian leaf by leaf)."""
        return self(gramian(jacobian), key=key)


@functools.partial(jax.jit, static_argnums=0)
def _weigh_jit(weighting, gramian, key):
    # Hyper-parameters are static, so eager calls compile once per (configuration, m, dtype)
    # and are then fast; inside a user's jit this simply inlines. Matrix products at full
    # precision: on GPUs the default float32 product is TF32 (10-bit mantissa), which breaks
    # exact solvers and the parity with TorchJD.
    with jax.default_matmul_precision("highest"):
        return weighting._weigh(gramian, key)


class StatefulWeighting(Weighting):
    """A weighting with explicit state, optax style: ``state = w.init(m)``, then
    ``weights, state = w.update(matrix, state)`` at every step (jit- and scan-friendly).
    Nothing is hidden in the object: a state can be saved, reset (``init`` again) or vmapped."""

    def __call__(self, gramian, /, *, key=None):
        raise TypeError(
            f"{type(self).__name__} is stateful: use state = w.init(num_objectives) and "
            "weights, state = w.update(matrix, state)."
        )

    def _weigh(self, gramian, key):  # pragma: no cover - never reached, __call__ refuses
        raise TypeError("stateful")

    @abc.abstractmethod
    def init(self, num_objectives: int, dtype=jnp.float32):
        """The initial state for ``num_objectives`` objectives."""

    def update(self, matrix, state, /, *, key=None):
        """``(weights, new_state)`` for this step's ``matrix``."""
        check_gramian(matrix)
        return _update_jit(self, matrix, state, key)

    @abc.abstractmethod
    def _update(self, matrix, state, key): ...


@functools.partial(jax.jit, static_argnums=0)
def _update_jit(weighting, matrix, state, key):
    with jax.default_matmul_precision("highest"):
        return weighting._update(matrix, state, key)


class ShapeWeighting(Weighting):
    """A weighting that only reads m (Mean, Sum, Constant, Random): it accepts a Gramian, and an
    aggregator built on it never forms one."""

    @abc.abstractmethod
    def _weights(self, m: int, dtype, key) -> Float[Array, " m"]: ...

    def _weigh(self, gramian, key):
        m = check_gramian(gramian)
        return self._weights(m, accumulation_dtype(jnp.result_type(gramian)), key)

    def weights_from_jacobian(self, jacobian, /, *, key=None):
        m = num_objectives(jacobian)
        leaves = jax.tree_util.tree_leaves(jacobian)
        return self._weights(m, accumulation_dtype(jnp.result_type(*leaves)), key)


class Aggregator(eqx.Module):
    r"""Maps a Jacobian pytree (leaves with a leading axis m) to an update with the structure of
    one row: ``aggregator(J)``. ``needs_key``: whether it draws from a PRNG ``key=``."""

    needs_key: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, jacobian: PyTree, /, *, key: PRNGKeyArray | None = None) -> PyTree:
        """The aggregated update."""


class GramianWeightedAggregator(Aggregator):
    r"""``A(J) = J^T w`` with ``w = weighting(J J^T)``: the Gramian pipeline.

    Because the weights depend on J only through its Gramian, the same weighting can be fed a
    Gramian from any engine, and the update formed as ``grad(w . losses)``.
    """

    weighting: Weighting

    @property
    def needs_key(self):  # type: ignore[override]
        return self.weighting.needs_key

    def weights(
        self, jacobian: PyTree, /, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        """The weights ``w`` such that ``self(J) == combine(w, J)``."""
        return self.weighting.weights_from_jacobian(jacobian, key=key)

    def __call__(self, jacobian, /, *, key=None):
        return combine(self.weights(jacobian, key=key), jacobian)


def as_static_vector(value, name: str) -> tuple[float, ...] | None:
    """Turns a concrete 1-D vector hyper-parameter into a hashable tuple of floats."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} is a hyper-parameter and must be concrete (a list, tuple or array known "
            "when the method is configured), not a traced value."
        )
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector; got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite; got {arr}.")
    return tuple(float(x) for x in arr)


def vector_for(values: Sequence[float], m: int, dtype, name: str) -> Array:
    if len(values) != m:
        raise ValueError(f"{name} has length {len(values)} but the input has m = {m} objectives.")
    return jnp.asarray(values, dtype=dtype)


def check_nonnegative(value: float, name: str) -> float:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0; got {value}.")
    return float(value)


def positive_int(value, name: str) -> int:
    """A positive integer hyper-parameter or size (``num_objectives``, ``n_iter``, ...)."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value}.")
    return int(value)


def check_positive(value: float, name: str) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}.")
    return float(value)


def build_or_apply(obj, first, **call_kwargs):
    """The dual spelling of every factory: ``f(**hyper)`` builds, ``f(x, **hyper)`` applies."""
    return obj if first is None else obj(first, **call_kwargs)


class StatefulAggregator(eqx.Module):
    r"""An aggregator with explicit state, optax style: ``state = agg.init(J)`` (``J`` may be an
    abstract Jacobian of ``jax.ShapeDtypeStruct`` leaves), then
    ``update, state = agg.update(J, state)`` at every step."""

    needs_key: ClassVar[bool] = False

    def __call__(self, jacobian, /, *, key=None):
        raise TypeError(
            f"{type(self).__name__} is stateful: use state = agg.init(jacobian) and "
            "update, state = agg.update(jacobian, state)."
        )

    @abc.abstractmethod
    def init(self, jacobian: PyTree, /):
        """The initial state for Jacobians shaped like ``jacobian`` (arrays or shape structs)."""

    @abc.abstractmethod
    def weights(self, jacobian: PyTree, state, /, *, key: PRNGKeyArray | None = None):
        """``(weights, new_state)``: the update is ``combine(weights, jacobian)``."""

    def update(self, jacobian: PyTree, state, /, *, key: PRNGKeyArray | None = None):
        """``(aggregated update, new_state)``."""
        w, state = self.weights(jacobian, state, key=key)
        return combine(w, jacobian), state


def abstract_rows(jacobian) -> tuple[int, jnp.dtype]:
    """``(m, accumulation dtype)`` of a Jacobian pytree of arrays or shape structs."""
    m = num_objectives(jacobian)
    leaves = jax.tree_util.tree_leaves(jacobian)
    return m, accumulation_dtype(jnp.result_type(*[leaf.dtype for leaf in leaves]))


class StatefulGramianAggregator(StatefulAggregator):
    r"""``A(J) = J^T w`` with ``w, state = weighting.update(J J^T, state)``."""

    weighting: StatefulWeighting

    @property
    def needs_key(self):  # type: ignore[override]
        return self.weighting.needs_key

    def init(self, jacobian, /):
        m, dtype = abstract_rows(jacobian)
        return self.weighting.init(m, dtype)

    def weights(self, jacobian, state, /, *, key=None):
        return self.weighting.update(gramian(jacobian), state, key=key)

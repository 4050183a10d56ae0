"""The shapes of the public API, as jaxtyping annotations.

``m`` is the number of objectives (rows of J), ``n`` the number of parameters. A Jacobian is a
pytree whose leaves share the leading axis m (what ``jax.jacrev`` of a vector of losses
returns); an update is shaped like one row of it (like the parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

__all__ = [
    "Gramian",
    "Jacobian",
    "Key",
    "Scalar",
    "State",
    "Update",
    "VectorLike",
    "Weights",
]

Jacobian: TypeAlias = PyTree[Float[Array, "m ..."]]
"""A Jacobian pytree: every leaf has the leading axis m; a plain (m, n) matrix is one leaf."""

Gramian: TypeAlias = Float[Array, "m m"]
"""``G = J J^T``: symmetric positive semi-definite, m x m."""

Weights: TypeAlias = Float[Array, " m"]
"""One weight per objective: ``update = J^T w``."""

Update: TypeAlias = PyTree[Float[Array, "..."]]
"""An update shaped like one row of the Jacobian (the parameters' structure)."""

Key: TypeAlias = PRNGKeyArray
"""A PRNG key (``jax.random.key``), for the methods that draw random numbers."""

State: TypeAlias = Any
"""A method's state: ``EmptyState()`` for stateless methods, a pytree of arrays otherwise."""

Scalar: TypeAlias = float | Float[ArrayLike, ""]
"""A number-valued hyper-parameter (a traced leaf under ``jit``: new values do not retrace)."""

VectorLike: TypeAlias = Float[ArrayLike, " m"] | Sequence[float]
"""A vector hyper-parameter of length m (preferences, fixed weights, leaks)."""

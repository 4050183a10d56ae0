"""Shared pieces of the dual-cone projection solvers."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class ProjectionInfo(NamedTuple):
    """What a dual-cone solver reports, one entry per right-hand side.

    Attributes:
        converged: the solver met its stopping test (exact KKT for ``"bpp"``, the tolerance for
            the iterative solvers) with finite values.
        iterations: iterations used.
        kkt_residual: the natural residual ``max_i |min(v_i - u_i, (G v)_i)|`` of the problem
            ``min v^T G v  s.t.  v >= u`` actually solved (after normalisation/regularisation),
            relative to ``max(1, max|u|) * max(diag G)``.
    """

    converged: Bool[Array, "*batch"]
    iterations: Int[Array, "*batch"]
    kkt_residual: Float[Array, "*batch"]


def kkt_residual(
    G: Float[Array, "m m"], u: Float[Array, " m"], v: Float[Array, " m"]
) -> Float[Array, ""]:
    """Scaled natural residual of the LCP ``s = v - u >= 0, Gv >= 0, s^T G v = 0``."""
    lam = G @ v
    s = v - u
    scale = jnp.maximum(jnp.max(jnp.diagonal(G)), jnp.finfo(G.dtype).tiny) * jnp.maximum(
        1.0, jnp.max(jnp.abs(u))
    )
    return jnp.max(jnp.abs(jnp.minimum(s, lam))) / scale


def default_tol(dtype) -> float:
    """Stopping tolerance of the iterative solvers on the scaled KKT residual."""
    return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5

"""qpax's primal-dual interior point method (optional extra: ``pip install "jaxjd[qpax]"``)."""

from __future__ import annotations

import importlib.util
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int

from ._base import AbstractSolver


def require_qpax() -> None:
    """Raises a clear ``ImportError`` when the optional qpax solver is not installed."""
    if importlib.util.find_spec("qpax") is None:
        raise ImportError(
            'The Qpax solver needs the optional qpax package: pip install "jaxjd[qpax]". '
            "The default solver needs nothing extra and is exact."
        )


class Qpax(AbstractSolver):
    """qpax's explicit interior point backend (Tracy & Manchester 2024).

    qpax floors its slacks at ``sqrt(eps)``, so it stops short of the exact answer: measured
    relative errors on the weights of 1e-9..1e-3 in float64 and up to 1e-1 in float32. Its
    answers are accepted as converged only when the KKT residual is below ``accept``.

    Args:
        tol: qpax's absolute ``solver_tol`` (default 1e-7 in float64, 1e-3 in float32).
        max_iter: interior-point iterations (default 100).
        accept: largest accepted KKT residual (default ``100 sqrt(eps)``: 1.5e-6 in float64,
            3.5e-2 in float32, where qpax's slack floor leaves about ``sqrt(eps)``).
    """

    tol: float | None = eqx.field(default=None, static=True)
    max_iter: int = eqx.field(default=100, static=True)
    accept: float | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        require_qpax()
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"tol must be > 0; got {self.tol}.")
        if int(self.max_iter) != self.max_iter or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer; got {self.max_iter}.")

    def acceptance(self, dtype: DTypeLike, m: int) -> float:
        if self.accept is not None:
            return self.accept
        return 100.0 * math.sqrt(float(jnp.finfo(dtype).eps))

    def solve(
        self, U: Float[Array, "k m"], G: Float[Array, "m m"]
    ) -> tuple[Float[Array, "k m"], Bool[Array, " k"], Int[Array, " k"]]:
        import qpax

        m = G.shape[0]
        tol = self.tol
        if tol is None:  # qpax floors its slacks at sqrt(eps): these are what it reaches
            tol = 1e-7 if jnp.finfo(G.dtype).bits >= 64 else 1e-3
        A = jnp.zeros((0, m), G.dtype)
        b = jnp.zeros((0,), G.dtype)
        q = jnp.zeros((m,), G.dtype)
        Gin = -jnp.eye(m, dtype=G.dtype)

        def one(u):
            # qpax relies on implicit promotion (bool + int, float ** int): it runs under JAX's
            # standard rules whatever the caller's, so strict-promotion users can use it too.
            with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
                x, _, _, _, converged, iters = qpax.solve_qp(
                    G, q, A, b, Gin, -u, backend="e", solver_tol=tol, max_iter=self.max_iter
                )
            return x.astype(G.dtype), jnp.asarray(converged, bool), jnp.asarray(iters, jnp.int32)

        return jax.vmap(one)(U)

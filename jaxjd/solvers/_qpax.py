r"""qpax's primal-dual interior point method, finished by a crossover to the exact answer
(optional extra: ``pip install "jaxjd[qpax]"``)."""

from __future__ import annotations

import importlib.util
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Bool, Float, Int

from ._base import AbstractSolver, kkt_residual
from ._bpp import BPP, _pivot_all, _residual_wide, refinement


def require_qpax() -> None:
    """Raises a clear ``ImportError`` when the optional qpax solver is not installed."""
    if importlib.util.find_spec("qpax") is None:
        raise ImportError(
            'The Qpax solver needs the optional qpax package: pip install "jaxjd[qpax]". '
            "The default solver needs nothing extra and is exact."
        )


class Qpax(AbstractSolver):
    r"""qpax's interior point (Tracy & Manchester 2024), then a crossover to the exact vertex.

    An interior point stays strictly inside ``v > u`` (qpax floors its slacks and multipliers at
    ``sqrt(eps)``), so its answer alone is only close. The crossover (standard in interior-point
    codes: Megiddo 1991; Wright, *Primal-Dual Interior-Point Methods*, 1997) reads the active set
    off it, with ``s = v - u`` and ``lambda = G v``, which the layer's unit diagonal and a
    rescaling of each right-hand side to ``max |u| = 1`` put in the same units:
    ``A = {i : lambda_i > s_i}`` (of two complementary quantities, the smaller is the one that
    vanishes). On the free set ``F`` it solves the KKT system exactly,

    ``G_FF v_F = -G_FA u_A,  v_A = u_A``,

    and checks ``v_F >= u_F`` and ``(G v)_A >= 0`` within rounding. Indices that fail are
    flipped by at most ``pivots`` steps of block principal pivoting, the default solver's steps
    and iterative refinement (:class:`BPP`): where the active set read off is right none is
    taken, and the weights are the default solver's to rounding. A lane still infeasible after
    them is reported ``converged=False``.

    Args:
        tol: qpax's ``solver_tol`` on the rescaled problem (default 1e-7 in float64; 1e-6 in
            float32, which the slack floor keeps qpax from reaching: it runs ``max_iter``
            steps, where its own float32 tolerance, 1e-3, leaves an active set that needs
            several pivoting steps).
        max_iter: interior-point steps (default 100 in float64, where about 10 are taken;
            15 in float32).
        pivots: pivoting steps after the crossover's solve (default 8; measured on the test
            families up to m = 64: at most 4).
        accept: largest accepted KKT residual (default: the default solver's,
            ``max(16 m eps, 1000 eps, sqrt(eps))``).

    ``ProjectionInfo.iterations`` counts the interior-point steps plus the pivoting steps.

    References: Tracy & Manchester, "On the differentiability of the primal-dual interior-point
    method", arXiv 2406.11749 (2024); Megiddo, "On finding primal- and dual-optimal bases",
    ORSA J. Computing 3(1) (1991).
    """

    tol: float | None = eqx.field(default=None, static=True)
    max_iter: int | None = eqx.field(default=None, static=True)
    pivots: int = eqx.field(default=8, static=True)
    accept: float | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        require_qpax()
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"tol must be > 0; got {self.tol}.")
        if self.max_iter is not None and (int(self.max_iter) != self.max_iter or self.max_iter < 1):
            raise ValueError(f"max_iter must be a positive integer; got {self.max_iter}.")
        if int(self.pivots) != self.pivots or self.pivots < 0:
            raise ValueError(f"pivots must be a non-negative integer; got {self.pivots}.")

    def acceptance(self, dtype: DTypeLike, m: int) -> float:
        if self.accept is not None:
            return self.accept
        return BPP().acceptance(dtype, m)

    def solve(
        self, U: Float[Array, "k m"], G: Float[Array, "m m"]
    ) -> tuple[Float[Array, "k m"], Bool[Array, " k"], Int[Array, " k"]]:
        # Each lane rescaled to max |u| = 1 (v is homogeneous in u): qpax's tolerance and its
        # floor are absolute, and only the active set is read off its answer.
        scale = jnp.max(jnp.abs(U), axis=1, keepdims=True)
        Un = U / jnp.where(scale > 0, scale, 1.0)
        X, iters = self._interior_point(Un, G)
        m = G.shape[0]
        tol = 4.0 * math.sqrt(m) * float(jnp.finfo(G.dtype).eps)

        # At most two rounds of pivoting (one compiled copy). The first starts from the active
        # set read off the interior point: active where the multiplier exceeds the slack (NaN
        # compares false: free). Pivoting stops once every multiplier is >= -4 m eps max|s|,
        # and on a nearly singular G a wrongly active index passes with a multiplier that
        # small and a slack far from zero (measured, float32, m = 48: (G v)_i = -2e-5 for a
        # true slack of 3e-3, 5e-4 on the weights). The second, only where some lane has one,
        # starts with every active index whose multiplier is negative beyond the rounding of
        # v itself freed, and its answer is kept where it converges with a smaller residual.
        def round_(state):
            r, free, V, ok, steps, _ = state
            V2, ok2, steps2 = self._pivot(U, G, free)
            first = r == 0
            take = first | (ok2 & (kkt_residual(G, U, V2) < kkt_residual(G, U, V)))
            V = jnp.where(take[:, None], V2, V)
            ok = jnp.where(first, ok2, ok | take)
            steps = jnp.where(take, steps + r + steps2, steps)
            zero = jnp.zeros((m,), G.dtype)
            lam = jax.vmap(_residual_wide, in_axes=(None, 0, None))(G, V, zero)
            flag = (V == U) & (lam < -tol * (jnp.abs(V) @ jnp.abs(G)))
            return r + 1, (V > U) | flag, V, ok, steps, first & jnp.any(flag)

        k = U.shape[0]
        start = (0, ~((X @ G) > (X - Un)), U, jnp.zeros((k,), bool), jnp.zeros_like(iters), True)
        _, _, V, ok, steps, _ = jax.lax.while_loop(lambda state: state[-1], round_, start)
        return V, ok, iters + steps

    def _pivot(self, U, G, free):
        """Block principal pivoting from the free sets ``free``, at most ``pivots`` steps, with
        the default solver's refinement: ``(V, converged, steps)``."""
        gather = jax.default_backend() == "cpu"
        refine, adaptive = refinement(G.dtype)
        V, ok, steps = _pivot_all(
            U, G, self.pivots, free=free, gather=gather, refine=refine, adaptive=adaptive
        )
        return V, ok, jnp.asarray(steps, jnp.int32)

    def _interior_point(self, U, G):
        import qpax

        m = G.shape[0]
        wide = jnp.finfo(G.dtype).bits >= 64
        tol = (1e-7 if wide else 1e-6) if self.tol is None else self.tol
        max_iter = (100 if wide else 15) if self.max_iter is None else self.max_iter
        A = jnp.zeros((0, m), G.dtype)
        b = jnp.zeros((0,), G.dtype)
        q = jnp.zeros((m,), G.dtype)
        Gin = -jnp.eye(m, dtype=G.dtype)

        def one(u):
            # qpax relies on implicit promotion (bool + int, float ** int): it runs under JAX's
            # standard rules whatever the caller's, so strict-promotion users can use it too.
            with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
                x, _, _, _, _, iters = qpax.solve_qp(
                    G, q, A, b, Gin, -u, backend="e", solver_tol=tol, max_iter=max_iter
                )
            return x.astype(G.dtype), jnp.asarray(iters, jnp.int32)

        return jax.vmap(one)(U)

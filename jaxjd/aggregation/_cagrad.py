"""CAGrad (Liu et al., NeurIPS 2021, Algorithm 1), solved in-graph (no cvxpy)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._linalg import project_onto_simplex_pairwise, scaled_norm
from .._tree import accumulation_dtype_of, combine
from .._typing import Scalar
from ..solvers import normalize_regularize
from ._abstract import AbstractWeighting, Aggregation, GramianWeightedAggregator
from ._config import _triangular_factor
from ._fields import as_dtype, choice, number, spelling, static_int, static_tol


def _rescale(value):
    if value not in (0, 1, 2) or isinstance(value, bool):
        raise ValueError(f"Invalid rescale={value!r}; expected 0, 1 or 2 (LibMTL's options).")
    return int(value)


class CAGradWeighting(AbstractWeighting):
    r"""Weights of CAGrad, as TorchJD computes them: with ``G_n = G / tr(G)`` (zeros when the
    trace is below ``norm_eps``), ``b = G_n 1/m`` and ``phi = c sqrt(1^T G_n 1) / m``, solve
    ``min_{w in simplex} b^T w + phi sqrt(w^T G_n w)``, then ``weights = 1/m + (phi / q) w`` with
    ``q = sqrt(w^T G_n w)`` (zeros when ``q < norm_eps``).

    The convex problem is solved by accelerated projected gradient on the simplex (FISTA with
    backtracking and adaptive restart; a sort-free O(m^2) projection) until the gradient mapping
    is below ``tol`` (default 1e-12 in float64, 1e-6 in float32) or its rounding floor, or
    ``max_iter`` iterations.

    The aggregator :class:`CAGrad` (``factor="qr"``, the default) runs the same solve on the
    triangular factor ``R`` of ``J^T = Q R`` (as ConFIG does) instead of ``G = R^T R``:
    ``q = |R w|`` then keeps J's precision. In float32 through ``G``, ``q^2`` near TorchJD's
    threshold (``q ~ 1e-4``, ``q^2 ~ 1e-8``) is lost in the rounding of ``w^T G w``: the
    threshold went the wrong way and the weights grew to ``1/q`` (TorchJD's non-conflict test
    failed 9x over its tolerance; TorchJD solves in float64). The factor also puts ``J``'s scale
    outside the solve: no over- or underflow of ``J J^T``.

    Args:
        c: the radius of the ball around the mean gradient (``c = 0``: the mean).
        norm_eps: the Gramian is divided by its trace, or zeroed when the trace is below this.
        tol: stopping tolerance of the inner solve (default by dtype).
        max_iter: iteration cap of the inner solve.
        rescale: LibMTL's option: ``0`` (default, TorchJD's) keeps the weights, ``1`` divides
            them by ``1 + c^2`` and ``2`` by ``1 + c`` (LibMTL's default is 1), so that the
            update's scale does not grow with ``c``.
        factor: for the aggregator: ``"qr"`` (default; J's triangular factor) or ``"gramian"``
            (``J J^T``: one matrix product instead of a QR, as exact in float64). A weighting
            given a Gramian always uses it.

    Reference: Liu et al., "Conflict-averse gradient descent for multi-task learning",
    NeurIPS 2021.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> import numpy as np
    >>> G = jnp.array([[18.0, -22.0], [-22.0, 38.0]])
    >>> np.round(np.asarray(jd.cagrad_weighting(G, c=0.5), float), 4)
    array([0.7041, 0.5   ])
    """

    c: Scalar = number("c", check="nonnegative")
    norm_eps: Scalar = number("norm_eps", 1e-4, check="nonnegative")
    tol: float | None = static_tol("tol")
    max_iter: int = static_int("max_iter", 20_000)
    rescale: int = eqx.field(static=True, default=0, converter=_rescale)
    factor: str = choice("factor", "qr", ("qr", "gramian"))

    def _weigh(self, G, state, key):
        norm_eps = as_dtype(self.norm_eps, G.dtype)
        Gn = normalize_regularize(G, norm_eps, jnp.zeros((), G.dtype))

        def norm(w):
            return jnp.sqrt(jnp.maximum(w @ Gn @ w, 0.0))

        return self._solve(lambda w: Gn @ w, norm, G.shape[0], G.dtype), state

    def weights_from_factor(
        self, R: Float[Array, "m m"], log2_scale: Float[Array, ""]
    ) -> Float[Array, " m"]:
        """The weights from ``R`` (m x m) with ``R^T R = 2^log2_scale J J^T``: the solve on
        ``R / |R|_F`` (TorchJD's ``G / tr(G)``), ``q = |R w| / |R|_F``; ``tr(J J^T)`` below
        ``norm_eps`` (compared in logarithms: it may be out of range) gives zeros; a
        non-finite ``R`` NaN."""
        dtype = R.dtype
        frob = scaled_norm(R)
        log2_trace = 2.0 * jnp.log2(frob) - log2_scale
        norm_eps = as_dtype(self.norm_eps, dtype)
        keep = (frob > 0) & (log2_trace > jnp.log2(norm_eps))
        Rn = jnp.where(keep, R / jnp.where(keep, frob, 1.0), 0.0)
        m = R.shape[1]
        w = self._solve(lambda w: Rn.T @ (Rn @ w), lambda w: jnp.linalg.norm(Rn @ w), m, dtype)
        return jnp.where(jnp.all(jnp.isfinite(R)), w, jnp.nan)

    def _solve(self, apply, norm, m, dtype):
        """The weights from the normalised Gramian's product ``apply(w) = G_n w`` and
        ``norm(w) = sqrt(w^T G_n w)``."""
        ones = jnp.full((m,), 1.0 / m, dtype)
        b = apply(ones)
        phi = as_dtype(self.c, dtype) * norm(ones)
        tiny = jnp.finfo(dtype).tiny
        tol = self.tol if self.tol is not None else (1e-12 if dtype == jnp.float64 else 1e-6)

        def f(w):
            return b @ w + phi * norm(w)

        def grad(w):
            q = jnp.maximum(norm(w), jnp.sqrt(tiny))
            return b + phi * apply(w) / q

        def cond(state):
            _, _, _, _, it, gap = state
            return (gap > tol) & (it < self.max_iter)

        def body(state):
            w, y, t, L, it, _ = state
            gy, fy = grad(y), f(y)

            def bt_cond(L):
                z = project_onto_simplex_pairwise(y - gy / L)
                d = z - y
                return (f(z) > fy + gy @ d + 0.5 * L * d @ d + 1e-15 * jnp.abs(fy)) & (L < 1e30)

            L = jax.lax.while_loop(bt_cond, lambda L: 2.0 * L, L)
            w_new = project_onto_simplex_pairwise(y - gy / L)
            restart = f(w_new) > f(w)
            t_new = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)))
            y_new = jnp.where(restart, w, w_new + ((t - 1.0) / t_new) * (w_new - w))
            w_new = jnp.where(restart, w, w_new)
            step = project_onto_simplex_pairwise(w_new - grad(w_new) / L)
            gap = jnp.max(jnp.abs(w_new - step)) * L
            # The gradient mapping cannot fall below the rounding of the projection (an ulp of
            # w, times L): stop there too (float32 would otherwise run max_iter iterations).
            gap = jnp.where(gap <= 16 * jnp.finfo(dtype).eps * L, 0.0, gap)
            return w_new, y_new, jnp.where(restart, 1.0, t_new), 0.9 * L, it + 1, gap

        L0 = jnp.asarray(1.0, dtype)
        one = jnp.asarray(1.0, dtype)
        init = (ones, ones, one, L0, jnp.asarray(0), jnp.asarray(jnp.inf, dtype))
        w, *_ = jax.lax.while_loop(cond, body, init)
        q = norm(w)
        ok = q >= as_dtype(self.norm_eps, dtype)
        w = jnp.where(ok, ones + (phi / jnp.where(ok, q, 1.0)) * w, 0.0)
        c = as_dtype(self.c, dtype)
        divisor = (1.0, 1.0 + c * c, 1.0 + c)[self.rescale]
        return w / divisor


class CAGrad(GramianWeightedAggregator):
    """CAGrad aggregator: ``J^T w`` with :class:`CAGradWeighting` weights (TorchJD's ``CAGrad``)."""

    weighting_class = CAGradWeighting

    def _aggregate(self, jacobian, state, key, losses=None):
        weighting = self.weighting
        if not isinstance(weighting, CAGradWeighting) or weighting.factor == "gramian":
            return super()._aggregate(jacobian, state, key, losses)
        leaves = jax.tree_util.tree_leaves(jax.lax.stop_gradient(jacobian))
        dtype = accumulation_dtype_of(*leaves)
        R, e = _triangular_factor(leaves, dtype)  # of J scaled by 2^-e
        w = _weights_from_factor(weighting, R, (-2 * e).astype(dtype))
        return Aggregation(combine(w, jacobian), w, state)


@eqx.filter_jit
def _weights_from_factor(weighting, R, log2_scale):
    # Jitted so that eager calls compile the solve once per (m, dtype) (its loops op by op take
    # seconds); inside a user's jit this inlines.
    with jax.default_matmul_precision("highest"):
        return weighting.weights_from_factor(R, log2_scale)


cagrad = spelling(CAGrad, "cagrad", reads="jacobian")
cagrad_weighting = spelling(CAGradWeighting, "cagrad_weighting", reads="gramian")

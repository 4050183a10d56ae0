"""GeometricMean (GLS), STCH, COSMOS and PBI: non-linear scalarizations of the losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from .._typing import Scalar
from ..aggregation._fields import as_dtype, number
from ._abstract import AbstractScalarizer, array, required_shape, same_shape


class GeometricMean(AbstractScalarizer):
    """``exp(mean_i log L_i)``, the geometric mean of non-negative losses (GLS: Chennupati et al.,
    "MultiNet++", CVPR Workshops 2019; TorchJD's ``GeometricMean``). A zero loss gives 0; a
    negative loss gives NaN (TorchJD raises, which a jitted function cannot do on a value).
    """

    def _scalarize(self, values, state, key, params):
        return jnp.exp(jnp.mean(jnp.log(values))), state


class STCH(AbstractScalarizer):
    r"""Smooth Tchebycheff: ``mu log sum_i exp(lambda_i (L_i - z_i) / mu)``, a smooth upper bound
    of ``max_i lambda_i (L_i - z_i)`` within ``mu log m`` of it (Lin et al., "Smooth Tchebycheff
    scalarization for multi-objective optimization", ICML 2024; TorchJD's ``STCH``). Computed
    around the largest term, so that a small ``mu`` never overflows.

    Args:
        mu: the smoothing ``mu > 0``.
        weights: the preference ``lambda`` (the losses' shape; default ``1 / numel``).
        reference: the ideal point ``z`` (the losses' shape; default 0).
    """

    mu: Scalar = number("mu", check="positive")
    weights: ArrayLike | None = array("weights")
    reference: ArrayLike | None = array("reference")

    def _scalarize(self, values, state, key, params):
        mu = as_dtype(self.mu, values.dtype)
        w = same_shape(self.weights, values, "weights", "STCH")
        w = jnp.full_like(values, 1.0 / values.size) if w is None else w
        z = same_shape(self.reference, values, "reference", "STCH")
        y = w * (values if z is None else values - z)
        top = jax.lax.stop_gradient(jnp.max(y))  # the value and gradient do not depend on it
        return mu * jax.nn.logsumexp(((y - top) / mu).ravel()) + top, state


class COSMOS(AbstractScalarizer):
    r"""``sum_i r_i L_i - lambda cos(r, L)``: a linear scalarization rewarding losses aligned
    with the preference ``r`` (Ruchte & Grabocka, "Scalable Pareto front approximation for deep
    multi-objective learning", ICDM 2021; TorchJD's ``COSMOS``, whose cosine divides by
    ``max(|r| |L|, 1e-8)`` as ``torch.cosine_similarity`` does). Conditioning the model on ``r``
    (the rest of the paper's method) is the user's.

    Args:
        lambda_: the penalty ``lambda >= 0``.
        weights: the preference ``r`` (the losses' shape); resample it (Dirichlet) every step to
            trace the Pareto front.
    """

    lambda_: Scalar = number("lambda_", check="nonnegative")
    weights: ArrayLike = array("weights", optional=False)

    def _scalarize(self, values, state, key, params):
        r = required_shape(self.weights, values, "weights", "COSMOS")
        lam = as_dtype(self.lambda_, values.dtype)
        dot = jnp.sum(r * values)
        norms = jnp.linalg.norm(r.ravel()) * jnp.linalg.norm(values.ravel())
        return dot - lam * dot / jnp.maximum(norms, 1e-8), state


class PBI(AbstractScalarizer):
    r"""Penalty-based boundary intersection: with ``f = L - z`` and ``u = w / |w|``,
    ``d1 = f . u``, ``d2 = |f - d1 u|`` (with ``1e-12`` under the square root, so that the
    gradient stays finite on the preference line), the scalar ``d1 + theta d2`` (Zhang & Li,
    "MOEA/D", IEEE TEC 2007; TorchJD's ``PBI``).

    Args:
        theta: the penalty ``theta >= 0`` on the distance to the preference line.
        weights: the preference ``w`` (the losses' shape, non-negative).
        reference: the ideal point ``z`` (default 0).
    """

    theta: Scalar = number("theta", check="nonnegative")
    weights: ArrayLike = array("weights", optional=False)
    reference: ArrayLike | None = array("reference")

    def _scalarize(self, values, state, key, params):
        w = required_shape(self.weights, values, "weights", "PBI").ravel()
        z = same_shape(self.reference, values, "reference", "PBI")
        f = (values if z is None else values - z).ravel()
        u = w / jnp.linalg.norm(w)
        d1 = f @ u
        perpendicular = f - d1 * u
        d2 = jnp.sqrt(perpendicular @ perpendicular + 1e-12)
        return d1 + as_dtype(self.theta, values.dtype) * d2, state

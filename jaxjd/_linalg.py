"""Small dense linear algebra shared by several methods: simplex projections and
the eigenpairs of a Gramian (from itself or from a triangular factor)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._spmd import eigh, svd


def scaled_norm(x):
    """``|x|_F`` without squaring raw entries (``x / max|x|`` first): 1e-20 squared is 0 and
    1e20 squared is Inf in float32."""
    top = jnp.max(jnp.abs(x))
    return top * jnp.linalg.norm(x / jnp.where(top > 0, top, 1.0))


def project_onto_simplex(y):
    """Euclidean projection onto the probability simplex (sort-based, jit-friendly)."""
    m = y.shape[0]
    u = jnp.sort(y)[::-1]
    # Sequential partial sums (not a parallel prefix): the same rounding as a running sum.
    css = jax.lax.scan(lambda c, x: (c + x, c + x), jnp.zeros((), y.dtype), u)[1]
    k = jnp.arange(1, m + 1, dtype=y.dtype)
    ok = u - (css - 1.0) / k > 0
    rho = jnp.max(jnp.where(ok, jnp.arange(m), 0))
    count = (rho + 1).astype(y.dtype)
    theta = jnp.where(rho == m - 1, (jnp.sum(y) - 1.0) / m, (css[rho] - 1.0) / count)
    return jnp.maximum(y - theta, 0.0)


def project_onto_simplex_pairwise(y):
    """The same projection without a sort (slow in XLA on CPU): with ``S_i`` the sum and ``c_i``
    the number of entries ``>= y_i``, ``theta = max_i (S_i - 1) / c_i`` (the maximum of the
    sorted partial-sum criterion is reached at the end of a group of ties). O(m^2), vectorised."""
    ge = (y[None, :] >= y[:, None]).astype(y.dtype)
    theta = jnp.max((ge @ y - 1.0) / jnp.sum(ge, axis=1))
    return jnp.maximum(y - theta, 0.0)


EPS64 = float(np.finfo(np.float64).eps)


def gramian_eigen(G):
    """``(l, V, keep)``: the eigenpairs of a symmetric PSD ``G`` and the kept ones,
    ``l > m eps max(l)`` (``torch.linalg.pinv``'s cut-off in G's dtype)."""
    m = G.shape[0]
    lam, V = eigh(0.5 * (G + G.T))
    keep = lam > m * jnp.finfo(G.dtype).eps * jnp.max(lam)
    return lam, V, keep


def factor_eigen(R):
    """``(l, V, keep)``: the eigenpairs of ``G = R^T R`` from the SVD of the factor ``R`` (m x
    m), so that they carry ``cond(R)``, not its square. Kept: ``l > m eps_64 max(l)`` (the
    Gramian's cut-off in float64, :func:`gramian_eigen`) where ``R``'s dtype resolves it,
    ``s > m eps s_max``: float32 then keeps ``s`` down to ``5e-7 s_max`` at m = 4, where a
    float32 Gramian loses everything below ``7e-4 s_max``."""
    m = R.shape[1]
    _, s, Vt = svd(R)
    top = jnp.max(s)
    keep = (s > m * jnp.finfo(R.dtype).eps * top) & (s * s > m * EPS64 * top * top)
    return s * s, Vt.T, keep


def power_of_two_scaled(G, even=False):
    """``(2^-e G, e, usable)``: ``G`` scaled exactly (by a power of two) so that ``max |G_ij|``
    is in ``[1/2, 1)`` (``[1/4, 1)`` with ``even``: ``e`` even, so that ``2^(e/2)`` is a power
    of two too), and whether ``G`` has full precision: ``max |G_ij|`` is 0 or at least
    ``tiny / eps`` (9.9e-32 in float32, 2.0e-292 in float64). Below that, ``J J^T`` formed in
    the dtype has products under the normal range (subnormal, or flushed to 0 as XLA does on
    the CPU) and its entries have lost precision. The tests read the bits: a flushing backend
    compares a subnormal number as 0. ``e = 0`` where ``G`` is 0, unusable or not finite."""
    dtype = G.dtype
    info = jnp.finfo(dtype)
    uint = jnp.uint32 if info.bits == 32 else jnp.uint64

    def bits_of(x):
        return jax.lax.bitcast_convert_type(jnp.asarray(x, dtype), uint)

    # |x| as bits: their order is the order of the values (NaN above Inf)
    top = jnp.max(bits_of(G) & jnp.asarray((1 << (info.bits - 1)) - 1, uint))
    low, high = bits_of(float(info.tiny) / float(info.eps)), bits_of(info.max)
    usable = (top == 0) | (top >= low)
    normal = (top >= low) & (top <= high)
    _, e = jnp.frexp(jnp.where(normal, jax.lax.bitcast_convert_type(top, dtype), 1.0))
    e = jnp.where(normal, e, 0)
    if even:
        e = e + e % 2
    # Two factors, each a normal number (2^-e alone can be subnormal: 0 where flushed).
    half = e // 2
    one = jnp.ones((), dtype)
    return G * jnp.ldexp(one, -half) * jnp.ldexp(one, half - e), e, usable

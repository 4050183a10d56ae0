"""Weightings called on a Gramian near or below float32's normal range: G = (c J)(c J)^T formed
in float32 for c = 1 .. 1e-22. Each weighting scales G by a power of two first (exact), so
float32 gives float64's weights on the same G; where max |G_ij| is below tiny / eps
(9.9e-32: the products were subnormal, precision is lost) it gives NaN. Before, Aligned-MTL,
IMTL-G, FairGrad and MGDA returned finite weights off by up to 100% (c >= 1e-19).

One jitted, vmapped program per weighting and dtype (all inputs 4 x 4)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd

SCALES = (1.0, 1e-5, 1e-10, 1e-15, 1e-19, 1e-20, 1e-21, 1e-22)
LOST = float(np.finfo(np.float32).tiny / np.finfo(np.float32).eps)  # 9.9e-32
# Relative tolerances, float32's accuracy at every scale (c = 1 as c = 1e-15): the
# eigendecompositions to eps cond(G) (1.2e-4 measured on the rows scaled 0.1 .. 10, 5e-6 on
# the Gaussians); FairGrad's Newton stops at a float32 residual of 1e-6 (5e-4 measured).
WEIGHTINGS = {  # the first runs by default (tests/budget.py), the others in the slow sweep
    "imtl_g": (jd.imtl_g_weighting, 3e-4),
    "aligned_mtl": (lambda: jd.aligned_mtl_weighting(scale_mode="median"), 3e-4),
    "fairgrad": (lambda: jd.fairgrad_weighting(alpha=1.0), 1e-3),
    "mgda": (jd.mgda_weighting, 1e-4),
}


def _jacobians():
    """4 x 6 Gaussians and rows scaled 0.1 .. 10 (a Gramian of condition ~1e4: float32
    resolves it), seeds 0 .. 9."""
    out = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        out.append(rng.standard_normal((4, 6)))
        out.append(rng.standard_normal((4, 6)) * np.logspace(-1, 1, 4)[:, None])
    return out


@functools.cache
def _gramians():
    """``(c J)(c J)^T`` in float32 with gradual underflow (NumPy), every J and scale."""
    Gs = []
    for J in _jacobians():
        for c in SCALES:
            cJ = np.float32(c) * J.astype(np.float32)
            Gs.append(cJ @ cJ.T)
    return np.stack(Gs)


@functools.cache
def _program(name, dtype):
    weighting = WEIGHTINGS[name][0]()
    return jax.jit(jax.vmap(weighting))


def _weights(name, Gs, dtype):
    """The weights of every G, through one program per weighting and dtype (the batch padded
    to the sweep's size)."""
    batch = len(_gramians())
    padded = np.concatenate([Gs, np.repeat(Gs[:1], batch - len(Gs), axis=0)])
    with jax.enable_x64(dtype == "float64"):
        w = _program(name, dtype)(jnp.asarray(padded, dtype))
        return np.asarray(w, np.float64)[: len(Gs)]


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_float32_gives_float64s_weights_or_nan(name):
    G32 = _gramians()
    w32 = _weights(name, G32, "float32")
    w64 = _weights(name, G32.astype(np.float64), "float64")  # the same G, exactly
    tol = WEIGHTINGS[name][1]
    top = np.abs(G32).max(axis=(1, 2)).astype(np.float64)
    answered = 0
    for a, b, t in zip(w32, w64, top):
        if t == 0:  # underflowed to an exact 0 (J = 0 to float32): not this test's subject
            continue
        if t < LOST:
            assert np.all(np.isnan(a)), (name, t, a)
            continue
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), (name, t)
        assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), (name, t, a, b)
        answered += 1
    # every J answered at c = 1 .. 1e-15 (G ~ 1e-30: scaled back into range); NaN from 1e-19
    assert answered == 20 * 4


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_power_of_two_scaling_is_exact(name, x64):
    """w(4^k G) = 4^(k p) w(G) bit for bit (p = 0; FairGrad with alpha = 1: p = -1/2), from
    4^-450 (G ~ 1e-271) to 4^450."""
    G = _gramians()[:: len(SCALES)][:4].astype(np.float64)  # c = 1, four Jacobians
    ks = (-450, -20, 0, 20, 450)
    Gs = np.concatenate([G * 4.0**k for k in ks])
    w = _weights(name, Gs, "float64").reshape(len(ks), 4, 4)
    p = 0.0 if name != "fairgrad" else -0.5
    for i, k in enumerate(ks):
        np.testing.assert_array_equal(w[i], w[ks.index(0)] * 2.0 ** (2 * k * p))

"""Checks that need an accelerator (``-m gpu`` marks them; skipped on a CPU-only machine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd
from jaxjd._families import family_matrices
from jaxjd.solvers import BPP

pytestmark = pytest.mark.gpu


def test_auto_runs_the_dense_lane_loop_at_full_precision():
    """On an accelerator the default solver advances every lane in one batched loop (no
    gathers) and traces its products at full float32 precision (TF32 made BPP cycle)."""
    J = jnp.asarray(family_matrices(64, 1000, (0,))[0][2], jnp.float32)
    G = J @ J.T
    text = jax.jit(lambda G: jd.upgrad_weighting()(G)).lower(G).as_text()
    assert "HIGHEST" in text
    w, info = jd.upgrad_weighting().solve(G)
    assert bool(info.converged.all()) and float(info.kkt_residual.max()) < 1e-4
    assert bool(jnp.isfinite(w).all())


@pytest.mark.parametrize("m", [64, 128])
def test_every_family_converges_in_float32(m):
    for name, seed, J in family_matrices(m, 2000, (0, 1)):
        J = jnp.asarray(J, jnp.float32)
        _, info = jd.upgrad_weighting().solve(J @ J.T)
        assert bool(info.converged.all()), (name, seed)
        # converged means a residual within the solver's acceptance, sqrt(eps) in float32
        # (measured: below 1e-4 on an H100, 1.3e-4 on near_duplicates at m = 128 on an H200)
        assert float(info.kkt_residual.max()) < BPP().acceptance(jnp.float32, m), (name, seed)


def test_vmapped_weighting_converges_in_float32():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((512, 16, 40)) - 0.3 * rng.standard_normal((512, 1, 40))
    Gs = jnp.asarray(A @ A.transpose(0, 2, 1), jnp.float32)
    w, info = jax.jit(jax.vmap(jd.upgrad_weighting().solve))(Gs)
    assert bool(info.converged.all())
    ref = np.stack([np.asarray(jd.upgrad_weighting()(Gs[b])) for b in range(0, 512, 97)])
    np.testing.assert_allclose(np.asarray(w)[::97], ref, rtol=1e-4, atol=1e-5)

"""Solver objects, string aliases, a user's solver, and the layer's truthful report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd


def test_aliases_and_objects():
    assert isinstance(jd.solvers.as_solver("auto"), jd.solvers.Auto)
    assert jd.solvers.as_solver("nesterov_pgd", tol=1e-8).tol == 1e-8
    assert jd.solvers.as_solver("bpp", max_iter=7).max_iter == 7
    with pytest.raises(ValueError, match="exact and takes no tol"):
        jd.solvers.as_solver("bpp", tol=1e-3)
    with pytest.raises(ValueError, match="belong to the solver object"):
        jd.solvers.as_solver(jd.solvers.BPP(), tol=1e-3)
    with pytest.raises(ValueError, match="Unknown solver"):
        jd.upgrad(solver="quadprog")
    with pytest.raises(ValueError, match="positive integer"):
        jd.solvers.NesterovPGD(max_iter=0)
    # Hashable configuration: equal objects, one compilation.
    assert jd.upgrad(solver=jd.solvers.BPP()) == jd.upgrad(solver="bpp")


class _NeverConverges(jd.solvers.AbstractSolver):
    def solve(self, U, G):
        k = U.shape[0]
        return U, jnp.zeros((k,), bool), jnp.zeros((k,), jnp.int32)


def test_failed_solve_gives_nan_weights_and_is_reported():
    G = jnp.array([[1.0, -0.5], [-0.5, 1.0]])
    _, info = jd.upgrad_weighting(solver=_NeverConverges()).solve(G)
    assert not bool(info.converged.any())
    assert bool(jnp.isnan(jd.upgrad_weighting(solver=_NeverConverges())(G)).all())
    J = jnp.array([[1.0, 0.0], [-0.5, 1.0]])
    assert bool(jnp.isnan(jd.upgrad(J, solver=_NeverConverges())).all())


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_kkt_residual_is_scale_invariant_and_pgd_stops_truthfully(scale, x64):
    """Issue #11 (c): nesterov_pgd on 1e20 G stopped after a few steps with converged = True."""
    rng = np.random.default_rng(0)
    J = rng.standard_normal((8, 20)) + rng.choice([-1.5, 1.0], size=(8, 1)) * rng.standard_normal(
        20
    )
    G = jd.normalize_regularize(jd.gramian(jnp.asarray(J)), 1e-4, 1e-4)
    U = jnp.eye(8) / 8
    exact, _ = jd.project_onto_dual_cone(U, G)
    V, info = jd.project_onto_dual_cone(U, G * scale, solver="nesterov_pgd")
    assert bool(info.converged.all())
    np.testing.assert_allclose(V, exact, atol=1e-6 * float(jnp.abs(exact).max()))
    ref = jd.kkt_residual(G, U, V)
    np.testing.assert_allclose(info.kkt_residual, ref, rtol=1e-4)  # rounding of G v


def test_tiny_rows_are_not_drowned_by_the_ridge():
    """Issue #11 (b): float32 rows scaled 1e-2..1e2 with reg_eps = 0 used to be ignored (the
    ridge was relative to the largest diagonal); equilibration solves every row in its units."""
    rng = np.random.default_rng(1)
    m = 16
    J = rng.standard_normal((m, 40)) + rng.choice([-1.5, 1.0], size=(m, 1)) * rng.standard_normal(
        40
    )
    J *= np.logspace(-2, 2, m)[:, None]
    Jf = jnp.asarray(J, jnp.float32)
    d = jd.upgrad(Jf, reg_eps=0.0)
    assert bool(jnp.isfinite(d).all())
    # Non-conflicting, each row in its own units.
    cos = (J @ np.asarray(d, np.float64)) / (np.linalg.norm(J, axis=1) * np.linalg.norm(d))
    assert cos.min() >= -1e-4


def test_layer_uses_full_precision_products():
    """On GPUs the default float32 product is TF32; the layer traces under 'highest'."""
    G = jnp.array([[2.0, -1.0], [-1.0, 2.0]])
    text = jax.jit(lambda G: jd.project_onto_dual_cone(jnp.eye(2), G)[0]).lower(G).as_text()
    assert "HIGHEST" in text or "highest" in text

"""The QP layer under vmap: the batching rule of BPP (one path per batch, the full-size one only
when some Gramian needs it), folding an unbatched Gramian into lanes, and no deadlock of jaxlib's
CPU thread pool on large batches."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd


def gramians(B, m, seed=0, ill=()):
    rng = np.random.default_rng(seed)
    Gs = []
    for b in range(B):
        A = rng.standard_normal((m, 3 * m)) - 0.3 * rng.standard_normal((1, 3 * m))
        if b in ill:  # near-duplicate rows: G too ill-conditioned for the half-size path
            A[1] = A[0] + 1e-6 * rng.standard_normal(3 * m)
        Gs.append(A @ A.T)
    return np.stack(Gs)


@pytest.mark.parametrize(
    "ill", [(), (2,), (0, 2, 3)], ids=["well_conditioned", "one_ill_conditioned", "three_ill"]
)
def test_vmapped_projection_equals_the_loop(ill, x64):
    """Also with three Gramians for the full-size path, which the CPU's program runs
    ``ceil(5 / 8) = 1`` Gramian at a time: three chunks, each answer scattered to its place."""
    Gs = jnp.asarray(gramians(5, 20, ill=ill))
    U = jnp.eye(20)
    V, info = jax.jit(jax.vmap(lambda G: jd.project_onto_dual_cone(U, G)))(Gs)
    for b in range(5):
        Vb, info_b = jd.project_onto_dual_cone(U, Gs[b])
        np.testing.assert_allclose(V[b], Vb, rtol=1e-9, atol=1e-9 * float(jnp.abs(Vb).max()))
        assert bool(info.converged[b].all()) and bool(info_b.converged.all())
    assert float(info.kkt_residual.max()) < 1e-12


def test_vmap_over_right_hand_sides_with_one_gramian(x64):
    """An unbatched G: the batch of U is folded into more lanes of one problem."""
    G = jnp.asarray(gramians(1, 24)[0])
    rng = np.random.default_rng(1)
    U = jnp.asarray(rng.standard_normal((3, 5, 24)))
    V, info = jax.jit(jax.vmap(lambda u: jd.project_onto_dual_cone(u, G)))(U)
    ref, _ = jd.project_onto_dual_cone(U.reshape(15, 24), G)
    np.testing.assert_allclose(V.reshape(15, 24), ref, rtol=1e-10, atol=1e-12)
    assert V.shape == (3, 5, 24) and info.converged.shape == (3, 5)
    assert bool(info.converged.all())


def test_vmap_of_vmap_of_the_projection(x64):
    Gs = jnp.asarray(gramians(6, 16, ill=(4,))).reshape(2, 3, 16, 16)
    U = jnp.eye(16)
    V, info = jax.vmap(jax.vmap(lambda G: jd.project_onto_dual_cone(U, G)))(Gs)
    for i in range(2):
        for j in range(3):
            ref, _ = jd.project_onto_dual_cone(U, Gs[i, j])
            atol = 1e-9 * float(jnp.abs(ref).max())
            np.testing.assert_allclose(V[i, j], ref, rtol=1e-9, atol=atol)
    assert bool(info.converged.all())


def test_large_vmapped_batch_finishes_on_the_cpu():
    """jaxlib 0.10's batched LAPACK calls deadlock the CPU thread pool when as many run at once
    as there are cores: a plain vmap of BPP ran two pivoting loops side by side and hung (idle,
    forever) on 2 cores for batches of 256 Gramians of 16 x 16, about 3 runs in 4. Run in a
    fresh process with a timeout, three times."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        import jaxjd as jd
        rng = np.random.default_rng(0)
        A = rng.standard_normal((384, 16, 40)) - 0.3 * rng.standard_normal((384, 1, 40))
        Gs = jnp.asarray(A @ A.transpose(0, 2, 1), jnp.float32)
        for _ in range(3):
            w, info = jax.jit(jax.vmap(jd.upgrad_weighting().solve))(Gs)
            assert bool(jax.block_until_ready(info.converged).all())
        print("done")
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("done")


def test_vmapped_weighting_traces_every_product_at_full_precision():
    """vmap traces BPP's batching rule outside the weighting's precision context: the rule sets
    it again (on GPUs default float32 products are TF32, and pivoting then cycles: measured on
    an H100, 1024 Gramians of 16 x 16 took 68 ms and did not converge)."""
    Gs = jnp.asarray(gramians(3, 20), jnp.float32)
    text = jax.jit(jax.vmap(jd.upgrad_weighting())).lower(Gs).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert dots and not [line for line in dots if "DEFAULT" in line]


def test_compensated_float32_residual_matches_float64(x64):
    """The TPU path of the refinement's residual (no float64 there): ``G (s + u)`` from exact
    half-products and compensated sums, within a few float32 ulps of the float64 value even
    under heavy cancellation, where a float32 product is off by ~|G||v| eps."""
    from jaxjd.solvers._bpp import _residual2

    rng = np.random.default_rng(3)
    m = 45
    A = rng.standard_normal((m, 60))
    G = np.asarray((A @ A.T) / 60, np.float32)
    s = rng.standard_normal(m).astype(np.float32)
    # u makes G (s + u) small: s + u ~ a near-null vector of G plus a tiny part
    null = np.linalg.eigh(G.astype(np.float64))[1][:, 0]
    u = (1e3 * null - s).astype(np.float32)
    exact = G.astype(np.float64) @ (s.astype(np.float64) + u.astype(np.float64))
    with jax.enable_x64(False):
        wide = np.asarray(jax.jit(_residual2)(jnp.asarray(G), jnp.asarray(s), jnp.asarray(u)))
        plain = np.asarray(jnp.asarray(G) @ (jnp.asarray(s) + jnp.asarray(u)))
    scale = np.abs(exact).max()
    assert np.abs(wide - exact).max() <= 4 * np.finfo(np.float32).eps * scale
    assert np.abs(plain - exact).max() > 10 * np.abs(wide - exact).max()


@pytest.mark.parametrize("m", [4, pytest.param(20, marks=pytest.mark.slow)])
def test_float32_vmaps_keep_the_wide_residual(m):
    """The float32 refinement traces a float64 product with x64 enabled locally: every way of
    batching it (vmap of a jitted weighting, vmap of vmap) goes through BPP's rule, so none
    truncates it (pytest turns JAX's truncation warning into an error)."""
    with jax.enable_x64(False):
        Gs = jnp.asarray(gramians(6, m), jnp.float32)
        w = jax.vmap(jax.vmap(jd.upgrad_weighting()))(Gs.reshape(2, 3, m, m)).reshape(6, m)
        w_jit = jax.jit(jax.vmap(jd.upgrad_weighting()))(Gs)
        nested = jax.jit(jax.vmap(jax.vmap(jd.upgrad_weighting())))
        assert "xf64>" in nested.lower(Gs.reshape(2, 3, m, m)).as_text()
        for b in range(6):
            ref = np.asarray(jd.upgrad_weighting()(Gs[b]))
            np.testing.assert_allclose(w[b], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
            np.testing.assert_allclose(w_jit[b], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize(
    "axes", [((None, 0, 0), (0, 0, 0)), ((None, 0, 0), (0, 0, None)), ((0, 0, None), (None, 0, 0))]
)
def test_wide_matvec_under_nested_vmaps(axes):
    """The float64 product under every mix of batched and unbatched arguments, nested."""
    from jaxjd.solvers._bpp import _wide_matvec

    rng = np.random.default_rng(5)
    inner, outer = axes
    m, A, B = 6, 3, 4
    G = rng.standard_normal((A, B, m, m)).astype(np.float32)
    s = rng.standard_normal((A, B, m)).astype(np.float32)
    u = rng.standard_normal((A, B, m)).astype(np.float32)
    # Slice away what an axis does not batch (index 0 of that axis).
    args = []
    for x, i_ax, o_ax in zip((G, s, u), inner, outer):
        x = x if o_ax == 0 else x[0]
        x = x if i_ax == 0 else (x[:, 0] if o_ax == 0 else x[0])
        args.append(jnp.asarray(x))
    with jax.enable_x64(False):
        out = jax.jit(jax.vmap(jax.vmap(_wide_matvec, inner), outer))(*args)
    full = []
    for x, i, o in zip(args, inner, outer):
        tail = x.shape[(o == 0) + (i == 0) :]
        lead = (A if o == 0 else 1, B if i == 0 else 1)
        full.append(np.broadcast_to(np.asarray(x, np.float64).reshape(*lead, *tail), (A, B, *tail)))
    exact = np.einsum("abij,abj->abi", full[0], full[1] + full[2])
    assert out.shape == (A, B, m) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, exact.astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("K", [1, 7, 16, pytest.param(2, marks=pytest.mark.slow)])
def test_unrolled_spd_solve_matches_lapack(K, dtype, monkeypatch):
    """The accelerators' small-system solve (Gaussian elimination unrolled, no pivoting) on SPD
    matrices up to cond 1e3: the solution to a few eps cond, the pivots' product is det M, and
    a matrix that is not positive definite shows a pivot <= 0 (BPP's plan reads it as such)."""
    from jaxjd.solvers import _bpp

    monkeypatch.setattr(_bpp, "_UNROLL_ON_CPU", True)
    rng = np.random.default_rng(K)
    Q, _ = np.linalg.qr(rng.standard_normal((K, K)))
    M = (Q * np.logspace(0, -3, K)) @ Q.T
    M = 0.5 * (M + M.T)
    b, B = rng.standard_normal(K), rng.standard_normal((K, 3))
    eps = float(np.finfo(dtype).eps)
    with jax.enable_x64(dtype == "float64"):
        solve = jax.jit(lambda M, b: _bpp._spd_solve(M, b, with_pivots=True))
        for rhs in (b, B):
            x, piv = solve(jnp.asarray(M, dtype), jnp.asarray(rhs, dtype))
            ref = np.linalg.solve(M, rhs)
            err = np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max()
            assert err <= 100 * K * eps * 1e3, err
            np.testing.assert_allclose(
                np.prod(np.asarray(piv, np.float64)), np.linalg.det(M), rtol=1e3 * K * eps
            )
        if K > 1:
            indefinite = M - 2e-3 * np.eye(K)  # smallest eigenvalue -1e-3
            _, piv = solve(jnp.asarray(indefinite, dtype), jnp.asarray(b, dtype))
            assert not bool(jnp.all(piv > 0))


@pytest.mark.parametrize("m", [6, pytest.param(16, marks=pytest.mark.slow)])
def test_bpp_with_unrolled_solves_equals_lapack(m, monkeypatch, x64):
    """BPP with the accelerators' unrolled small systems (forced on the CPU) under vmap, on the
    full-size path (m < 16) and the half-size one, gives the LAPACK path's answer."""
    from jaxjd.solvers import _bpp
    from jaxjd.solvers._bpp import bpp

    Gs = jnp.asarray(gramians(4, m, seed=m, ill=(2,)))
    Gs = Gs / jnp.max(jnp.diagonal(Gs, axis1=1, axis2=2), axis=1)[:, None, None]
    U = jnp.eye(m)
    run = jax.vmap(lambda G: bpp(U, G, gather=False, refine=0))
    V_ref, ok_ref, _ = jax.jit(run)(Gs)
    monkeypatch.setattr(_bpp, "_UNROLL_ON_CPU", True)
    V, ok, _ = jax.jit(lambda Gs: run(Gs))(Gs)  # a new function: traced again
    assert bool(ok.all()) and bool(ok_ref.all())
    np.testing.assert_allclose(np.asarray(V @ Gs), np.asarray(V_ref @ Gs), rtol=0, atol=1e-9)


def test_pivoting_skips_inactive_lanes():
    """``active=False``: the first solve only, no pivoting (the batched rule's path that does not
    answer for a Gramian must not lengthen its loop); ``active=True`` is the plain run."""
    from jaxjd.solvers._bpp import _pivot_all

    G = jnp.asarray(gramians(1, 12, seed=3, ill=(0,))[0])
    G = G / jnp.max(jnp.diagonal(G))
    U = jnp.eye(12)
    free = (U @ G) > 0  # a wrong guess everywhere: every lane has to pivot
    run = jax.jit(lambda active: _pivot_all(U, G, 200, free=free, gather=False, active=active))
    V, ok, it = run(jnp.asarray(True))
    V_plain, _, it_plain = jax.jit(lambda: _pivot_all(U, G, 200, free=free, gather=False))()
    assert bool(ok.all()) and int(it.max()) > 0
    np.testing.assert_array_equal(np.asarray(it), np.asarray(it_plain))
    np.testing.assert_array_equal(np.asarray(V), np.asarray(V_plain))
    _, _, it_off = run(jnp.asarray(False))
    assert int(it_off.max()) == 0


# A count of steps (a cost property) whose unrolled solves and 40 ADMM steps take ~18 s to compile
# on the CPU: in the slow sweep, to keep the default suite within its 5 minutes on 2 cores. The
# accelerators' program stays in the default suite through test_pivoting_skips_inactive_lanes
# (gather=False) and test_unrolled_spd_solve_matches_lapack (the unrolled solves).
@pytest.mark.slow
@pytest.mark.parametrize("m, seed", [(16, 3), (32, 2)])
def test_accelerator_program_pivots_few_steps_on_mixed_batches(m, seed, monkeypatch):
    """The program a vmapped batch runs on an accelerator (dense loops, unrolled small solves,
    40 ADMM steps; forced on the CPU) on the benchmark families: every lane of the batch takes
    every pivoting step until the slowest lane is done, so the slowest lane is the cost. On this
    batch it needed 14 steps with the CPU's 6 ADMM steps (m = 16); now at most 6, with the
    CPU program's update."""
    from jaxjd._families import gramian_batch
    from jaxjd.solvers import _bpp

    Gs = gramian_batch(112 if m == 16 else 56, m, 200, seed)
    weighting = jd.upgrad_weighting()
    with jax.enable_x64(True):
        exact = np.asarray(jax.jit(jax.vmap(weighting.solve))(jnp.asarray(Gs))[0])
    Gs = jnp.asarray(Gs, jnp.float32)
    monkeypatch.setattr(_bpp, "_UNROLL_ON_CPU", True)
    monkeypatch.setattr(_bpp, "_BATCHED_WARM_ON_CPU", True)
    dense = jd.upgrad_weighting(solver=jd.solvers.BPP(gather=False))
    V, info = jax.jit(jax.vmap(dense.solve))(Gs)
    assert bool(info.converged.all())
    assert int(info.iterations.max()) <= 6
    # float32 weights of these Gramians (cond up to ~1e5 after UPGrad's ridge) are good to a
    # few 1e-3 of the largest (the CPU program: 1.6e-3 on the m = 16 batch, this one 1.3e-4).
    error = np.abs(np.asarray(V, np.float64) - exact).max(axis=1)
    assert np.all(error <= 4e-3 * np.abs(exact).max(axis=1)), np.max(error)

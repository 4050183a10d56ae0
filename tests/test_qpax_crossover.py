"""solver="qpax": qpax's interior point, then a crossover to the exact vertex (an exact solve on
the active set read off the interior point, checked, corrected by a few pivoting steps). Its
weights are the default solver's, under jit and vmap, in float32 and float64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd
from jaxjd._families import conflicting, gaussian, imbalanced, low_rank, near_duplicates

pytest.importorskip("qpax")


def _rank_one(rng, m, n):
    return np.outer(rng.standard_normal(m), rng.standard_normal(n))


def _column(rng, m, n):  # n = 1: G = g g^T
    return rng.standard_normal((m, 1))


def _cond_1e8(rng, m, n):  # singular values 1 .. 1e-4: cond(J J^T) = 1e8
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return (u * np.logspace(0, -4, k)) @ v.T


def _duplicates(rng, m, n):  # exact copies of a few rows
    base = rng.standard_normal((max(1, m // 3), n))
    return base[rng.integers(0, base.shape[0], m)]


def _zero_rows(rng, m, n):
    J = conflicting(rng, m, n)
    J[rng.permutation(m)[: max(1, m // 4)]] = 0.0
    return J


FAMILIES = {
    "gaussian": gaussian,
    "conflicting": conflicting,
    "imbalanced": imbalanced,
    "low_rank": low_rank,
    "rank_one": _rank_one,
    "column": _column,
    "cond_1e8": _cond_1e8,
    "duplicates": _duplicates,
    "near_duplicates": near_duplicates,
    "zero_rows": _zero_rows,
}
# The slow sweep: every family at each m, 100 Gramians.
M_SWEEP = (2, 3, 5, 8, 12, 16, 24, 32, 48, 64)


def family_gramians(m, seed):
    """``(names, G)``: one Gramian ``J J^T`` (float64) per family, stacked."""
    rng = np.random.default_rng(seed)
    Js = [f(rng, m, 2 * m + 3) for f in FAMILIES.values()]
    return list(FAMILIES), np.stack([J @ J.T for J in Js])


def _kkt_violation(G, U, V):
    """Largest violation of ``v >= u``, ``G v >= 0`` and ``(v - u)^T G v = 0`` over the lanes
    ``V[b, k]`` (right-hand sides ``U[k]``) of each Gramian ``G[b]``, relative to
    ``max(|u|, |v|)`` (``G`` is trace-normalised: its scale is about 1)."""
    G, U, V = (np.asarray(x, np.float64) for x in (G, U, V))
    s, lam = V - U, np.einsum("bij,bkj->bki", G, V)
    scale = np.maximum(np.abs(U).max(-1), np.abs(V).max(-1))
    worst = np.maximum(np.maximum(-s, -lam).max(-1), np.abs(s * lam).sum(-1) / scale)
    return worst / scale


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max(-1) / np.abs(b).max(-1)


@functools.cache
def _projections(solver):
    """``jit(vmap)`` of the UPGrad projections (``U = I / m``) of a batch of Gramians, after
    TorchJD's conditioning: ``(G', V, converged)``; one program per solver (and shape)."""

    def one(G):
        Gn = jd.normalize_regularize(G, 1e-4, 1e-4)
        m = G.shape[0]
        V, info = jd.project_onto_dual_cone(jnp.eye(m, dtype=G.dtype) / m, Gn, solver=solver)
        return Gn, V, info.converged

    return jax.jit(jax.vmap(one))


def _check_family_batch(m, x64, seed):
    """qpax's projections against the default's on every family at this m: the same
    convergence (everywhere), the KKT conditions, and the same weights: to 1e-6 relative in
    float64; in float32 as close to the float64 answer as float32 allows, ``cond(G') eps``
    (measured: at most ~0.4 of it, like the default's float32 answer)."""
    names, Gs = family_gramians(m, seed)
    with jax.enable_x64(True):
        _, V64, ok64 = _projections("auto")(jnp.asarray(Gs))
        w64 = np.asarray(V64).sum(1)
    assert bool(ok64.all())
    with jax.enable_x64(x64):
        G = jnp.asarray(Gs, jnp.float64 if x64 else jnp.float32)
        Gn, V, ok = _projections("qpax")(G)
        if x64:
            ok_ref = ok64
        else:
            _, _, ok_ref = _projections("auto")(G)
    np.testing.assert_array_equal(ok, ok_ref)
    lanes_ok = np.asarray(ok).reshape(len(names), -1).all(axis=1)
    failed = [n for n, o in zip(names, lanes_ok.tolist()) if not o]  # pyright: ignore[reportArgumentType]
    assert not failed, failed
    Gn, V = np.asarray(Gn, np.float64), np.asarray(V, np.float64)
    rel = _rel(V.sum(1), w64)
    if x64:
        assert rel.max() <= 1e-6, dict(zip(names, rel))
    else:
        bound = np.linalg.cond(Gn) * float(np.finfo(np.float32).eps)
        assert np.all(rel <= bound), dict(zip(names, rel / bound))
    kkt = _kkt_violation(Gn, np.eye(m) / m, V)
    assert kkt.max() <= (1e-12 if x64 else 1e-5), kkt.max()


def test_crossover_matches_default_on_every_family():
    """Every family at m = 5 in float64 (two programs; both dtypes and m = 2 .. 64 in the slow
    sweep: each program costs seconds of compilation)."""
    _check_family_batch(5, True, seed=5)


def _gaussian_jacobians(dtype):
    rng = [np.random.default_rng(seed) for seed in range(3)]
    return jnp.asarray(np.stack([r.standard_normal((4, 6)) for r in rng]), dtype)


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_upgrad_gaussian_matches_default(x64):
    """The filed issue: qpax gave NaN for every Gaussian 4 x 6 Jacobian (seeds 0-2). Under jit
    and vmap, its updates are the default's (float64: to 1e-6; float32: to 1e-4)."""
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        Js = _gaussian_jacobians(dtype)
        out = jax.jit(jax.vmap(jd.upgrad(solver="qpax")))(Js)
        ref = jax.jit(jax.vmap(jd.upgrad()))(Js)
        assert out.dtype == dtype and bool(jnp.all(jnp.isfinite(out)))
        assert _rel(out, ref).max() <= (1e-6 if x64 else 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_upgrad_gaussian_eager_and_jit(x64):
    """The issue's calls themselves, one Jacobian at a time, eager and jitted; the weighting's
    report under vmap."""
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        tol = 1e-6 if x64 else 1e-4
        Js = _gaussian_jacobians(dtype)
        agg = jd.upgrad(solver="qpax")
        for J in Js:
            ref = jd.upgrad(J)
            assert _rel(jd.upgrad(J, solver="qpax"), ref) <= tol
            assert _rel(jax.jit(agg)(J), ref) <= tol
        G = jax.vmap(jd.gramian)(Js)
        w, info = jax.vmap(jd.upgrad_weighting(solver="qpax").solve)(G)
        assert _rel(w, jax.vmap(jd.upgrad_weighting())(G)).max() <= tol
        assert bool(info.converged.all())
        assert float(info.kkt_residual.max()) <= jd.solvers.Qpax().acceptance(dtype, 4)


def test_converged_is_honest():
    """After one interior-point step and no pivoting, the active set read off is wrong for some
    lanes: those are reported not converged, their KKT residual above the acceptance; the
    others are the default's answers."""
    with jax.enable_x64(True):
        rough = jd.solvers.Qpax(max_iter=1, pivots=0)
        _, Gs = family_gramians(5, seed=5)
        Gn, V, ok = (np.asarray(x) for x in _projections(rough)(jnp.asarray(Gs)))
        _, ref, _ = _projections("auto")(jnp.asarray(Gs))
    assert 0 < ok.sum() < ok.size
    assert _rel(V[ok], np.asarray(ref)[ok]).max() <= 1e-10
    U = np.eye(5) / 5
    kkt = _kkt_violation(Gn, U, V)
    assert kkt[ok].max() <= 1e-12 and kkt[~ok].min() > 1e-6


def test_pivots_is_checked():
    with pytest.raises(ValueError, match="pivots"):
        jd.solvers.Qpax(pivots=-1)


@pytest.mark.slow
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_crossover_matches_default_sweep(x64):
    """100 Gramians: the ten families at every m of M_SWEEP (2 .. 64)."""
    for m in M_SWEEP:
        _check_family_batch(m, x64, seed=100 + m)

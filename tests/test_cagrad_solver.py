"""CAGrad's inner solve: the exact solve on a face of the simplex (block pivoting, a KKT test)
before and inside the accelerated projected gradient loop; few sequential steps (what a GPU pays
for), exactness, and the faces where it must not be trusted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import reference, reference_cases

import jaxjd as jd
from jaxjd._families import family_matrices
from jaxjd.aggregation._cagrad import _minimize, _of_gramian
from jaxjd.solvers import normalize_regularize


def _problem(G, c):
    """TorchJD's normalisation (``G / tr(G)``) as the weighting's, and ``phi = c |R 1/m|``."""
    apply, norm, gram = _of_gramian(normalize_regularize(G, 1e-4, jnp.zeros((), G.dtype)))
    phi = c * norm(jnp.full((G.shape[0],), 1.0 / G.shape[0], G.dtype))
    return apply, norm, gram, phi


@jax.jit
def _solve(G, c, tol):
    return _minimize(*_problem(G, c), tol, 20_000)


@jax.jit
def _solve_by_the_loop_alone(G, c, tol):
    return _minimize(*_problem(G, c), tol, 20_000, on_support=False)


def _objective(G, w, c):
    G = np.asarray(G, np.float64)
    m = G.shape[0]
    Gn = G / np.trace(G)
    b = Gn.sum(axis=1) / m
    phi = c * np.sqrt(Gn.sum()) / m
    return b @ w + phi * np.sqrt(max(w @ Gn @ w, 0.0))


# m = 8 in the slow sweep (a count; for the default suite's time)
@pytest.mark.parametrize("m", [3, pytest.param(8, marks=pytest.mark.slow)])
def test_exact_solve_takes_few_iterations_and_is_at_least_as_good(m, x64):
    """Over the benchmark families (float64, c = 0.5 and 2): at most 60 iterations of the loop
    (the loop alone ran up to 20,000: its gradient mapping could not reach 1e-12), in all 10x
    fewer, and an objective no higher than the loop's (to rounding)."""
    ours, alone = [], []
    for _, _, a in family_matrices(m, 100):
        G = jnp.asarray(a @ a.T)
        for c in (0.5, 2.0):
            w, iterations, steps = _solve(G, c, 1e-12)
            w_loop, iterations_loop, _ = _solve_by_the_loop_alone(G, c, 1e-12)
            w, w_loop = np.asarray(w), np.asarray(w_loop)
            assert np.all(w >= 0) and abs(w.sum() - 1.0) <= 1e-12
            f, f_loop = _objective(G, w, c), _objective(G, w_loop, c)
            assert f <= f_loop + 1e-13 * max(1.0, abs(f_loop))
            assert int(iterations) <= 60 and int(steps) >= int(iterations)
            ours.append(int(iterations))
            alone.append(int(iterations_loop))
    assert 10 * sum(ours) <= sum(alone)


def test_interior_solution_meets_kkt_to_rounding(x64):
    """At a minimiser inside the simplex, the gradient ``b + phi G w / q`` is the same in every
    coordinate: the exact solve gets it to rounding, with no loop iteration (the loop alone
    stopped 1e-7 away from it, at its floor)."""
    rng = np.random.default_rng([0, 3, 100])
    base = rng.standard_normal(100)
    a = rng.standard_normal((3, 100)) + np.array([[-1.5], [1.0], [1.0]]) * base
    G = jnp.asarray(a @ a.T)
    w, iterations, _ = _solve(G, 0.5, 1e-12)
    w = np.asarray(w)
    assert int(iterations) == 0 and np.all(w > 0)
    Gn = a @ a.T / np.trace(a @ a.T)
    phi = 0.5 * np.sqrt(Gn.sum()) / 3
    g = Gn.sum(axis=1) / 3 + phi * Gn @ w / np.sqrt(w @ Gn @ w)
    assert np.ptp(g) <= 1e-14 * np.abs(g).max() + 1e-16


@pytest.mark.parametrize(
    "name",
    # the tall matrices (each ~4 s of compilation) in the slow sweep, for the default suite's time
    [
        pytest.param("tall_6x2", marks=pytest.mark.slow),
        pytest.param("tall_10x3", marks=pytest.mark.slow),
        "duprows_4x8",
    ],
)
def test_degenerate_faces_match_torchjd(name, x64):
    """More rows than rank: on the full support, 0 is in the face's affine hull, the face's
    root is t = 0 and ``q = |R w|`` only rounding (2.8e-10 through J's factor). Its KKT test is
    then vacuous (the terms of ``phi G w / q`` blow up); taken, it gave zero weights. Equal rows
    (duprows: rows 0 and 3): the face does not determine how they share their weight; its own
    LU split it by rounding (0.435 / 0.295), the ridge-conditioned solve splits it evenly, as
    TorchJD does (and permutation equivariance needs). TorchJD's weights (cvxpy) in every case,
    through G and through J's triangular factor."""
    index, arrays = reference()
    case = next(
        c for c in reference_cases(("CAGrad",)) if c["matrix"] == name and c["params"]["c"] == 0.5
    )
    mat = index["matrices"][name]
    ref = arrays[case["outputs"]["gramian_weights"]]
    G, J = jnp.asarray(arrays[mat["G_key"]]), jnp.asarray(arrays[mat["J_key"]])
    for w in (jd.cagrad_weighting(c=0.5)(G), jd.cagrad(c=0.5).weights(J)):
        np.testing.assert_allclose(np.asarray(w), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_float32_loop_stops_when_rounding_leaves_no_progress():
    """Two rows equal to 2e-5 (float32 through the Gramian): the minimiser is a vertex, but the
    rows' difference is below what f's rounding resolves, so the loop restarts at every step.
    It ran to max_iter (20,000 iterations) and now stops after 20 restarts in a row."""
    a = family_matrices(2, 100)
    a = next(x for name, _, x in a if name == "near_duplicates")
    G = jnp.asarray(a @ a.T, jnp.float32)
    w, iterations, _ = _solve(G, jnp.float32(0.1), 1e-6)
    assert int(iterations) <= 100
    assert np.all(np.isfinite(np.asarray(w))) and abs(float(jnp.sum(w)) - 1.0) <= 1e-6


def test_vmapped_solve_equals_the_loop_over_gramians(x64):
    """Under vmap the pivoting and the loop's branches run for every Gramian (a select); each
    answer must be the one of its own call."""
    Gs = np.stack([a @ a.T for _, _, a in family_matrices(5, 40)])
    weighting = jd.cagrad_weighting(c=0.5)
    batched = np.asarray(jax.jit(jax.vmap(weighting))(jnp.asarray(Gs)))
    single = np.stack([np.asarray(weighting(jnp.asarray(G))) for G in Gs])
    np.testing.assert_allclose(batched, single, rtol=1e-9, atol=1e-12)

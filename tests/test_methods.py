"""Method-specific behaviour: goldens, equivalences, hyper-parameter validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd

J_BASE = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def test_goldens_of_torchjd_readme():
    cases = {
        jd.imtl_g(): [0.0767, 1.0, 1.0],
        jd.aligned_mtl(): [0.2133, 0.9673, 0.9673],
        jd.aligned_mtl(scale_mode="median"): [0.2133, 0.9673, 0.9673],
        jd.aligned_mtl(scale_mode="rmse"): [0.5764, 2.6142, 2.6142],
        jd.config(): [0.1588, 2.0706, 2.0706],
        jd.pcgrad(): [0.5848, 3.8012, 3.8012],
    }
    for agg, expected in cases.items():
        np.testing.assert_allclose(agg(J_BASE), expected, atol=1e-4)
    krum_in = jnp.array([[1.0, 1, 1], [1, 0, 1], [75, -666, 23], [1, 2, 3], [2, 0, 1]])
    agg = jd.krum(n_byzantine=1, n_selected=4)
    np.testing.assert_allclose(agg(krum_in), [1.25, 0.75, 1.5], atol=1e-6)
    np.testing.assert_allclose(agg.weights(krum_in), [0.25, 0.25, 0, 0.25, 0.25])
    tm_in = jnp.array([[1e11, 3], [1, -1e11], [-1e10, 1e10], [2, 2]])
    np.testing.assert_allclose(jd.trimmed_mean(tm_in, trim_number=1), [1.5, 2.5])


@pytest.mark.parametrize("n", [5, 50, 1000])
def test_pcgrad_equals_upgrad_with_ones_preference_for_two_objectives(n, x64):
    rng = np.random.default_rng(n)
    J = jnp.asarray(rng.standard_normal((2, n)) * np.array([[1.0], [-3.0]]))
    exact_upgrad = jd.upgrad(pref_vector=[1.0, 1.0], norm_eps=0.0, reg_eps=0.0)
    np.testing.assert_allclose(jd.pcgrad(J), exact_upgrad(J), rtol=1e-10, atol=1e-12)


def test_pcgrad_is_reproducible_per_key_and_depends_on_it():
    rng = np.random.default_rng(0)
    J = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    a = jd.pcgrad(J, key=jax.random.key(1))
    np.testing.assert_array_equal(a, jd.pcgrad(J, key=jax.random.key(1)))
    outs = {tuple(np.round(np.asarray(jd.pcgrad(J, key=jax.random.key(k))), 5)) for k in range(8)}
    assert len(outs) > 1
    with pytest.raises(ValueError, match="PRNG key"):
        jd.pcgrad(J)


def test_zero_matrix_gives_zero_update():
    Z = jnp.zeros((3, 4))
    for agg in (jd.imtl_g(), jd.aligned_mtl(), jd.config(), jd.pcgrad()):
        out = agg(Z, key=jax.random.key(0))
        assert bool(jnp.all(out == 0)) and bool(jnp.isfinite(out).all())


def test_config_on_a_pytree_equals_the_matrix(x64):
    rng = np.random.default_rng(2)
    J = rng.standard_normal((4, 9))
    tree = {"a": jnp.asarray(J[:, :4].reshape(4, 2, 2)), "b": jnp.asarray(J[:, 4:])}
    out = jd.config(tree)
    flat = np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"])])
    np.testing.assert_allclose(flat, jd.config(jnp.asarray(J)), rtol=1e-12)


def test_hyper_parameter_validation():
    with pytest.raises(ValueError, match="n_byzantine"):
        jd.krum(n_byzantine=-1)
    with pytest.raises(ValueError, match="n_selected"):
        jd.krum(n_byzantine=0, n_selected=0)
    with pytest.raises(ValueError, match="n_byzantine \\+ 3"):
        jd.krum(jnp.ones((3, 2)), n_byzantine=1)
    with pytest.raises(ValueError, match="n_selected = 5"):
        jd.krum(jnp.ones((4, 2)), n_byzantine=0, n_selected=5)
    with pytest.raises(ValueError, match="trim_number"):
        jd.trimmed_mean(trim_number=-1)
    with pytest.raises(ValueError, match="at least 5"):
        jd.trimmed_mean(jnp.ones((4, 2)), trim_number=2)
    with pytest.raises(ValueError, match="scale_mode"):
        jd.aligned_mtl(scale_mode="max")
    with pytest.raises(ValueError, match="length 3"):
        jd.config(jnp.ones((2, 3)), pref_vector=[1.0, 1.0, 1.0])


def test_graddrop_masks_and_leak():
    rng = np.random.default_rng(5)
    J = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
    key = jax.random.key(2)
    out = jd.graddrop(J, key=key)
    np.testing.assert_array_equal(out, jd.graddrop(J, key=key))
    # Each coordinate keeps either the positive or the negative entries.
    pos = np.asarray(jnp.sum(jnp.maximum(J, 0), 0))
    neg = np.asarray(jnp.sum(jnp.minimum(J, 0), 0))
    o = np.asarray(out)
    assert np.all(np.isclose(o, pos, atol=1e-6) | np.isclose(o, neg, atol=1e-6))
    assert np.any(np.isclose(o, pos, atol=1e-6) & ~np.isclose(pos, 0))
    assert np.any(np.isclose(o, neg, atol=1e-6) & ~np.isclose(neg, 0))
    # Full leak keeps everything: the sum of the rows.
    full = jd.graddrop(J, key=key, leak=[1.0] * 4)
    np.testing.assert_allclose(full, jnp.sum(J, 0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="PRNG key"):
        jd.graddrop(J)
    with pytest.raises(ValueError, match="length 3"):
        jd.graddrop(J, key=key, leak=[0.1, 0.2, 0.3])


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 2.0])
def test_fairgrad_solves_its_equation_and_is_non_conflicting(alpha, dtype):
    rng = np.random.default_rng(7)
    J = rng.standard_normal((5, 12)) * rng.choice([-2.0, 1.0], size=(5, 1))
    J = jnp.asarray(J.astype(dtype))
    agg = jd.fairgrad(alpha=alpha)
    w = np.asarray(agg.weights(J), np.float64)
    G = np.asarray(jd.gramian(J), np.float64)
    target = w ** (-1.0 / alpha)
    tol = 1e-10 if dtype == "float64" else 1e-4
    assert np.abs(G @ w - target).max() <= tol * target.max()
    directional = np.asarray(J, np.float64) @ np.asarray(agg(J), np.float64)
    assert directional.min() > 0
    np.testing.assert_allclose(jd.fairgrad(J, alpha=0.0), jd.mean(J), rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        jd.fairgrad(alpha=-1.0)


def test_cagrad_goldens_validation_and_non_conflict(dtype):
    np.testing.assert_allclose(jd.cagrad(J_BASE, c=0.5), [0.1835, 1.2041, 1.2041], atol=1e-4)
    np.testing.assert_allclose(jd.cagrad(J_BASE, c=0.0), jd.mean(J_BASE), rtol=1e-6)
    with pytest.raises(ValueError, match="c must be"):
        jd.cagrad(c=-0.5)
    rng = np.random.default_rng(3)
    for c in (1.0, 2.0):  # TorchJD's tests: non-conflicting for c >= 1
        J = jnp.asarray(
            (rng.standard_normal((6, 9)) * rng.choice([-2.0, 1.0], (6, 1))).astype(dtype)
        )
        d = np.asarray(J, np.float64) @ np.asarray(jd.cagrad(J, c=c), np.float64)
        assert d.min() >= -1e-6 * np.linalg.norm(d)


def test_modo_one_step_by_hand_and_state_errors(x64):
    A = jnp.array([[2.0, -1.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0]])  # not symmetric
    w = jd.modo_weighting(gamma=0.1, rho=0.1)
    state = w.init(3, jnp.float64)
    lam, state = w.update(A, state)
    lam0 = np.full(3, 1 / 3)
    step = lam0 - 0.1 * (np.asarray(A) @ lam0 + 0.1 * lam0)
    expected = step - (step.sum() - 1) / 3  # interior of the simplex here: a shift
    np.testing.assert_allclose(lam, expected, rtol=1e-12)
    np.testing.assert_allclose(state.weights, lam)
    with pytest.raises(TypeError, match="stateful"):
        w(A)
    with pytest.raises(ValueError, match="init"):
        w.update(jnp.eye(4), state)
    sdm = jd.sdmgrad_weighting(lambda_=0.3)
    out, s2 = sdm.update(A, sdm.init(3, jnp.float64))
    assert abs(float(out.sum()) - 1.0) < 1e-12 and bool(jnp.all(out >= 0))
    assert abs(float(s2.weights.sum()) - 1.0) < 1e-12


def test_crmogm_pass_through_frozen_and_validation(x64):
    G = jd.gramian(jnp.asarray(np.random.default_rng(1).standard_normal((3, 5))))
    inner = jd.upgrad_weighting()
    through = jd.crmogm_weighting(inner, alpha=0.0)
    w, _ = through.update(G, through.init(3, jnp.float64))
    np.testing.assert_allclose(w, inner(G), rtol=1e-12)
    frozen = jd.crmogm_weighting(inner, alpha=1.0, initial_weights=[0.2, 0.3, 0.5])
    state = frozen.init(3, jnp.float64)
    for _ in range(3):
        w, state = frozen.update(G, state)
    np.testing.assert_allclose(w, [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="alpha"):
        jd.crmogm_weighting(inner, alpha=1.5)
    with pytest.raises(TypeError, match="wraps a jaxjd weighting"):
        jd.crmogm_weighting(lambda G: G[0])
    with pytest.raises(ValueError, match="has length 3 but the input has m = 4"):
        frozen.init(4)


@pytest.mark.parametrize("m", [5, 40])  # the rank path (m <= 32) and the top_k path
def test_trimmed_mean_ties_outliers_and_nan(m, x64):
    """Equal entries are trimmed once each (not all at once); huge outliers do not cancel the
    kept entries; a NaN in a coordinate makes that coordinate NaN, never a silent number."""
    rng = np.random.default_rng(m)
    J = rng.standard_normal((m, 4))
    J[:, 0] = 3.0  # all tied
    J[0, 1], J[1, 1] = 1e300, -1e300  # outliers
    J[2, 3] = np.nan
    out = np.asarray(jd.trimmed_mean(jnp.asarray(J), trim_number=2))
    kept = np.sort(J[:, 1])[2 : m - 2]
    np.testing.assert_allclose(out[:2], [3.0, kept.mean()], rtol=1e-12)
    np.testing.assert_allclose(out[2], np.sort(J[:, 2])[2 : m - 2].mean(), rtol=1e-12)
    assert np.isnan(out[3])

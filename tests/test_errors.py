"""Bad input: clear errors at trace time; documented behaviour for bad values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd


def test_jacobian_shape_errors():
    with pytest.raises(ValueError, match="m = 0"):
        jd.upgrad(jnp.ones((0, 3)))
    with pytest.raises(ValueError, match="share their leading axis"):
        jd.upgrad({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})
    with pytest.raises(ValueError, match="scalar leaf"):
        jd.mean({"a": jnp.ones((2, 3)), "b": jnp.array(1.0)})
    with pytest.raises(TypeError, match="floating point"):
        jd.upgrad(jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="no array leaves"):
        jd.upgrad({})


def test_errors_are_raised_at_trace_time():
    with pytest.raises(ValueError, match="share their leading axis"):
        jax.jit(jd.upgrad()).lower({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})


def test_hyper_parameter_errors():
    with pytest.raises(ValueError, match="norm_eps"):
        jd.upgrad(norm_eps=-1.0)
    with pytest.raises(ValueError, match="reg_eps"):
        jd.dualproj(reg_eps=-1e-3)
    with pytest.raises(ValueError, match="Unknown solver"):
        jd.upgrad(solver="quadprog")
    with pytest.raises(ValueError, match="epsilon"):
        jd.mgda(epsilon=0.0)
    with pytest.raises(ValueError, match="max_iters"):
        jd.mgda(max_iters=0)
    with pytest.raises(ValueError, match="1-D"):
        jd.upgrad(pref_vector=[[1.0, 2.0]])
    with pytest.raises(ValueError, match="length 3"):
        jd.upgrad(jnp.ones((2, 4)), pref_vector=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="length 2"):
        jd.constant(jnp.ones((3, 4)), weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="PRNG key"):
        jd.rlw(jnp.ones((3, 4)))
    # Number-valued hyper-parameters may be traced (sweeping them does not retrace).
    J = jnp.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 1.0]])
    traced = jax.jit(lambda p: jd.upgrad(J, pref_vector=p))(jnp.array([0.3, 0.7]))
    np.testing.assert_allclose(traced, jd.upgrad(J, pref_vector=[0.3, 0.7]), rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        jd.upgrad_weighting()(jnp.ones((2, 3)))


def test_zero_jacobian_gives_zero_update(dtype):
    J = jnp.zeros((3, 5), dtype)
    for agg in (jd.upgrad(), jd.dualproj(), jd.mgda(), jd.upgrad(reg_eps=0.0, norm_eps=0.0)):
        out = agg(J)
        assert bool(jnp.all(out == 0))
    # TorchJD's convention: below norm_eps the Gramian counts as 0, the weights are the pref.
    np.testing.assert_allclose(jd.upgrad().weights(J), [1 / 3] * 3, rtol=1e-6)


def test_nan_and_inf_propagate_instead_of_a_silent_answer():
    for bad in (jnp.nan, jnp.inf):
        J = jnp.array([[1.0, 2.0], [bad, 0.0]])
        for agg in (jd.upgrad(), jd.dualproj(), jd.mgda()):
            assert not bool(jnp.isfinite(agg(J)).all())
    J = jnp.array([[1.0, 2.0], [jnp.nan, 0.0]])
    _, info = jd.upgrad_weighting().solve(jd.gramian(J))
    assert not bool(info.converged.any())


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1.0, 1e10, 1e18, 1e25])
def test_extreme_scales_float32(scale):
    """The trace normalisation makes UPGrad's weights scale-free (``norm_eps=0``), and where
    ``J J^T`` underflows (1e-30) or overflows (1e25) in float32 the aggregator forms it from J
    scaled by a power of two: the update is the scaled one at every scale (the mean at 1e-30
    and NaN at 1e25 before)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    ref = jd.upgrad(jnp.asarray(a), norm_eps=0.0)
    J = jnp.asarray(a * np.float32(scale))
    out = jd.upgrad(J, norm_eps=0.0)
    in_range = bool(jnp.isfinite(jd.gramian(J)).all()) and float(jnp.trace(jd.gramian(J))) > 0
    assert in_range == (scale not in (1e-30, 1e25))
    np.testing.assert_allclose(out / scale, ref, rtol=2e-4, atol=1e-6)


def test_no_guessing_on_the_first_argument():
    """A vector where a hyper-parameter was meant, or a key that would be dropped, is an error
    that names the right spelling."""
    with pytest.raises(TypeError, match="pref_vector="):
        jd.upgrad(jnp.array([0.3, 0.7]))
    with pytest.raises(TypeError, match="pref_vector="):
        jd.upgrad([0.3, 0.7])
    with pytest.raises(TypeError, match="weights="):
        jd.constant_weighting(jnp.array([0.3, 0.7]), weights=[0.5, 0.5])
    key = jax.random.key(0)
    for factory in (jd.pcgrad, jd.rlw, jd.random_weighting, jd.graddrop, jd.pcgrad_weighting):
        with pytest.raises(TypeError, match="drop the key"):
            factory(key=key)
    with pytest.raises(TypeError, match="stateful"):
        jd.gradvac(jnp.ones((3, 4)), key=key)
    with pytest.raises(TypeError, match="unexpected keyword"):
        jd.upgrad(pref=[0.3, 0.7])


def test_sweeping_a_number_hyper_parameter_does_not_retrace():
    traces = []

    @jax.jit
    def step(agg, J):
        traces.append(1)
        return agg(J)

    J = jnp.array([[1.0, 2.0, 0.0], [-1.0, 0.5, 1.0]])
    outs = [
        step(jd.upgrad(reg_eps=r, pref_vector=[p, 1 - p]), J) for r, p in [(1e-4, 0.5), (0.1, 0.2)]
    ]
    assert len(traces) == 1
    for out, (r, p) in zip(outs, [(1e-4, 0.5), (0.1, 0.2)]):
        np.testing.assert_allclose(out, jd.upgrad(J, reg_eps=r, pref_vector=[p, 1 - p]), rtol=1e-6)
    assert not np.allclose(outs[0], outs[1])
    # Integers that set loop bounds stay static: a new value is a new program.
    step(jd.mgda(max_iters=5), J)
    step(jd.mgda(max_iters=6), J)
    assert len(traces) == 3


def test_a_state_passed_to_a_call_is_named():
    """The 0.1 API's ``agg.weights(J, state)``: a clear error, not Python's count of arguments."""
    J = jnp.ones((2, 3))
    agg = jd.nash_mtl()
    with pytest.raises(TypeError, match=r"weights takes one positional argument.*aggregate"):
        agg.weights(J, agg.init(J))
    with pytest.raises(TypeError, match=r"__call__ takes one positional argument.*update"):
        jd.upgrad()(J, None)
    with pytest.raises(TypeError, match=r"__call__ takes one positional argument.*update"):
        jd.upgrad_weighting()(jnp.eye(2), None)


@pytest.mark.parametrize(
    "weighting",
    [
        jd.mean_weighting(),
        jd.sum_weighting(),
        jd.constant_weighting(weights=[1.0, 2.0, 3.0]),
        jd.random_weighting(),
    ],
    ids=["mean", "sum", "constant", "random"],
)
def test_weightings_that_ignore_the_gramian_ignore_its_nan(weighting):
    G = jnp.eye(3).at[0, 1].set(jnp.nan)
    key = jax.random.key(0)
    np.testing.assert_array_equal(weighting(G, key=key), weighting(jnp.eye(3), key=key))
    assert np.all(np.isfinite(np.asarray(weighting(G, key=key))))

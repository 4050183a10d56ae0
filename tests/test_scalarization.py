"""Scalarizers (issue #14, first part): TorchJD 0.18.0's goldens (values and gradients, from
tests/data/make_scalarization_goldens.py), the protocol, jit/vmap, and the errors."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxjd import scalarization as sc
from jaxjd.aggregation import EmptyState

DATA = Path(__file__).parent / "data"
INDEX = json.loads((DATA / "scalarization.json").read_text())
ARRAYS = dict(np.load(DATA / "scalarization.npz"))


def build(case, arrays):
    params = {k: arrays[v] if isinstance(v, str) else v for k, v in case["params"].items()}
    return getattr(sc, case["class"])(**params)


@pytest.mark.parametrize("case", INDEX["cases"], ids=lambda c: c["key"])
def test_matches_torchjd_value_and_gradient(case, x64):
    scalarizer = build(case, ARRAYS)
    x = jnp.asarray(ARRAYS[case["input"]])
    value, grad = jax.jit(jax.value_and_grad(scalarizer))(x)
    ref_v, ref_g = ARRAYS["value/" + case["key"]], ARRAYS["grad/" + case["key"]]
    np.testing.assert_allclose(value, ref_v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, ref_g, rtol=1e-11, atol=1e-13 * np.abs(ref_g).max())


@pytest.mark.parametrize(
    "case", [c for c in INDEX["cases"] if c["input"] == "in/pos4"], ids=lambda c: c["key"]
)
def test_matches_torchjd_in_float32(case):
    scalarizer = build(case, ARRAYS)
    x = jnp.asarray(ARRAYS[case["input"]], jnp.float32)
    value, grad = jax.value_and_grad(scalarizer)(x)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.float32
    np.testing.assert_allclose(value, ARRAYS["value/" + case["key"]], rtol=2e-5, atol=1e-6)
    ref_g = ARRAYS["grad/" + case["key"]]
    np.testing.assert_allclose(grad, ref_g, rtol=2e-4, atol=2e-5 * np.abs(ref_g).max())


def test_random_weights_are_a_softmax_of_a_normal_draw(x64):
    """RLW: positive weights summing to 1, drawn from the key (TorchJD draws from torch's
    global generator, so no golden): the gradient is the weights."""
    losses = jnp.asarray([0.3, 2.0, 1.1, 0.7])
    rlw = sc.Random()
    key = jax.random.key(3)
    w = jax.grad(lambda x: rlw(x, key=key))(losses)
    expected = jax.nn.softmax(jax.random.normal(key, (4,), jnp.float64))
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert float(rlw(jnp.full((2, 3), 1.5), key=key)) == pytest.approx(1.5, rel=1e-12)
    other = jax.grad(lambda x: rlw(x, key=jax.random.key(4)))(losses)
    assert not np.allclose(w, other)


def test_protocol_and_transformations(x64):
    pbi = sc.PBI(theta=5.0, weights=[0.2, 0.3, 0.5])
    losses = jnp.asarray([[1.0, 2.0, 0.5], [0.1, 0.2, 3.0]])
    assert not pbi.stateful and not pbi.needs_key and sc.Random().needs_key
    assert pbi.init(losses[0]) == EmptyState()
    value, state = pbi.update(losses[0], EmptyState())
    assert state == EmptyState() and float(value) == float(pbi(losses[0]))
    batched = jax.vmap(jax.value_and_grad(pbi))(losses)
    for i in range(2):
        v, g = jax.value_and_grad(pbi)(losses[i])
        np.testing.assert_allclose(batched[0][i], v, rtol=1e-14)
        np.testing.assert_allclose(batched[1][i], g, rtol=1e-14)
    # hyper-parameters are leaves: one compiled program for every theta
    run = jax.jit(lambda s, x: s(x))
    run(sc.PBI(theta=1.0, weights=[0.2, 0.3, 0.5]), losses[0])
    run(sc.PBI(theta=2.0, weights=[0.2, 0.3, 0.5]), losses[0])
    assert run._cache_size() == 1


def test_geometric_mean_values_policy(x64):
    """Zero gives 0; a negative loss gives NaN (TorchJD raises; a jitted function cannot)."""
    gm = jax.jit(sc.GeometricMean())
    assert float(gm(jnp.asarray([0.0, 2.0]))) == 0.0
    assert np.isnan(float(gm(jnp.asarray([-1.0, 2.0]))))
    np.testing.assert_allclose(gm(jnp.asarray([2.0, 8.0])), 4.0, rtol=1e-15)


def test_stch_with_a_tiny_mu_does_not_overflow(x64):
    """Centered on the largest term: mu = 1e-6 on losses of 1e3 is their weighted max."""
    losses = jnp.asarray([1e3, 2.0, 999.0])
    value = sc.STCH(mu=1e-6, weights=[1.0, 1.0, 1.0])(losses)
    np.testing.assert_allclose(value, 1e3, rtol=1e-12)
    assert np.all(np.isfinite(jax.grad(sc.STCH(mu=1e-6))(losses)))


def test_errors():
    with pytest.raises(ValueError, match="mu"):
        sc.STCH(mu=0.0)
    with pytest.raises(ValueError, match="theta"):
        sc.PBI(theta=-1.0, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="lambda_"):
        sc.COSMOS(lambda_=-0.1, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        sc.Constant(weights=[1.0, np.nan])
    with pytest.raises(ValueError, match="shape of the losses"):
        sc.Constant(weights=[1.0, 2.0])(jnp.ones(3))
    with pytest.raises(ValueError, match="shape of the losses"):
        sc.STCH(mu=1.0, reference=[0.0, 0.0])(jnp.ones((2, 2)))
    with pytest.raises(TypeError, match="floating"):
        sc.Mean()(jnp.arange(3))
    with pytest.raises(ValueError, match="at least one loss"):
        sc.Sum()(jnp.zeros((0,)))
    with pytest.raises(ValueError, match="key"):
        sc.Random()(jnp.ones(3))


@pytest.mark.parametrize("case", INDEX["learned"], ids=lambda c: c["key"])
def test_trainable_scalarizers_match_torchjd(case, x64):
    """UW and IMTL-L at given parameters: the value and both gradients (losses, parameters)."""
    scalarizer = getattr(sc, case["class"])()
    x = jnp.asarray(ARRAYS[case["input"]])
    theta = jnp.asarray(ARRAYS[case["key"] + "/params"])
    assert scalarizer.trainable and scalarizer.init_params(x).shape == x.shape

    def f(x, theta):
        return scalarizer(x, params=theta)

    value, (g_x, g_theta) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, theta)
    np.testing.assert_allclose(value, ARRAYS[case["key"] + "/value"], rtol=1e-13)
    np.testing.assert_allclose(g_x, ARRAYS[case["key"] + "/grad_values"], rtol=1e-13)
    np.testing.assert_allclose(g_theta, ARRAYS[case["key"] + "/grad_params"], rtol=1e-13)


@pytest.mark.parametrize(
    "case", [c for c in INDEX["sequences"] if c["class"] == "DWA"], ids=lambda c: c["key"]
)
def test_dwa_sequence_matches_torchjd(case, x64):
    """Four epochs of three batches: every call's value and gradient, the history carried in
    the explicit state (end_epoch after each epoch), under jit."""
    dwa = sc.DWA(temperature=case["temperature"])
    batches = jnp.asarray(ARRAYS[case["key"] + "/losses"])
    state = dwa.init(batches[0, 0])
    step = jax.jit(jax.value_and_grad(lambda x, s: dwa.update(x, s), has_aux=True))
    end = jax.jit(dwa.end_epoch)
    values, grads = [], []
    for epoch in batches:
        for losses in epoch:
            (value, state), grad = step(losses, state)
            values.append(value)
            grads.append(grad)
        state = end(state)
    np.testing.assert_allclose(values, ARRAYS[case["key"] + "/values"], rtol=1e-13)
    np.testing.assert_allclose(np.stack(grads), ARRAYS[case["key"] + "/grads"], rtol=1e-12)
    assert int(state.epochs) == 4


@pytest.mark.parametrize(
    "case", [c for c in INDEX["sequences"] if c["class"] == "FAMO"], ids=lambda c: c["key"]
)
def test_famo_sequence_matches_torchjd(case, x64):
    """Six steps of a call and an after_step with the losses after the step: every call's
    value and gradient and the weights after every after_step, under jit (TorchJD's Adam on
    float64 logits)."""
    key = case["key"]
    b = ARRAYS[key + "/min_losses"] if case["min_losses"] else None
    famo = sc.FAMO(min_losses=b, lr=case["lr"], weight_decay=case["weight_decay"])
    steps = jnp.asarray(ARRAYS[key + "/losses"])
    state = famo.init(steps[0, 0])
    step = jax.jit(jax.value_and_grad(lambda x, s: famo.update(x, s), has_aux=True))
    after = jax.jit(famo.after_step)
    values, grads, weights = [], [], []
    for before, later in steps:
        (value, state), grad = step(before, state)
        state = after(later, state)
        values.append(value)
        grads.append(grad)
        weights.append(famo.weights(state))
    np.testing.assert_allclose(values, ARRAYS[key + "/values"], rtol=1e-13)
    np.testing.assert_allclose(np.stack(grads), ARRAYS[key + "/grads"], rtol=1e-12)
    np.testing.assert_allclose(np.stack(weights), ARRAYS[key + "/weights"], rtol=1e-12)
    assert float(jnp.max(jnp.abs(np.stack(weights)[-1] - 1 / before.size))) > 1e-3  # it learned


def test_famo_state_policy(x64):
    """after_step without a call first, or with a non-finite loss, leaves the state as it was;
    a non-finite call leaves it too (and gives a non-finite scalar)."""
    famo = sc.FAMO()
    losses = jnp.array([1.0, 2.0, 0.5])
    state = famo.init(losses)
    same = famo.after_step(losses * 0.5, state)  # nothing pending
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, same, state))
    _, state = famo.update(losses, state)
    assert bool(state.pending)
    for bad in (losses.at[1].set(jnp.nan), losses.at[0].set(jnp.inf)):
        kept = famo.after_step(bad, state)
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, kept, state))
        value, kept = famo.update(bad, state)
        assert not np.isfinite(float(value))
        np.testing.assert_array_equal(kept.last_losses, state.last_losses)
    new = famo.after_step(jnp.array([0.5, 2.0, 0.5]), state)  # loss 0 fell: its weight falls
    z = famo.weights(new)
    assert not bool(new.pending) and float(z[0]) < float(z[1])
    np.testing.assert_allclose(float(jnp.sum(z)), 1.0, rtol=1e-14)
    with pytest.raises(ValueError, match="state was made for losses of shape"):
        famo.after_step(jnp.ones(2), state)
    with pytest.raises(ValueError, match="min_losses must have the shape"):
        sc.FAMO(min_losses=jnp.zeros(2)).update(losses, state)


def test_learned_and_stateful_protocol_errors():
    losses = jnp.ones(3)
    with pytest.raises(ValueError, match=r"params="):
        sc.UW()(losses)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sc.Mean()(losses, params=jnp.zeros(3))
    with pytest.raises(ValueError, match="shape of the losses"):
        sc.IMTLL()(losses, params=jnp.zeros(2))
    with pytest.raises(TypeError, match="stateful"):
        sc.DWA()(losses)
    with pytest.raises(ValueError, match="temperature"):
        sc.DWA(temperature=0.0)
    with pytest.raises(ValueError, match=r"dwa\.init"):
        sc.DWA().update(jnp.ones(4), sc.DWA().init(losses))


def test_uw_trains_inside_a_params_pytree(x64):
    """UW's log-variances in the params pytree: one jax.grad trains them with the model, and
    at the optimum of s for fixed losses exp(s_i) = L_i."""
    uw = sc.UW()
    params = {"w": jnp.asarray([2.0, 0.5]), "uw": uw.init_params(jnp.ones(2))}

    def loss(p):
        losses = jnp.asarray([1.0, 4.0]) * p["w"] ** 2  # two "task losses" of the model
        return uw(losses, params=p["uw"])

    g = jax.grad(loss)(params)
    assert set(g) == {"w", "uw"} and g["uw"].shape == (2,)
    s = params["uw"]
    for _ in range(500):  # gradient descent on s alone: exp(s) -> the losses [4, 1]
        s = s - 0.1 * jax.grad(lambda s: loss({"w": params["w"], "uw": s}))(s)
    np.testing.assert_allclose(jnp.exp(s), [4.0, 1.0], rtol=1e-6)


# Every public scalarizer, configured for losses of shape (3,): the transformation tests run
# over all of them (as tests/methods.py does for the aggregators).
W3 = [0.2, 0.3, 0.5]
SCALARIZERS = {
    "Mean": sc.Mean,
    "Sum": sc.Sum,
    "Constant": lambda: sc.Constant(weights=W3),
    "Random": sc.Random,
    "GeometricMean": sc.GeometricMean,
    "STCH": lambda: sc.STCH(mu=0.3, weights=W3, reference=[0.0, 0.1, -0.2]),
    "COSMOS": lambda: sc.COSMOS(lambda_=1.5, weights=W3),
    "PBI": lambda: sc.PBI(theta=5.0, weights=W3),
    "UW": sc.UW,
    "IMTLL": sc.IMTLL,
    "DWA": lambda: sc.DWA(temperature=0.7),
    "FAMO": lambda: sc.FAMO(min_losses=[0.0, 0.1, 0.05], lr=0.2),
}


def test_every_public_scalarizer_is_covered():
    public = {
        name
        for name in sc.__all__
        if isinstance(getattr(sc, name), type)
        and issubclass(getattr(sc, name), sc.AbstractScalarizer)
        and name != "AbstractScalarizer"
    }
    assert public == set(SCALARIZERS)


def _run(s, losses, state, key):
    params = s.init_params(losses)
    if params is not None:
        params = params + 0.1 * jnp.arange(losses.size, dtype=params.dtype).reshape(losses.shape)
    return jax.value_and_grad(lambda x: s.update(x, state, key=key, params=params)[0])(losses)


def _state_after_two_epochs(s, losses):
    """Two epochs of DWA, two steps of FAMO: a state that changes the weights."""
    state = s.init(losses)
    if s.stateful:
        for scale in (1.0, 0.8):
            state = s.update(losses * scale, state)[1]
            if isinstance(s, sc.FAMO):
                state = s.after_step(losses * scale * jnp.asarray([0.5, 0.9, 1.0]), state)
            else:
                state = s.end_epoch(state)
    return state


@pytest.mark.parametrize("name", list(SCALARIZERS))
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_scalarizer_transformations(name, dtype):
    """jit equals eager, vmap equals a loop, the dtype is kept, NaN in gives NaN out."""
    s = SCALARIZERS[name]()
    key = jax.random.key(0)
    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == "float64"):
        batch = jnp.asarray(rng.uniform(0.2, 2.0, (4, 3)), dtype)
        state = _state_after_two_epochs(s, batch[0])
        value, grad = _run(s, batch[0], state, key)
        assert value.dtype == dtype and grad.dtype == dtype
        jv, jg = jax.jit(_run, static_argnums=0)(s, batch[0], state, key)
        tol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(jv, value, rtol=tol)
        np.testing.assert_allclose(jg, grad, rtol=tol, atol=tol)
        bv, bg = jax.vmap(_run, in_axes=(None, 0, None, None))(s, batch, state, key)
        for i in range(4):
            v, g = _run(s, batch[i], state, key)
            np.testing.assert_allclose(bv[i], v, rtol=tol)
            np.testing.assert_allclose(bg[i], g, rtol=tol, atol=tol)
        nan_value, _ = _run(s, batch[0].at[1].set(jnp.nan), state, key)
        assert np.isnan(float(nan_value))


def test_dwa_keeps_its_history_on_a_non_finite_batch(x64):
    dwa = sc.DWA()
    state = dwa.init(jnp.ones(3))
    state = dwa.update(jnp.asarray([1.0, 2.0, 3.0]), state)[1]
    value, after = dwa.update(jnp.asarray([1.0, jnp.inf, 3.0]), state)
    assert not np.isfinite(float(value))
    for a, b in zip(after, state):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["DWA", "FAMO"])
def test_stateful_scalarizers_vmap_over_runs_and_round_trip(name, x64):
    """Independent runs vmapped (states batched too) equal each run alone, through the extra
    step (DWA's end_epoch, FAMO's after_step); the state copied to numpy and back (as a
    checkpoint would) continues a run identically."""
    s = SCALARIZERS[name]()
    extra = s.end_epoch if isinstance(s, sc.DWA) else None

    def run(batches):
        state = s.init(batches[0])
        values = []
        for t in range(batches.shape[0]):
            value, state = s.update(batches[t], state)
            values.append(value)
            if extra is not None:
                state = extra(state)
            else:
                state = s.after_step(batches[t] * 0.9 ** jnp.arange(3.0), state)
        return jnp.stack(values), state

    runs = jnp.asarray(np.random.default_rng(4).uniform(0.2, 2.0, (3, 4, 3)))
    batched_values, batched_state = jax.vmap(run)(runs)
    for r in range(3):
        values, state = run(runs[r])
        np.testing.assert_allclose(batched_values[r], values, rtol=1e-12)
        for a, b in zip(jax.tree_util.tree_leaves(batched_state), jax.tree_util.tree_leaves(state)):
            np.testing.assert_allclose(a[r], b, rtol=1e-12)
    _, state = run(runs[0])
    leaves, treedef = jax.tree_util.tree_flatten(state)
    restored = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
    a = s.update(runs[1, 0], state)
    b = s.update(runs[1, 0], restored)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)

"""jd_aggregate in optax chains: equals the aggregator by hand, composes, keeps state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxjd as jd

PARAMS = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}


def jacobian(seed=0, m=3):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((m, 2, 3)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal((m, 3)), jnp.float32),
    }


def test_update_equals_aggregator_by_hand():
    tx = jd.jd_aggregate(jd.upgrad(), num_objectives=3)
    state = tx.init(PARAMS)
    J = jacobian()
    out, state = jax.jit(tx.update)(J, state, PARAMS)
    expected = jd.upgrad(J)
    for k in PARAMS:
        np.testing.assert_allclose(out[k], expected[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.weights, jd.upgrad().weights(J), rtol=1e-6)


def test_chain_with_adam_equals_manual_pipeline():
    agg = jd.upgrad()
    tx = optax.chain(jd.jd_aggregate(agg), optax.adam(1e-2))
    adam = optax.adam(1e-2)
    s1, s2 = tx.init(PARAMS), adam.init(PARAMS)
    p1 = p2 = PARAMS
    step = jax.jit(tx.update)
    for seed in range(3):
        J = jacobian(seed)
        u1, s1 = step(J, s1, p1)
        u2, s2 = adam.update(agg(J), s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for k in PARAMS:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7)


def test_random_aggregator_key_in_state_and_override():
    tx = jd.jd_aggregate(jd.random(), num_objectives=3, seed=7)
    state = tx.init(PARAMS)
    J = jacobian()
    a, s1 = tx.update(J, state, PARAMS)
    b, _ = tx.update(J, state, PARAMS)
    c, _ = tx.update(J, s1, PARAMS)
    for k in PARAMS:
        np.testing.assert_array_equal(a[k], b[k])  # same state, same key: reproducible
    assert not np.allclose(a["b"], c["b"])  # the key advances
    key = jax.random.key(3)
    d, s2 = tx.update(J, state, PARAMS, key=key)
    np.testing.assert_allclose(d["b"], jd.random(J, key=key)["b"], rtol=1e-6)
    assert np.array_equal(jax.random.key_data(s2.key), jax.random.key_data(state.key))


def test_init_on_abstract_params():
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    state = jd.jd_aggregate(jd.upgrad(), num_objectives=3).init(abstract)
    assert state.weights.shape == (3,)
    state = optax.chain(jd.jd_aggregate(jd.mgda()), optax.adam(1e-3)).init(abstract)
    assert len(state) == 2


COMPOSITIONS = {
    "adam": lambda: optax.adam(1e-3),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "inject": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-3), 2).gradient_transformation(),
    "apply_if_finite": lambda: optax.apply_if_finite(optax.adam(1e-3), 3),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_compositions_run_two_jitted_steps(name):
    tx = optax.chain(jd.jd_aggregate(jd.upgrad(), num_objectives=3), COMPOSITIONS[name]())
    state = tx.init(PARAMS)
    params = PARAMS
    step = jax.jit(tx.update)
    for seed in range(2):
        updates, state = step(jacobian(seed), state, params, losses=jnp.ones(3))
        params = optax.apply_updates(params, updates)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(params))
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(PARAMS)


def test_partition_groups_aggregate_independently():
    labels = {"w": "trunk", "b": "head"}
    tx = optax.partition(
        {
            "trunk": optax.chain(jd.jd_aggregate(jd.upgrad()), optax.sgd(1.0)),
            "head": optax.chain(jd.jd_aggregate(jd.mean()), optax.sgd(1.0)),
        },
        labels,
    )
    state = tx.init(PARAMS)
    J = jacobian()
    updates, _ = jax.jit(tx.update)(J, state, PARAMS)
    np.testing.assert_allclose(updates["w"], -jd.upgrad(J["w"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(updates["b"], -jd.mean(J["b"]), rtol=1e-6, atol=1e-7)


def test_wrong_number_of_objectives_is_caught():
    tx = jd.jd_aggregate(jd.upgrad(), num_objectives=4)
    with pytest.raises(ValueError, match="num_objectives=4"):
        tx.update(jacobian(), tx.init(PARAMS), PARAMS)
    with pytest.raises(TypeError, match="Aggregator"):
        jd.jd_aggregate(optax.adam(1e-3))

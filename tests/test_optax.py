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


@pytest.mark.standard_dtype_promotion  # optax.adam
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


@pytest.mark.standard_dtype_promotion  # optax.adam
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


def test_monitor_keeps_this_steps_conflict_statistics():
    """monitor=True: state.stats equals conflict_statistics of this step's Gramian and weights;
    for an aggregator without weights (GradDrop) the directional derivatives are J d."""
    J = jacobian(1)
    G = jd.gramian(J)
    tx = jd.jd_aggregate(jd.upgrad(), num_objectives=3, monitor=True)
    out, state = jax.jit(tx.update)(J, tx.init(PARAMS), PARAMS)
    expected = jd.monitoring.conflict_statistics(G, jd.upgrad().weights(J))
    for got, ref in zip(state.stats, expected):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert bool(state.stats.non_conflicting)
    np.testing.assert_allclose(state.stats.directional_derivatives, jd.row_dots(J, out), rtol=1e-5)

    tx = jd.jd_aggregate(jd.graddrop(), num_objectives=3, monitor=True, seed=2)
    out, state = jax.jit(tx.update)(J, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(state.stats.directional_derivatives, jd.row_dots(J, out), rtol=1e-5)
    assert bool(state.stats.non_conflicting) == bool(np.all(jd.row_dots(J, out) >= -1e-6))
    with pytest.raises(ValueError, match="num_objectives"):
        jd.jd_aggregate(jd.upgrad(), monitor=True)


def test_microbatch_accumulation_equals_the_whole_batch():
    """mean_over_microbatches(value_and_jacobian(f)) on 4 micro-batches equals the Jacobian of the
    whole batch's mean losses, and feeding it to jd_aggregate gives the whole batch's update."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((16, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 2)), jnp.float32)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros(2)}

    def losses(p, batch):
        xb, yb = batch
        return jnp.mean((xb @ p["w"] + p["b"][None] - yb) ** 2, axis=0)  # one loss per output

    whole_values, whole_J = jd.value_and_jacobian(losses)(params, (x, y))
    step = jax.jit(jd.mean_over_microbatches(jd.value_and_jacobian(losses)))
    values, J = step(params, (x.reshape(4, 4, 3), y.reshape(4, 4, 2)))
    np.testing.assert_allclose(values, whole_values, rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(J[k], whole_J[k], rtol=1e-5, atol=1e-6)
    tx = jd.jd_aggregate(jd.upgrad())
    a, _ = tx.update(J, tx.init(params))
    b = jd.upgrad(whole_J)
    for k in params:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="same leading axis"):
        step(params, (x.reshape(4, 4, 3), y))


@pytest.mark.standard_dtype_promotion  # optax.adam
def test_state_round_trips_through_host_memory():
    """The whole optax state (key, weights, a stateful aggregator's state, statistics) is a plain
    pytree: copied to numpy and back (as a checkpoint would), it continues the run identically."""
    tx = optax.chain(
        jd.jd_aggregate(jd.nash_mtl(), num_objectives=3, monitor=True), optax.adam(1e-2)
    )
    step = jax.jit(tx.update)
    state = tx.init(PARAMS)
    _, state = step(jacobian(0), state, PARAMS)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    restored = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(np.asarray(x)) for x in jax.device_get(leaves)]
    )
    a, sa = step(jacobian(1), state, PARAMS)
    b, sb = step(jacobian(1), restored, PARAMS)
    for x, y in zip(jax.tree_util.tree_leaves((a, sa)), jax.tree_util.tree_leaves((b, sb))):
        np.testing.assert_array_equal(x, y)
    assert int(sa[0].inner.count) == 2  # the stateful aggregator advanced twice

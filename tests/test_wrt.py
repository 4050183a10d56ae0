"""``wrt=`` on every engine (issue #13 item 19): models that hold integer counters, PRNG keys or
other non-float leaves (equinox modules, the state of a Flax NNX module) are differentiated in
their float arrays only, and the Jacobian, Gramian and gradients mirror the model with ``None``
elsewhere."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd


class Net(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear
    steps: jax.Array  # an integer counter
    key: jax.Array  # a PRNG key
    tag: int  # a Python leaf

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))[0]


def _net():
    k1, k2 = jax.random.split(jax.random.key(0))
    return Net(
        eqx.nn.Linear(3, 5, key=k1),
        eqx.nn.Linear(5, 1, key=k2),
        jnp.asarray(7, jnp.int32),
        jax.random.key(1),
        3,
    )


def losses(model, x, y):
    return (jax.vmap(model)(x) - y) ** 2  # one loss per sample


X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).standard_normal(6), jnp.float32)


def _reference():
    params, static = eqx.partition(_net(), eqx.is_inexact_array)
    _, J = jd.value_and_jacobian(lambda p, x, y: losses(eqx.combine(p, static), x, y))(params, X, Y)
    return params, J


def _assert_tree_close(a, b, tol=1e-5):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("argnums", [0, 2])
def test_value_and_jacobian_with_wrt(argnums):
    _, J_ref = _reference()
    if argnums == 0:
        _, J = jax.jit(jd.value_and_jacobian(losses, wrt=eqx.is_inexact_array))(_net(), X, Y)
    else:  # the model as a later argument

        def moved(x, y, model):
            return losses(model, x, y)

        _, J = jd.value_and_jacobian(moved, argnums=2, wrt=eqx.is_inexact_array)(X, Y, _net())
    _assert_tree_close(J, J_ref)
    assert J.steps is None and J.key is None and J.tag is None


@pytest.mark.parametrize(
    "method",
    [
        "jacobian",
        "per_sample",
        pytest.param("columns", marks=pytest.mark.slow),
        pytest.param("layerwise", marks=pytest.mark.slow),
    ],
)
def test_value_and_gramian_with_wrt(method):
    _, J_ref = _reference()
    _, G = jax.jit(jd.value_and_gramian(losses, method=method, wrt=eqx.is_inexact_array))(
        _net(), X, Y
    )
    np.testing.assert_allclose(G, jd.gramian(J_ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["jacobian", "per_sample"])
def test_value_and_weighted_grad_with_wrt(method):
    _, J_ref = _reference()
    step = jd.value_and_weighted_grad(
        losses, jd.upgrad_weighting(), method=method, wrt=eqx.is_inexact_array
    )
    _, w, grad = jax.jit(step)(_net(), X, Y)
    _assert_tree_close(grad, jd.combine(w, J_ref), tol=1e-4)
    model = eqx.apply_updates(_net(), jax.tree_util.tree_map(lambda g: -0.1 * g, grad))
    assert int(model.steps) == 7  # the counter is left alone


def test_mtl_engines_with_wrt():
    """A trunk and heads that both hold a counter: only their float arrays are differentiated."""
    trunk = {
        "w": jnp.asarray(np.random.default_rng(2).standard_normal((3, 4)), jnp.float32),
        "n": jnp.asarray(1, jnp.int32),
    }
    heads = {
        "h": jnp.asarray(np.random.default_rng(3).standard_normal((2, 4)), jnp.float32),
        "n": jnp.asarray(2, jnp.int32),
    }

    def trunk_fn(t, x):
        return jnp.tanh(x @ t["w"])

    def heads_fn(h, f, x):
        return jnp.mean((f @ h["h"].T) ** 2, axis=0)

    float_only = {"w": trunk["w"]}, {"h": heads["h"]}
    ref = jd.mtl_value_and_jacobian(
        lambda t, x: trunk_fn(dict(t, n=None), x), lambda h, f, x: heads_fn(dict(h, n=None), f, x)
    )(*float_only, X)
    out = jd.mtl_value_and_jacobian(trunk_fn, heads_fn, wrt=eqx.is_inexact_array)(trunk, heads, X)
    np.testing.assert_allclose(out[1]["w"], ref[1]["w"], rtol=1e-5)
    assert out[1]["n"] is None and out[2]["n"] is None
    _, G, _ = jd.mtl_value_and_gramian(trunk_fn, heads_fn, wrt=eqx.is_inexact_array)(
        trunk, heads, X
    )
    np.testing.assert_allclose(G, jd.gramian(ref[1]), rtol=1e-4, atol=1e-6)
    _, (tg, hg), w = jd.mtl_value_and_grad(
        trunk_fn, heads_fn, jd.upgrad(), wrt=eqx.is_inexact_array
    )(trunk, heads, X)
    np.testing.assert_allclose(tg["w"], jd.combine(w, ref[1])["w"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(hg["h"], ref[2]["h"], rtol=1e-5)


def test_wrt_that_selects_nothing_is_refused():
    with pytest.raises(ValueError, match="wrt selects no leaf"):
        jd.value_and_jacobian(losses, wrt=lambda leaf: False)(_net(), X, Y)

"""Empty and degenerate shapes: J with zero columns (n = 0, also as one leaf of a pytree), one
row (m = 1) and one column (n = 1), for every registered method, plain, under ``jit`` and under
``vmap``. Each call gives an update shaped like a row of J (finite, the same in all three modes)
or a ``ValueError`` that names the argument and the number of objectives, as TorchJD's
aggregators do (its suite expects an update of shape (0,) for a 4 x 0 Jacobian)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from methods import FAST, REGISTRY

import jaxjd as jd

KEY = jax.random.key(0)

SHAPES = {
    "zero_columns": (4, 0),
    "one_row": (1, 5),
    "one_column": (4, 1),
    "tree_with_an_empty_leaf": None,
}

# Methods whose hyper-parameters fix m = 4 (the registry's configuration): on m = 1 they refuse
# the input, naming the argument.
REFUSES_ONE_ROW = {"constant": "weights", "graddrop": "leak", "krum": "n_byzantine",
                   "trimmed_mean": "trim_number"}  # fmt: skip


def _jacobian(shape):
    rng = np.random.default_rng(0)
    if shape is None:
        return {
            "a": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
            "b": jnp.zeros((4, 0, 2)),
        }
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _run(spec, J, mode):
    method = spec.build()

    def step(J):
        return method.aggregate(J, method.init(J), key=KEY).update

    if mode == "plain":
        return step(J)
    if mode == "jit":
        return jax.jit(step)(J)
    batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), J)
    return jax.tree_util.tree_map(lambda x: x[0], jax.vmap(step)(batch))


def _cases():
    for spec in REGISTRY:
        for shape in SHAPES:
            # By default: the fast suite's methods (methods.FAST) on zero columns (the input
            # that raised from inside jax); the other shapes and methods in the slow sweep.
            fast = shape == "zero_columns" and spec.name in FAST
            yield pytest.param(spec, shape, id=f"{spec.name}-{shape}",
                               marks=() if fast else pytest.mark.slow)  # fmt: skip


@pytest.mark.parametrize("spec, shape", _cases())
def test_degenerate_shapes_work_or_are_refused_by_name(spec, shape):
    J = _jacobian(SHAPES[shape])
    m = jax.tree_util.tree_leaves(J)[0].shape[0]
    if m == 1 and spec.name in REFUSES_ONE_ROW:
        for mode in ("plain", "jit", "vmap"):
            with pytest.raises(ValueError, match=rf"{REFUSES_ONE_ROW[spec.name]}.*m = 1"):
                _run(spec, J, mode)
        return
    outs = {mode: _run(spec, J, mode) for mode in ("plain", "jit", "vmap")}
    for mode, out in outs.items():
        assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(J), mode
        for got, leaf in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(J)):
            assert got.shape == leaf.shape[1:], (mode, got.shape)
            assert np.all(np.isfinite(np.asarray(got))), mode
    tol = max(1e-5, spec.loose.get("float32", 0.0))
    for mode in ("jit", "vmap"):
        for a, b in zip(
            jax.tree_util.tree_leaves(outs[mode]), jax.tree_util.tree_leaves(outs["plain"])
        ):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * (1 + np.abs(b).max(initial=0)))


@pytest.mark.parametrize("factory", [jd.upgrad, jd.mean, jd.mgda, jd.dualproj, jd.imtl_g])
def test_one_row_gives_that_row(factory):
    """With one objective there is nothing to trade off: the update is the gradient itself."""
    g = jnp.asarray([[3.0, -4.0, 0.5]])
    np.testing.assert_allclose(factory()(g), g[0], rtol=1e-5)


def test_zero_columns_give_an_empty_update_and_the_zero_gramians_weights():
    J = jnp.zeros((4, 0))
    assert jd.upgrad()(J).shape == (0,)
    np.testing.assert_allclose(jd.upgrad().weights(J), jd.upgrad_weighting()(jnp.zeros((4, 4))))


def test_no_rows_is_refused_by_name():
    with pytest.raises(ValueError, match="m = 0"):
        jd.upgrad(jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="0 x 0"):
        jd.upgrad_weighting()(jnp.zeros((0, 0)))

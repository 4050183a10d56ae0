"""Every aggregator under jit, vmap, on pytrees, with grad, in float32 and float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd

FACTORIES = {
    "upgrad": lambda: jd.upgrad(),
    "upgrad_pgd": lambda: jd.upgrad(solver="nesterov_pgd"),
    "dualproj": lambda: jd.dualproj(),
    "mgda": lambda: jd.mgda(),
    "mean": lambda: jd.mean(),
    "sum": lambda: jd.sum(),
    "constant": lambda: jd.constant(weights=[1.0, -0.5, 2.0, 0.25]),
    "random": lambda: jd.random(),
    "imtl_g": lambda: jd.imtl_g(),
    "aligned_mtl": lambda: jd.aligned_mtl(scale_mode="median"),
    "config": lambda: jd.config(),
    "krum": lambda: jd.krum(n_byzantine=1, n_selected=2),
    "trimmed_mean": lambda: jd.trimmed_mean(trim_number=1),
    "pcgrad": lambda: jd.pcgrad(),
    "graddrop": lambda: jd.graddrop(leak=[0.1, 0.2, 0.3, 0.4]),
    "fairgrad": lambda: jd.fairgrad(alpha=1.0),
    "cagrad": lambda: jd.cagrad(c=0.5),
}
KEY = jax.random.key(3)


def jacobian(dtype, m=4, n=7, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n)) * rng.choice([-2.0, 1.0], size=(m, 1))
    return jnp.asarray(a.astype(dtype))


# CAGrad's first-order solver stops on the gradient mapping: its weights are accurate to ~1e-7
# (float64) and ~1e-3 (float32, 3e-4 absolute seen on a vmapped batch), so jit/vmap/pytree
# variants agree to that.
LOOSE = {"cagrad": {"float64": 1e-7, "float32": 1e-3}}


def tol(dtype, name=None):
    if name in LOOSE:
        return LOOSE[name][dtype]
    return 1e-12 if dtype == "float64" else 1e-5


@pytest.mark.parametrize("name", list(FACTORIES))
def test_jit_equals_eager(name, dtype):
    agg = FACTORIES[name]()
    J = jacobian(dtype)
    eager = agg(J, key=KEY)
    closed = jax.jit(lambda J, k: agg(J, key=k))(J, KEY)
    as_arg = jax.jit(lambda a, J, k: a(J, key=k))(agg, J, KEY)
    static = jax.jit(lambda a, J, k: a(J, key=k), static_argnums=0)(agg, J, KEY)
    for out in (closed, as_arg, static):
        assert out.dtype == J.dtype
        np.testing.assert_allclose(out, eager, rtol=tol(dtype, name) * 10, atol=tol(dtype, name))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_vmap_over_a_batch_of_jacobians(name, dtype):
    agg = FACTORIES[name]()
    Js = jnp.stack([jacobian(dtype, seed=s) for s in range(5)])
    keys = jax.random.split(KEY, 5)
    batched = jax.vmap(lambda J, k: agg(J, key=k))(Js, keys)
    assert batched.shape == (5, 7)
    for i in range(5):
        np.testing.assert_allclose(
            batched[i], agg(Js[i], key=keys[i]), rtol=tol(dtype, name) * 10, atol=tol(dtype, name)
        )


@pytest.mark.parametrize("name", list(FACTORIES))
def test_pytree_equals_matrix(name, dtype):
    agg = FACTORIES[name]()
    J = jacobian(dtype)
    # Leaves flatten as b, w: build the tree so that its matrix view is J.
    tree = {"b": (J[:, :1],), "w": J[:, 1:].reshape(4, 2, 3)}
    np.testing.assert_array_equal(jd.matrix_view(tree), J)
    out = agg(tree, key=KEY)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure({"w": 0, "b": (0,)})
    assert out["w"].shape == (2, 3) and out["b"][0].shape == (1,)
    expected = jd.unravel_row(agg(J, key=KEY), tree)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=tol(dtype, name) * 10, atol=tol(dtype, name))
    if isinstance(agg, jd.GramianWeightedAggregator):
        np.testing.assert_allclose(
            agg.weights(tree, key=KEY),
            agg.weights(J, key=KEY),
            rtol=tol(dtype, name) * 10,
            atol=tol(dtype, name),
        )


def test_mixed_leaf_dtypes_keep_their_dtype():
    J = {"a": jnp.ones((3, 2), jnp.bfloat16), "b": jnp.arange(6.0).reshape(3, 2)}
    out = jd.upgrad(J)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    assert jd.gramian(J).dtype == jnp.float32


def test_weighting_vmapped_over_gramians(dtype):
    """Per-sample Gramian weighting: vmap the weighting over a batch of Gramians."""
    Gs = jnp.stack([jd.gramian(jacobian(dtype, seed=s)) for s in range(6)])
    w = jax.vmap(jd.upgrad_weighting())(Gs)
    assert w.shape == (6, 4) and w.dtype == Gs.dtype
    for i in range(6):
        np.testing.assert_allclose(
            w[i], jd.upgrad_weighting()(Gs[i]), rtol=tol(dtype) * 10, atol=tol(dtype)
        )


def test_vmap_of_vmap(x64):
    Js = jnp.stack(
        [jnp.stack([jacobian("float64", seed=3 * i + j) for j in range(3)]) for i in range(2)]
    )
    out = jax.vmap(jax.vmap(jd.upgrad()))(Js)
    np.testing.assert_allclose(out[1, 2], jd.upgrad(Js[1, 2]), rtol=1e-12)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda", "mean"])
def test_grad_treats_weights_as_constants(name, x64):
    """Differentiating through an aggregator: weights are constants, J^T w is linear in J."""
    agg = FACTORIES[name]()
    J = jacobian("float64")
    v = jnp.arange(7.0)
    g = jax.grad(lambda J: agg(J) @ v)(J)
    w = agg.weights(J)
    np.testing.assert_allclose(g, jnp.outer(w, v), rtol=1e-12)


def test_solver_info_is_readable(x64):
    G = jd.gramian(jacobian("float64", m=6, n=9))
    w, info = jd.upgrad_weighting().solve(G)
    assert info.converged.shape == (6,) and bool(info.converged.all())
    assert int(info.iterations.max()) >= 0 and float(info.kkt_residual.max()) < 1e-12
    np.testing.assert_allclose(w, jd.upgrad_weighting()(G))
    w, info = jd.dualproj_weighting(solver="nesterov_pgd").solve(G)
    assert info.converged.shape == () and bool(info.converged)
    w, info = jax.jit(jd.upgrad_weighting().solve)(G)
    assert bool(info.converged.all())

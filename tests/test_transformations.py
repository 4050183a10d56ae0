"""Every registered method (tests/methods.py), stateless or not, through its one protocol:
true eager against jit, vmap, vmap of vmap, pytrees, float32 and float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from methods import BY_NAME, REGISTRY, default_or_slow

import jaxjd as jd

KEY = jax.random.key(3)
# One method under op-by-op dispatch (ConFIG: a QR, a pseudo-inverse) by default; every method
# with a true eager path in the slow sweep (op-by-op runs compile each primitive: seconds per
# method).
_EAGER_FAST = {"config"}
EAGER = [
    spec if spec.name in _EAGER_FAST else pytest.param(spec, marks=pytest.mark.slow)
    for spec in REGISTRY
    if spec.eager
]


def jacobian(dtype, m=4, n=7, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n)) * rng.choice([-2.0, 1.0], size=(m, 1))
    return jnp.asarray(a.astype(dtype))


def tol(dtype, spec=None):
    if spec is not None and spec.loose:
        return spec.loose[dtype]
    return 1e-12 if dtype == "float64" else 1e-5


def run(method, J, key=KEY):
    """The protocol from a fresh state; two steps for a stateful method (the second sees a
    non-initial state)."""
    state = method.init(J)
    if method.stateful:
        _, state = method.update(J, state, key=key)
    return method.aggregate(J, state, key=jax.random.fold_in(key, 1))


def close(a, b, dtype, spec):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=tol(dtype, spec) * 10, atol=tol(dtype, spec))


@pytest.mark.parametrize("spec", EAGER, ids=lambda s: s.name)
@pytest.mark.parametrize(
    "dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)], indirect=True
)
def test_jit_equals_true_eager(spec, dtype):
    method = spec.build()
    J = jacobian(dtype)
    with jax.disable_jit():
        eager = run(method, J)
    as_arg = jax.jit(run)(method, J, KEY)  # hyper-parameters traced
    static = jax.jit(run, static_argnums=0)(method, J, KEY)  # a method is hashable: constants
    for out in (as_arg, static):
        assert out.update.dtype == J.dtype
        close(out, eager, dtype, spec)


# The dual-cone solver by default; every method in the slow sweep.
_VMAP2_DEFAULT = {"upgrad"}


@pytest.mark.parametrize("spec", default_or_slow())
@pytest.mark.parametrize(
    "dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)], indirect=True
)
def test_vmap_over_jacobians_and_states(spec, dtype):
    method = spec.build()
    Js = jnp.stack([jacobian(dtype, seed=s) for s in range(5)])
    keys = jax.random.split(KEY, 5)
    batched = jax.vmap(lambda J, k: run(method, J, k))(Js, keys)
    assert batched.update.shape == (5, 7)
    for i in range(5):
        one = jax.tree_util.tree_map(lambda x, i=i: x[i], batched)
        close(one, run(method, Js[i], keys[i]), dtype, spec)


@pytest.mark.parametrize("spec", default_or_slow(_VMAP2_DEFAULT))
def test_vmap_of_vmap(spec, x64):
    method = spec.build()
    Js = jnp.stack(
        [jnp.stack([jacobian("float64", seed=3 * i + j) for j in range(3)]) for i in range(2)]
    )
    keys = jax.random.split(KEY, 6).reshape(2, 3)
    out = jax.vmap(jax.vmap(lambda J, k: run(method, J, k)))(Js, keys)
    close(out.update[1, 2], run(method, Js[1, 2], keys[1, 2]).update, "float64", spec)


# A Gramian-weighted method, one from m alone, and two that read J's leaves themselves (QR leaf
# by leaf, per-coordinate rules) by default; every method in the slow sweep.
_PYTREE_DEFAULT = {"upgrad", "mean", "config", "trimmed_mean"}


@pytest.mark.parametrize("spec", default_or_slow(_PYTREE_DEFAULT))
def test_pytree_equals_matrix(spec, x64):
    dtype = "float64"
    method = spec.build()
    J = jacobian(dtype)
    # Leaves flatten as b, w: build the tree so that its matrix view is J.
    tree = {"b": (J[:, :1],), "w": J[:, 1:].reshape(4, 2, 3)}
    np.testing.assert_array_equal(jd.matrix_view(tree), J)
    out = run(method, tree)
    assert jax.tree_util.tree_structure(out.update) == jax.tree_util.tree_structure(
        {"w": 0, "b": (0,)}
    )
    assert out.update["w"].shape == (2, 3) and out.update["b"][0].shape == (1,)
    flat = run(method, J)
    close(out.update, jd.unravel_row(flat.update, tree), dtype, spec)
    close(out.weights, flat.weights, dtype, spec)


@pytest.mark.parametrize("spec", default_or_slow())
def test_protocol_spellings_agree(spec):
    """``update`` is ``aggregate`` without the weights; the update is ``J^T w`` when there are
    weights; a stateless method's call is the protocol with an empty state, and the weighting
    alone gives the aggregator's weights (float32; the other tests cover float64)."""
    dtype = "float32"
    method = spec.build()
    J = jacobian(dtype)
    full = method.aggregate(J, method.init(J), key=KEY)
    update, state = method.update(J, method.init(J), key=KEY)
    close(update, full.update, dtype, spec)
    close(state, full.state, dtype, spec)
    if full.weights is not None:
        close(full.update, jd.combine(full.weights, J), dtype, spec)
    if spec.weighting is not None:
        weighting = spec.weighting()
        w, _ = weighting.update(jd.gramian(J), weighting.init(4, J.dtype), key=KEY)
        close(w, full.weights, dtype, spec)
    if method.stateful:
        with pytest.raises(TypeError, match="stateful"):
            method(J, key=KEY)
    else:
        assert isinstance(full.state, jd.aggregation.EmptyState)
        close(method(J, key=KEY), full.update, dtype, spec)


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


@pytest.mark.parametrize(
    "name", ["upgrad", "dualproj", "mgda", "mean", "imtl_g", "aligned_mtl", "krum", "config"]
)
def test_grad_treats_weights_as_constants(name, x64):
    """Differentiating through an aggregator: weights are constants, J^T w is linear in J."""
    agg = BY_NAME[name].build()
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

"""Gramian engines and the one-call weighted gradient, against the explicit jax.jacrev Jacobian on
ordinary JAX models (MLP, CNN, embedding + layer norm, a parameter used twice, (B,) and (B, T)
losses, pytree inputs); memory measured from XLA's compiled buffers, not timers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxjd as jd


def _affine(x, layer):
    """``x @ w + b`` with the bias broadcast explicitly (the suite also runs with
    ``jax_numpy_rank_promotion="raise"``)."""
    y = x @ layer["w"]
    return y + jnp.broadcast_to(layer["b"], y.shape)


def _dense(key, n_in, n_out):
    return {"w": jax.random.normal(key, (n_in, n_out)) / jnp.sqrt(n_in), "b": jnp.zeros(n_out)}


def mlp():
    k = jax.random.split(jax.random.key(0), 3)
    params = {"l1": _dense(k[0], 6, 16), "l2": _dense(k[1], 16, 1)}
    x = jax.random.normal(k[2], (8, 6))
    y = jnp.sin(x[:, 0])

    def losses(p, batch):
        x, y = batch
        h = jnp.tanh(_affine(x, p["l1"]))
        return _affine(h, p["l2"])[:, 0] - y  # signed residuals: (B,)

    return losses, params, (x, y)


def cnn():
    k = jax.random.split(jax.random.key(1), 3)
    params = {"conv": jax.random.normal(k[0], (4, 1, 3, 3)) * 0.3, "head": _dense(k[1], 4 * 36, 3)}
    x = jax.random.normal(k[2], (5, 1, 8, 8))
    labels = jnp.arange(5) % 3

    def losses(p, batch):
        x, labels = batch
        h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "VALID")
        h = jax.nn.relu(h).reshape(x.shape[0], -1)
        logits = _affine(h, p["head"])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]

    return losses, params, (x, labels)


def embedding_layernorm():
    k = jax.random.split(jax.random.key(2), 3)
    params = {
        "embed": jax.random.normal(k[0], (11, 8)),
        "ln": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
        "out": _dense(k[1], 8, 1),
    }
    tokens = jax.random.randint(k[2], (6, 5), 0, 11)

    def losses(p, tokens):
        h = p["embed"][tokens]  # (B, L, 8)
        mu = h.mean(-1, keepdims=True)
        var = h.var(-1, keepdims=True)
        h = (h - mu) / jnp.sqrt(var + 1e-5) * p["ln"]["scale"][None, None] + p["ln"]["bias"][
            None, None
        ]
        return jnp.mean(_affine(h, p["out"]), axis=(1, 2)) ** 2

    return losses, params, tokens


def shared_weight():
    k = jax.random.split(jax.random.key(3), 2)
    params = {"w": jax.random.normal(k[0], (5, 7)) * 0.4}
    x = jax.random.normal(k[1], (6, 5))

    def losses(p, x):  # W used twice: encoder and tied decoder
        h = jnp.tanh(x @ p["w"])
        return jnp.sum((h @ p["w"].T - x) ** 2, axis=1)

    return losses, params, x


def multi_output():
    k = jax.random.split(jax.random.key(4), 3)
    params = {"trunk": _dense(k[0], 4, 10), "heads": _dense(k[1], 10, 3)}
    batch = {"x": jax.random.normal(k[2], (5, 4)), "y": jnp.ones((5, 3))}

    def losses(p, batch):  # (B, T): instance-wise multi-task
        h = jnp.tanh(_affine(batch["x"], p["trunk"]))
        return (_affine(h, p["heads"]) - batch["y"]) ** 2

    return losses, params, batch


def cnn_multi_task():
    _, params, batch = cnn()

    def task_losses(p, batch):  # (B, T): every class's log-likelihood is a task
        x, _ = batch
        h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "VALID")
        h = jax.nn.relu(h).reshape(x.shape[0], -1)
        return -jax.nn.log_softmax(_affine(h, p["head"]))

    return task_losses, params, batch


MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn_BxT": cnn_multi_task,
    "embedding_layernorm": embedding_layernorm,
    "shared_weight": shared_weight,
    "multi_output_BxT": multi_output,
}


def explicit(losses, params, batch):
    J = jax.jit(jax.jacrev(lambda p: jnp.ravel(losses(p, batch))))(params)
    return J, jd.gramian(J)


def _engine_cases():
    """The two engines that read the program (per_sample, layerwise) on every model by default;
    the Jacobian and column engines (a jacrev and a loop of VJPs/JVPs) on the first model, and
    on the others in the slow sweep."""
    first = next(iter(MODELS))
    return [
        pytest.param(
            model,
            method,
            id=f"{model}-{method}",
            marks=()
            if method in ("per_sample", "layerwise") or model == first
            else pytest.mark.slow,
        )
        for model in MODELS
        for method in ("jacobian", "columns", "per_sample", "layerwise")
    ]


@pytest.mark.parametrize("model, method", _engine_cases())
def test_gramian_engines_equal_jacrev(model, method, x64):
    losses, params, batch = MODELS[model]()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    _, G_ref = explicit(losses, params, batch)
    chunk = None if method in ("per_sample", "layerwise") else 3
    values, G = jax.jit(jd.value_and_gramian(losses, method=method, chunk_size=chunk))(
        params, batch
    )
    np.testing.assert_allclose(values, losses(params, batch), rtol=1e-12)
    np.testing.assert_allclose(G, G_ref, rtol=1e-10, atol=1e-10 * float(jnp.abs(G_ref).max()))


def test_gramian_engines_float32():
    losses, params, batch = MODELS["cnn"]()
    _, G_ref = explicit(losses, params, batch)
    for method in ("jacobian", "columns", "per_sample", "layerwise"):
        _, G = jax.jit(jd.value_and_gramian(losses, method=method))(params, batch)
        assert G.dtype == jnp.float32
        np.testing.assert_allclose(G, G_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(G_ref).max()))


@pytest.mark.parametrize(
    "model,method",
    [
        ("mlp", "columns"),
        ("multi_output_BxT", "jacobian"),
        ("mlp", "per_sample"),
        ("cnn", "per_sample"),
        ("embedding_layernorm", "per_sample"),
        ("shared_weight", "layerwise"),
        # the same engines on more models: the slow sweep
        pytest.param("embedding_layernorm", "layerwise", marks=pytest.mark.slow),
        pytest.param("multi_output_BxT", "layerwise", marks=pytest.mark.slow),
        pytest.param("multi_output_BxT", "per_sample", marks=pytest.mark.slow),
        pytest.param("cnn", "layerwise", marks=pytest.mark.slow),
    ],
)
def test_weighted_grad_equals_aggregating_the_jacobian(model, method, x64):
    """grad(w . losses) = J^T w with w = weighting(J J^T); (B, T) weights keep the losses' shape;
    per_sample and layerwise form J^T w from their captured factors (and the fallback rows)."""
    losses, params, batch = MODELS[model]()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    J, G = explicit(losses, params, batch)
    weighting = jd.upgrad_weighting()
    step = jax.jit(jd.value_and_weighted_grad(losses, weighting, method=method))
    values, w, grad = step(params, batch)
    assert w.shape == values.shape
    np.testing.assert_allclose(jnp.ravel(w), weighting(G), rtol=1e-9, atol=1e-12)
    expected = jd.combine(jnp.ravel(w), J)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_partial_jd_gramian_from_a_subset(x64):
    """gramian_filter: G from the last layer only, the update over every parameter."""
    losses, params, batch = MODELS["mlp"]()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    J, _ = explicit(losses, params, batch)
    spec = {"l1": False, "l2": True}
    G_last = jd.gramian(J["l2"])
    weighting = jd.upgrad_weighting()
    _, w, grad = jax.jit(jd.value_and_weighted_grad(losses, weighting, gramian_filter=spec))(
        params, batch
    )
    np.testing.assert_allclose(w, weighting(G_last), rtol=1e-9)
    expected = jd.combine(w, J)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="selects no parameter"):
        jd.value_and_weighted_grad(losses, weighting, gramian_filter=False)(params, batch)


def test_random_weighting_reads_the_key():
    losses, params, batch = MODELS["mlp"]()
    step = jd.value_and_weighted_grad(losses, jd.random_weighting())
    _, w1, _ = step(params, batch, key=jax.random.key(0))
    _, w2, _ = step(params, batch, key=jax.random.key(0))
    _, w3, _ = step(params, batch, key=jax.random.key(1))
    np.testing.assert_array_equal(w1, w2)
    assert not np.allclose(w1, w3)


def test_columns_engine_never_holds_the_jacobian():
    """Compiled temporary memory: with 64 objectives and ~262k parameters the Jacobian alone is
    67 MB; the column engine (chunks of 4) needs several times less than materialising it."""
    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (512, 512)) * 0.05}
    x = jax.random.normal(key, (64, 512))

    def losses(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]) ** 2, axis=1)

    def temp_bytes(method):
        chunk = 4 if method in ("jacobian", "columns") else None
        f = jax.jit(jd.value_and_gramian(losses, method=method, chunk_size=chunk))
        return f.lower(params, x).compile().memory_analysis().temp_size_in_bytes

    jac, cols = temp_bytes("jacobian"), temp_bytes("columns")
    ghost, layer = temp_bytes("per_sample"), temp_bytes("layerwise")
    jacobian_bytes = 64 * 512 * 512 * 4
    assert jac >= jacobian_bytes  # the Jacobian is there
    # The column engine saves (nearly) all of it. Measured the difference rather than a ratio:
    # XLA's GPU buffers add about 30 MB to both programs (on an H200: 104.9 and 38.6 MB; on
    # the CPU 72.2 and 8.8 MB).
    assert jac - cols > 0.9 * jacobian_bytes
    # The ghost engine keeps activations and cotangents (64 x 512 each), not 64 gradients; the
    # layerwise one keeps the 64 objectives' cotangents at the layer (64 x 64 x 512, a few
    # copies: here m = B, its worst case).
    assert ghost * 20 < jac
    assert layer * 2 < jac


def test_per_sample_structure_and_its_limits(x64):
    """Which parameters the ghost engine treats from captured factors (dense weights, biases,
    layer-norm scales; convolution kernels and embedding tables by their own op's per-sample VJP)
    and which fall back (used twice); a scalar loss is refused with a pointer to the other
    methods."""
    from jaxjd.engines import per_sample_gramian_parts

    expected = {
        "mlp": {"l1/b", "l1/w", "l2/b", "l2/w"},
        "cnn": {"conv", "head/b", "head/w"},
        "embedding_layernorm": {"embed", "ln/bias", "ln/scale", "out/b", "out/w"},
        "shared_weight": set(),
    }
    for model, names in expected.items():
        losses, params, batch = MODELS[model]()
        paths = [
            "/".join(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        ]
        plans = []  # traced only (the plan is decided at trace time): no compile, no run

        def parts(params, batch, losses=losses, plans=plans):
            _, G, factors = per_sample_gramian_parts(losses, params, batch)
            plans.append(factors.plan)
            return G

        jax.eval_shape(parts, params, batch)
        assert {paths[i] for i in plans[0].structural} == names, model
    losses, params, batch = MODELS["mlp"]()
    with pytest.raises(ValueError, match=r"shape \(B,\) or \(B, T\)"):
        jd.value_and_gramian(lambda p, b: jnp.sum(losses(p, b)), method="per_sample")(params, batch)


def test_layerwise_structure_ghost_and_rows(x64):
    """The layerwise engine: which dense uses take the ghost form ``sum(D_t * K D_u)`` (many
    output cotangent rows would be dearer: wide layer, few rows) and which form their rows; every
    parameter used by one equation is structural (the layer-norm scale and the transposed kernel
    too), a parameter used twice falls back; both equal jacrev and give J^T w."""
    from jaxjd.engines import task_gramian_vjp, task_weighted_grad

    k = jax.random.split(jax.random.key(5), 5)
    params = {
        "wide": _dense(k[0], 32, 32),  # 16 rows, 32 x 32: ghost
        "narrow": _dense(k[1], 32, 2),  # 16 rows, 32 x 2: rows
        "scale": jnp.ones(2) + 0.1,
        "t": jax.random.normal(k[2], (3, 2)),  # used as t.T
        "tied": jax.random.normal(k[3], (3, 3)) * 0.3,
    }
    x = jax.random.normal(k[4], (16, 32))

    def losses(p, x):
        h = jnp.tanh(_affine(x, p["wide"]))
        h = jnp.tanh(_affine(h, p["narrow"])) * p["scale"][None]
        h = h @ p["t"].T
        h = jnp.tanh(h @ p["tied"]) @ p["tied"]
        return jnp.stack([jnp.mean(h**2), jnp.mean(h[:, 0]), jnp.mean(jnp.sin(h))])

    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    x = x.astype(jnp.float64)
    J, G_ref = explicit(losses, params, x)
    w = jnp.array([0.3, -1.2, 2.0])
    forms = {}

    @jax.jit
    def layerwise(params, x):
        out, pullback = task_gramian_vjp(losses, params, x)
        G, factors = pullback(jnp.eye(3))
        forms.update(ghost=set(factors.ghost), rows=set(factors.rows))
        return out, G, task_weighted_grad(w, factors)

    out, G, weighted = layerwise(params, x)
    ghost, rows = forms["ghost"], forms["rows"]
    paths = [
        "/".join(str(k.key) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    assert {paths[i] for i in ghost} == {"wide/w"}
    assert {paths[i] for i in rows} == set(paths) - {"wide/w"}
    np.testing.assert_allclose(out, losses(params, x), rtol=1e-12)
    np.testing.assert_allclose(G, G_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(
        jax.tree_util.tree_leaves(weighted),
        jax.tree_util.tree_leaves(jd.combine(w, J)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="leading axis m"):
        jax.eval_shape(lambda: task_gramian_vjp(losses, params, x)[1](jnp.zeros((0, 3))))
    with pytest.raises(ValueError, match="has_aux"):
        jd.value_and_gramian(losses, method="layerwise", chunk_size=2)


def test_engine_errors():
    with pytest.raises(ValueError, match="method"):
        jd.value_and_gramian(lambda p: p, method="ghost")
    with pytest.raises(ValueError, match="chunk_size"):
        jd.value_and_gramian(lambda p: p, chunk_size=0)
    with pytest.raises(ValueError, match="no losses"):
        jd.value_and_gramian(lambda p: p[:0], method="columns")(jnp.ones(3))


def _mtl_model():
    k = jax.random.split(jax.random.key(7), 4)
    trunk_params = {"l1": _dense(k[0], 5, 12), "l2": _dense(k[1], 12, 6)}
    head_params = {"a": _dense(k[2], 6, 1), "b": _dense(k[3], 6, 4)}
    x = jax.random.normal(jax.random.key(8), (9, 5))

    def trunk(p, x):
        h = jnp.tanh(_affine(x, p["l1"]))
        return {"feat": jnp.tanh(_affine(h, p["l2"])), "skip": h}

    def heads(hp, f, x):
        reg = jnp.mean(_affine(f["feat"], hp["a"])[:, 0] - x[:, 0]) ** 2
        cls = jnp.mean(jax.nn.logsumexp(_affine(f["feat"], hp["b"]), axis=1))
        return jnp.stack([reg, cls, jnp.mean(f["skip"] ** 2)])  # 3 tasks

    return trunk, heads, trunk_params, head_params, x


@pytest.mark.slow  # 20 s; the layerwise test below checks the same helper by default
def test_mtl_helper_equals_brute_force(x64):
    trunk, heads, tp, hp, x = _mtl_model()
    tp, hp = (jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), t) for t in (tp, hp))
    losses, J, head_grads = jax.jit(jd.mtl_value_and_jacobian(trunk, heads))(tp, hp, x)

    def full(tp, hp):
        return heads(hp, trunk(tp, x), x)

    np.testing.assert_allclose(losses, full(tp, hp), rtol=1e-12)
    J_ref = jax.jit(jax.jacrev(full))(tp, hp)
    for a, b in zip(jax.tree_util.tree_leaves(J), jax.tree_util.tree_leaves(J_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    g_ref = jax.jit(jax.grad(lambda h: jnp.sum(full(tp, h))))(hp)
    for a, b in zip(jax.tree_util.tree_leaves(head_grads), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    agg = jd.upgrad()
    _, (trunk_grad, heads_again), w = jax.jit(jd.mtl_value_and_grad(trunk, heads, agg))(tp, hp, x)
    for a, b in zip(jax.tree_util.tree_leaves(heads_again), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w, agg.weights(J_ref), rtol=1e-9)
    for a, b in zip(jax.tree_util.tree_leaves(trunk_grad), jax.tree_util.tree_leaves(agg(J_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    _, (cfg_grad, _), cfg_w = jax.jit(jd.mtl_value_and_grad(trunk, heads, jd.config()))(tp, hp, x)
    np.testing.assert_allclose(cfg_w, jd.config().weights(J_ref), rtol=1e-9)
    for a, b in zip(
        jax.tree_util.tree_leaves(cfg_grad), jax.tree_util.tree_leaves(jd.config(J_ref))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # Stateful aggregators take state= and return the new state, on both paths.
    agg = jd.gradvac()
    key = jax.random.key(5)
    state = agg.init(J_ref)
    with pytest.raises(TypeError, match="stateful"):
        jd.mtl_value_and_grad(trunk, heads, agg)(tp, hp, x, key=key)
    ref_update, ref_state = agg.update(J_ref, state, key=key)
    for method in ("layerwise", "jacobian"):
        step = jax.jit(jd.mtl_value_and_grad(trunk, heads, agg, method=method))
        _, (trunk_grad, _), w, new_state = step(tp, hp, x, key=key, state=state)
        np.testing.assert_allclose(new_state.targets, ref_state.targets, rtol=1e-9, atol=1e-12)
        for a, b in zip(
            jax.tree_util.tree_leaves(trunk_grad), jax.tree_util.tree_leaves(ref_update)
        ):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_mtl_layerwise_equals_the_materialised_jacobian(dtype, x64):
    """The default layerwise MTL engine (Gramian and J^T w from the task cotangents at each
    layer) against the brute-force trunk Jacobian: the Gramian, and the aggregated gradient for a
    Gramian weighting, a shape-only weighting (no Gramian formed) and a random one (same key).
    (The "jacobian" method is checked against the same reference in the test above.)"""
    trunk, heads, tp, hp, x = _mtl_model()
    tp, hp, x = (jax.tree_util.tree_map(lambda a: a.astype(dtype), t) for t in (tp, hp, x))
    rtol = 1e-10 if dtype == "float64" else 1e-5

    def full(tp):
        return heads(hp, trunk(tp, x), x)

    J_ref = jax.jit(jax.jacrev(full))(tp)
    G_ref = jd.gramian(J_ref)
    losses, G, head_grads = jax.jit(jd.mtl_value_and_gramian(trunk, heads))(tp, hp, x)
    assert G.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(losses, full(tp), rtol=rtol)
    np.testing.assert_allclose(G, G_ref, rtol=rtol, atol=rtol * float(jnp.abs(G_ref).max()))
    h_ref = jax.jit(jax.grad(lambda h: jnp.sum(heads(h, trunk(tp, x), x))))(hp)
    for a, b in zip(jax.tree_util.tree_leaves(head_grads), jax.tree_util.tree_leaves(h_ref)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))
    key = jax.random.key(3)
    for agg in (jd.upgrad(), jd.mean(), jd.random(), jd.mgda()):
        layer = jax.jit(jd.mtl_value_and_grad(trunk, heads, agg, method="layerwise"))
        _, (g_layer, h_layer), w_layer = layer(tp, hp, x, key=key)
        # weights of the simplex (MGDA's): a weight that is 0 to rounding (3e-19 from one
        # Gramian, 3e-57 from the other, float64) is compared on the weights' scale
        w_ref = agg.weights(J_ref, key=key)
        np.testing.assert_allclose(
            w_layer, w_ref, rtol=100 * rtol, atol=100 * rtol * float(jnp.abs(w_ref).max())
        )
        for a, b in zip(
            jax.tree_util.tree_leaves((g_layer, h_layer)),
            jax.tree_util.tree_leaves((agg(J_ref, key=key), h_ref)),
        ):
            np.testing.assert_allclose(
                a, b, rtol=100 * rtol, atol=100 * rtol * float(jnp.abs(b).max())
            )
    with pytest.raises(ValueError, match="Unknown method"):
        jd.mtl_value_and_grad(trunk, heads, jd.upgrad(), method="ghost")
    with pytest.raises(ValueError, match="Gramian-weighted"):
        jd.mtl_value_and_grad(trunk, heads, jd.config(), method="layerwise")


def test_equinox_module_with_the_filter_pattern(x64):
    """value_and_jacobian on an equinox model: partition the arrays, combine inside."""
    import equinox as eqx

    model = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0))
    model = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, model)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def losses(p, x):
        out = jax.vmap(eqx.combine(p, static))(x)
        return jnp.mean(out**2, axis=0)  # 2 objectives

    values, J = jd.value_and_jacobian(losses)(params, x)
    np.testing.assert_allclose(values, losses(params, x), rtol=1e-12)
    J_ref = jax.jit(jax.jacrev(losses))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(J), jax.tree_util.tree_leaves(J_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    update = jd.upgrad(J)
    assert jax.tree_util.tree_structure(update) == jax.tree_util.tree_structure(params)
    # The jaxpr-reading engines on the same vmapped equinox model (its kernels sit on the left
    # of the product, so they take the per-equation VJP path): objectives and per-sample losses.
    np.testing.assert_allclose(
        jax.jit(jd.value_and_gramian(losses, method="layerwise"))(params, x)[1],
        jd.gramian(J_ref),
        rtol=1e-10,
    )

    def per_sample(p, x):
        return jnp.sum(jax.vmap(eqx.combine(p, static))(x) ** 2, axis=1)

    J_ps = jax.jit(jax.jacrev(per_sample))(params, x)
    G_ref = jd.gramian(J_ps)
    for method in ("per_sample", "layerwise"):
        _, G = jax.jit(jd.value_and_gramian(per_sample, method=method))(params, x)
        np.testing.assert_allclose(G, G_ref, rtol=1e-10, atol=1e-14)


def test_per_sample_engine_keeps_equinox_linear_layers_on_the_fast_path(x64):
    """eqx.nn.Linear under vmap computes W @ x (out-features first: dot_general with the weight
    on the left, then a transpose) and adds its bias after a broadcast: every weight and bias
    of an MLP is read structurally (no per-sample-gradient fallback, reported as ``fallback``),
    and the Gramian and the weighted update equal jacrev's (#13 item 20)."""
    import equinox as eqx

    from jaxjd.engines import per_sample_gramian_parts, weighted_grad_from_factors

    def parts(f, p, x):  # jitted (the plan and the fallback names are static fields)
        return eqx.filter_jit(lambda p, x: per_sample_gramian_parts(f, p, x))(p, x)

    model = eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(0))
    model = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_array(a) else a, model)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def per_sample(p, x):
        return jnp.sum(jax.vmap(eqx.combine(p, static))(x) ** 2, axis=1)

    _, G, factors = parts(per_sample, params, x)
    assert factors.fallback == ()
    assert len(factors.plan.dense_t) == 3 and len(factors.plan.bias) == 3
    J = jax.jit(jax.jacrev(per_sample))(params, x)
    np.testing.assert_allclose(G, jd.gramian(J), rtol=1e-10, atol=1e-14)
    w = jnp.linspace(0.5, 1.5, 6)
    update = weighted_grad_from_factors(w, factors)
    for a, b in zip(jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(jd.combine(w, J))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # sequences (vmap over samples and positions) and T = 2 losses per sample: the weights stay
    # structural (rows (B, L, d_in)), and the biases (broadcast twice, over both batch axes)
    xs = jax.random.normal(jax.random.key(2), (6, 4, 3), jnp.float64)

    def per_sequence(p, x):
        return jnp.sum(jax.vmap(jax.vmap(eqx.combine(p, static)))(x) ** 2, axis=1)  # (B, 2)

    _, G, factors = parts(per_sequence, params, xs)
    assert len(factors.plan.dense_t) == 3 and len(factors.plan.bias) == 3
    assert factors.fallback == ()
    J = jax.tree_util.tree_map(
        lambda a: a.reshape(12, *a.shape[2:]), jax.jit(jax.jacrev(per_sequence))(params, xs)
    )
    np.testing.assert_allclose(G, jd.gramian(J), rtol=1e-10, atol=1e-13)
    w = jnp.linspace(0.5, 1.5, 12)
    update = weighted_grad_from_factors(w, factors)
    for a, b in zip(jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(jd.combine(w, J))):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    # a layer-norm scale (a product with the normalised input) and bias: structural too
    norm = eqx.nn.LayerNorm(3, dtype=jnp.float64)

    def normed(p, x):
        return jnp.sum(jax.vmap(lambda r: eqx.combine(p["mlp"], static)(p["norm"](r)))(x) ** 2, 1)

    _, G2, factors2 = parts(normed, {"mlp": params, "norm": norm}, x)
    assert factors2.fallback == () and len(factors2.plan.scale) == 1
    np.testing.assert_allclose(
        G2, jd.gramian(jax.jit(jax.jacrev(normed))({"mlp": params, "norm": norm}, x)), rtol=1e-9
    )


def _ghost_equals_jacrev(losses, params, batch, rtol=1e-10):
    """The per-sample engine's factors (jitted; returned for the caller's checks) after checking
    its Gramian and weighted update against jacrev's."""
    import equinox as eqx

    from jaxjd.engines import per_sample_gramian_parts, weighted_grad_from_factors

    _, G, factors = eqx.filter_jit(lambda p, b: per_sample_gramian_parts(losses, p, b))(
        params, batch
    )
    J, G_ref = explicit(losses, params, batch)
    scale = float(jnp.max(jnp.abs(G)))
    np.testing.assert_allclose(G, G_ref, rtol=rtol, atol=rtol * scale)
    w = jnp.linspace(0.5, 1.5, G.shape[0])
    update = jax.tree_util.tree_leaves(weighted_grad_from_factors(w, factors))
    expected = jax.tree_util.tree_leaves(jd.combine(w, J))
    scale = max(float(jnp.max(jnp.abs(b))) for b in expected)  # attention's key bias: ~0
    for a, b in zip(update, expected):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)
    return factors


def test_per_sample_engine_reads_equinox_and_flax_convolutions_and_embeddings(x64):
    """equinox's Conv2d (kernel through conv_general_dilated, bias of shape (C, 1, 1) broadcast
    again by the add), Embedding (a gather under two vmaps), LayerNorm, Linear; Flax NNX's Conv,
    Embed and Linear (biases reshaped to (1, ..., C)), with float32 parameters in a
    float64 computation (each cast once); Flax's attention (kernels of rank 3): no parameter
    falls back, the Gramian and J^T w equal jacrev's (#13 item 20). The equinox bias of shape
    (C, 1, 1) gave a finite wrong Gramian (its cotangent was not summed over the spatial axes)
    before."""
    import equinox as eqx

    nnx = pytest.importorskip("flax.nnx")
    k = jax.random.split(jax.random.key(3), 6)
    f64 = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, t
    )
    model = f64(
        {
            "conv": eqx.nn.Conv2d(1, 4, 3, key=k[0]),
            "embed": eqx.nn.Embedding(11, 4, key=k[1]),
            "norm": eqx.nn.LayerNorm(4),
            "head": eqx.nn.Linear(4, 2, key=k[2]),
        }
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    images = jax.random.normal(k[3], (5, 1, 8, 8), jnp.float64)
    tokens = jax.random.randint(k[4], (5, 7), 0, 11)

    def eqx_losses(p, batch):  # (B, 2): T = 2 losses per sample
        m = eqx.combine(p, static)

        def one(image, toks):
            h = jnp.mean(jnp.tanh(m["conv"](image)), axis=(1, 2))
            h = h + jnp.mean(jax.vmap(m["embed"])(toks), axis=0)
            return m["head"](m["norm"](h)) ** 2

        return jax.vmap(one)(*batch)

    factors = _ghost_equals_jacrev(eqx_losses, params, (images, tokens))
    assert factors.fallback == () and len(factors.plan.local) == 2

    class Net(nnx.Module):
        def __init__(self, rngs):
            f64 = {"rngs": rngs, "dtype": jnp.float64}  # computed in float64, explicitly
            self.conv = nnx.Conv(1, 4, (3, 3), padding="VALID", **f64)
            self.embed = nnx.Embed(11, 4, **f64)
            self.head = nnx.Linear(4, 2, **f64)

        def __call__(self, x, toks):
            h = jnp.mean(jnp.tanh(self.conv(x)), axis=(1, 2)) + jnp.mean(self.embed(toks), 1)
            return jnp.sum(self.head(h) ** 2, axis=1)

    graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    assert state["conv"]["kernel"].value.dtype == state["head"]["kernel"].value.dtype == jnp.float32

    def nnx_losses(p, batch):
        return nnx.merge(graphdef, p)(*batch)

    images = jnp.moveaxis(images, 1, -1)  # NHWC, float64: the float32 parameters are cast
    factors = _ghost_equals_jacrev(nnx_losses, state, (images, tokens), rtol=1e-5)
    assert factors.fallback == () and len(factors.plan.local) == 2
    # Flax's attention: kernels (in, heads, head_dim) and (heads, head_dim, out) contracted on
    # their leading axes are dense uses, per sample and (per task) layerwise
    attention = nnx.MultiHeadAttention(
        2, 8, decode=False, rngs=nnx.Rngs(1), dtype=jnp.float64, param_dtype=jnp.float64
    )
    graphdef, state = nnx.split(attention, nnx.Param)
    xs = jax.random.normal(k[5], (5, 6, 8), jnp.float64)

    def attend(p, x):  # (Flax's softmax mixes float32 in: standard promotion, also in CI's
        with jax.numpy_dtype_promotion("standard"):  # strict run)
            return jnp.tanh(nnx.merge(graphdef, p)(x)) ** 2

    def per_sample(p, x):
        return jnp.sum(attend(p, x), axis=(1, 2))

    factors = _ghost_equals_jacrev(per_sample, state, xs)
    assert factors.fallback == () and len(factors.plan.dense) == 4

    def per_task(p, x):  # 8 objectives
        return jnp.mean(attend(p, x), axis=(0, 1))

    _, G = jax.jit(jd.value_and_gramian(per_task, method="layerwise"))(state, xs)
    _, J = jax.jit(jd.value_and_jacobian(per_task))(state, xs)
    np.testing.assert_allclose(G, jd.gramian(J), rtol=1e-10, atol=1e-10 * float(jnp.max(G)))


def test_per_sample_parameter_returned_through_a_jitted_identity_falls_back(x64):
    """A parameter that leaves a jitted function as is (an output of its jaxpr, used outside
    untracked) is read by no structural rule: it falls back and the Gramian is jacrev's."""
    k = jax.random.split(jax.random.key(4), 2)
    params = {"w": jax.random.normal(k[0], (3, 3)), "b": jax.random.normal(k[1], (3,))}
    x = jax.random.normal(k[1], (4, 3))
    ident = jax.jit(lambda a, c: (a, c + 1.0))

    def losses(p, x):
        w, b = ident(p["w"], p["b"])
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"][None]) * (w[0] + b)[None], axis=1)

    factors = _ghost_equals_jacrev(losses, params, x)
    assert set(factors.fallback) == {"['w']", "['b']"}


def test_per_sample_engine_does_not_read_a_constant_of_batch_length_as_samples(x64):
    """B = L: learned positions gathered at 0..L-1 and a dense layer on a constant (L, 3), both
    broadcast over the batch. Their leading size is B by coincidence, but no row belongs to one
    sample (every sample's loss reads every row): read per sample, the Gramian was finite and
    wrong (entries off by 220 of 295). They fall back; the Gramian and J^T w are jacrev's."""
    B = L = 5
    k = jax.random.split(jax.random.key(7), 4)
    params = {
        "tok": jax.random.normal(k[0], (11, 4)),
        "pos": jax.random.normal(k[1], (L, 4)),
        "P": jax.random.normal(k[2], (3, 4)),
        "w": jax.random.normal(k[3], (4, 1)),
    }
    tokens = jax.random.randint(k[0], (B, L), 0, 11)
    C = jax.random.normal(k[1], (L, 3))

    def losses(p, toks):
        h = p["tok"][toks]  # (B, L, 4): per sample
        h = h + p["pos"][jnp.arange(L)][None]
        h = h + (C @ p["P"])[None]
        return jnp.sum(jnp.tanh(h) @ p["w"], axis=(1, 2))

    factors = _ghost_equals_jacrev(losses, params, tokens)
    assert set(factors.fallback) == {"['pos']", "['P']"}


def test_engines_read_a_function_with_a_debug_callback(x64):
    """A ``jax.debug.callback`` (an equation without outputs) on the input and on a weight: the
    jaxpr reader passes it (the weight it reads falls back), every engine gives jacrev's
    Gramian, and the callback still runs."""
    from jaxjd.engines import per_sample_gramian_parts

    k = jax.random.split(jax.random.key(6), 2)
    params = {"w": jax.random.normal(k[0], (3, 2)), "b": jnp.ones(2)}
    x = jax.random.normal(k[1], (4, 3))
    seen = []

    def losses(p, x):
        jax.debug.callback(lambda *_: seen.append(1), x, p["w"])
        return jnp.sum(jnp.tanh(x @ p["w"] + p["b"][None]), axis=1)

    _, G_ref = explicit(losses, params, x)
    for method in ("per_sample", "layerwise"):
        _, G = jd.value_and_gramian(losses, method=method)(params, x)
        np.testing.assert_allclose(G, G_ref, rtol=1e-12, atol=1e-14)
    assert per_sample_gramian_parts(losses, params, x)[2].fallback == ("['w']",)
    assert seen


def test_per_sample_with_a_jitted_layer_called_twice(x64):
    """A jitted layer reused with two weights shares its inner equations: the ghost engine must
    not mix the two calls (both weights fall back) and still equal jacrev."""
    layer = jax.jit(lambda w, x: jnp.tanh(x @ w))
    k = jax.random.split(jax.random.key(9), 3)
    params = {"a": jax.random.normal(k[0], (4, 4)), "b": jax.random.normal(k[1], (4, 4))}
    x = jax.random.normal(k[2], (5, 4))

    def losses(p, x):
        return jnp.sum(layer(p["b"], layer(p["a"], x)) ** 2, axis=1)

    _, G_ref = explicit(losses, params, x)
    _, G = jd.value_and_gramian(losses, method="per_sample")(params, x)
    np.testing.assert_allclose(G, G_ref, rtol=1e-10, atol=1e-12)


def test_flax_nnx_state_through_the_engines(x64):
    """A Flax NNX module's ``State`` (from ``nnx.split``) through value_and_jacobian, the
    per-sample engine and jd_aggregate: the Jacobian and Gramian equal jacrev's, the update keeps
    the ``State`` structure (#13 item 19)."""
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 8, rngs=rngs, param_dtype=jnp.float64)
            self.out = nnx.Linear(8, 2, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64)

    def task_losses(p, x):  # 2 objectives
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2, axis=0)

    def per_sample(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x) ** 2, axis=1)

    _, J = jd.value_and_jacobian(task_losses)(params, x)
    J_ref = jax.jacrev(task_losses)(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(J), jax.tree_util.tree_leaves(J_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    _, G = jax.jit(jd.value_and_gramian(per_sample, method="per_sample"))(params, x)
    np.testing.assert_allclose(G, jd.gramian(jax.jacrev(per_sample)(params, x)), rtol=1e-10)
    tx = optax.chain(jd.jd_aggregate(jd.upgrad()), optax.sgd(0.1))
    updates, _ = tx.update(J, tx.init(params), params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(
        jax.tree_util.tree_leaves(updates)[0], -0.1 * jax.tree_util.tree_leaves(jd.upgrad(J))[0]
    )

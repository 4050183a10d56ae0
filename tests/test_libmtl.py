"""Options taken from LibMTL, against LibMTL's own code (goldens: tests/data/make_libmtl_goldens.py,
LibMTL at commit 4336804): MGDA's gradient normalisers and CAGrad's rescaling."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxjd as jd

DATA = Path(__file__).parent / "data"
INDEX = json.loads((DATA / "libmtl.json").read_text())
ARRAYS = dict(np.load(DATA / "libmtl.npz"))


def _m(case):
    return ARRAYS["J/" + case["input"]].shape[0]


def _inputs(case):
    return ARRAYS["J/" + case["input"]], ARRAYS["losses/" + case["input"]]


@pytest.mark.parametrize(
    "case",
    # m = 2 (exact agreement) and m = 3 by default; m = 4, 5 in the slow sweep
    [
        pytest.param(c, id=c["key"], marks=() if _m(c) <= 3 else pytest.mark.slow)
        for c in INDEX["cases"]
        if c["method"] == "MGDA"
    ],
)
def test_mgda_normalizers_match_libmtl(case, x64):
    """The normalisers are LibMTL's: its update is ``sum_i a_i g_i / n_i`` with its weights
    ``a`` and our ``n`` (to 1e-12). Its min-norm solver stops at sum|change| < 1e-5 (1e-3 off
    at m = 3) and is exact at m = 2: there our update equals its update to 1e-10; above, ours
    is the minimum-norm point of the normalised rows (no longer than LibMTL's, KKT to 1e-10)."""
    J, losses = _inputs(case)
    row_norms = np.linalg.norm(J, axis=1)
    n = {"none": 1.0, "l2": row_norms, "loss": losses, "loss+": losses * row_norms}
    n = np.broadcast_to(n[case["normalizer"]], losses.shape)
    a_libmtl, expected = ARRAYS["weights/" + case["key"]], ARRAYS["update/" + case["key"]]
    np.testing.assert_allclose(J.T @ (a_libmtl / n), expected, rtol=1e-12, atol=1e-14)

    agg = jd.mgda(normalizer=case["normalizer"], method="exact")
    update = np.asarray(agg(jnp.asarray(J), losses=jnp.asarray(losses)))
    w = np.asarray(agg.weights(jnp.asarray(J), losses=jnp.asarray(losses)))
    a = w * n  # the weights of the normalised rows
    np.testing.assert_allclose(a.sum(), 1.0, rtol=1e-12)
    assert a.min() >= -1e-15
    if J.shape[0] == 2:
        np.testing.assert_allclose(update, expected, rtol=1e-10, atol=1e-12)
    else:
        d = (J / n[:, None]).T @ a  # minimum norm: every normalised row has g_i . d >= |d|^2
        assert np.linalg.norm(update) <= np.linalg.norm(expected) * (1 + 1e-12)
        assert ((J / n[:, None]) @ d).min() >= d @ d * (1 - 1e-10)


@pytest.mark.parametrize(
    "case",
    # c = 0.9 and the scaled matrices with rescale 1 and 2 in the slow sweep (each c and m
    # compiles anew)
    [
        pytest.param(
            c,
            id=c["key"],
            marks=()
            if c["c"] < 0.5 and not ("scaled" in c["key"] and c["rescale"])
            else pytest.mark.slow,
        )
        for c in INDEX["cases"]
        if c["method"] == "CAGrad"
    ],
)
def test_cagrad_rescale_matches_libmtl(case, x64):
    """LibMTL's CAGrad with rescale 0, 1, 2: its update divided by 1, 1 + c^2, 1 + c (exactly,
    as ours); ours equals its update to the accuracy of its solver (scipy's SLSQP with
    ftol 1e-6: ~1e-3 of the update's scale)."""
    J, _ = _inputs(case)
    c, rescale = case["c"], case["rescale"]
    divisor = (1.0, 1.0 + c * c, 1.0 + c)[rescale]
    expected = ARRAYS["update/" + case["key"]]
    unscaled = ARRAYS["update/" + case["key"].replace(f"rescale={rescale}", "rescale=0")]
    np.testing.assert_allclose(expected * divisor, unscaled, rtol=1e-12, atol=1e-14)
    update = jd.cagrad(c=c, rescale=rescale)(jnp.asarray(J))
    plain = jd.cagrad(c=c)(jnp.asarray(J))
    np.testing.assert_allclose(update * divisor, plain, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(update, expected, atol=2e-3 * np.abs(expected).max())


def test_losses_are_read_only_where_needed(x64):
    """A method that reads the losses refuses a call without them (at trace time) and checks
    their shape; every other method ignores them; the engines and jd_aggregate pass them."""
    J = jnp.asarray(ARRAYS["J/scaled_3x6"])
    losses = jnp.asarray(ARRAYS["losses/scaled_3x6"])
    reader = jd.mgda(normalizer="loss")
    assert reader.needs_losses and not jd.mgda().needs_losses
    assert jd.crmogm(jd.mgda_weighting(normalizer="loss+")).needs_losses
    with pytest.raises(ValueError, match="reads the loss values: pass losses="):
        reader(J)
    with pytest.raises(ValueError, match="floating vector of the m = 3 losses"):
        reader(J, losses=losses[:2])
    with pytest.raises(ValueError, match="reads the loss values"):
        jax.jit(lambda J: jd.mgda_weighting(normalizer="loss")(J @ J.T))(J)
    np.testing.assert_array_equal(jd.upgrad()(J, losses=losses), jd.upgrad()(J))
    # jit, and the optax wrapper's losses= extra argument
    jitted = jax.jit(lambda J, L: reader(J, losses=L))(J, losses)
    np.testing.assert_allclose(jitted, reader(J, losses=losses), rtol=1e-12)
    tx = optax.chain(jd.jd_aggregate(reader), optax.sgd(1.0))
    params = jnp.zeros(6)
    update, _ = tx.update(J, tx.init(params), params, losses=losses)
    np.testing.assert_allclose(update, -reader(J, losses=losses), rtol=1e-12)
    # a non-finite loss gives NaN weights (the value policy), a non-positive one too
    assert bool(jnp.isnan(reader.weights(J, losses=losses.at[0].set(jnp.inf))).all())
    assert bool(jnp.isnan(reader.weights(J, losses=losses.at[1].set(0.0))).any())


def test_engines_pass_the_losses_to_the_weighting(x64):
    """value_and_weighted_grad feeds the losses it computes to a weighting that reads them:
    the gradient equals J^T w with w from the loss-normalised MGDA."""
    X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6)))

    def losses_fn(p):
        return jnp.exp(X @ p) + 0.5

    p = jnp.asarray(np.linspace(-0.2, 0.3, 6))
    weighting = jd.mgda_weighting(normalizer="loss+", method="exact")
    values, w, grad = jd.value_and_weighted_grad(losses_fn, weighting)(p)
    J = jax.jacrev(losses_fn)(p)
    np.testing.assert_allclose(w, weighting(J @ J.T, losses=values), rtol=1e-12)
    np.testing.assert_allclose(grad, J.T @ w, rtol=1e-12)


@pytest.mark.parametrize("normalizer", ["l2", "loss+"])
def test_norm_normalizers_are_not_scale_invariant_but_overflow_safe(normalizer, x64):
    """w_i = a_i / |g_i| scales as 1/c when J does: the aggregator must not rescale J before
    forming G for them (the update J^T w is what is invariant), and zero rows keep norm 1."""
    J = jnp.asarray(ARRAYS["J/conflicting_4x8"])
    L = jnp.asarray(ARRAYS["losses/conflicting_4x8"])
    agg = jd.mgda(normalizer=normalizer, method="exact")
    np.testing.assert_allclose(agg(1e3 * J, losses=L), agg(J, losses=L), rtol=1e-9)
    zero = agg(J.at[2].set(0.0), losses=L)
    np.testing.assert_allclose(zero, 0.0, atol=1e-12)


def test_rescale_is_checked():
    with pytest.raises(ValueError, match="expected 0, 1 or 2"):
        jd.cagrad(c=0.5, rescale=3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_loss_normalisers_under_vmap_equal_the_loop(dtype):
    """vmap over (J, losses) equals each lane alone; the dtype is kept."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(dtype == "float64"):
        Js = jnp.asarray(rng.standard_normal((5, 4, 6)), dtype)
        Ls = jnp.asarray(rng.uniform(0.2, 2.0, (5, 4)), dtype)
        for normalizer in ("loss", "loss+"):
            agg = jd.mgda(normalizer=normalizer)
            batched = jax.vmap(lambda J, L, agg=agg: agg(J, losses=L))(Js, Ls)
            assert batched.dtype == dtype
            tol = 1e-5 if dtype == "float32" else 1e-12
            for i in range(5):
                np.testing.assert_allclose(batched[i], agg(Js[i], losses=Ls[i]), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", INDEX["sequences"], ids=lambda c: c["key"])
def test_stateful_libmtl_methods_match_libmtl(case, x64):
    """Five steps of MoCo / DB-MTL / GradNorm on one state, under jit, against LibMTL's
    instance (GradNorm's scales stepped by torch's Adam, as LibMTL's trainer does): every
    update and weight vector to 1e-12; a pytree Jacobian gives the same updates."""
    params = dict(case["params"])
    if case["method"] == "GradNorm":
        params["initial_losses"] = ARRAYS["initial_losses/" + case["input"]]
    make = {"MoCo": jd.moco, "DB_MTL": jd.db_mtl, "GradNorm": jd.gradnorm}[case["method"]]
    agg = make(**params)
    Js = jnp.asarray(ARRAYS["J/" + case["input"]])
    losses = jnp.asarray(ARRAYS["losses/" + case["input"]])
    step = jax.jit(lambda J, s, L: agg.aggregate(J, s, losses=L))
    state = agg.init(Js[0])
    tree_state = agg.init({"a": Js[0][:, :2], "b": Js[0][:, 2:]})
    for t in range(Js.shape[0]):
        update, weights, state = step(Js[t], state, losses[t])
        np.testing.assert_allclose(update, ARRAYS["updates/" + case["key"]][t], rtol=1e-12)
        if case["method"] == "MoCo":
            weights = state.weights  # lambda (the update combines the tracked rows)
        if case["method"] != "DB_MTL":  # DB-MTL's LibMTL weights are ones
            np.testing.assert_allclose(weights, ARRAYS["weights/" + case["key"]][t], 1e-12)
        tree_update, tree_state = agg.update(
            {"a": Js[t][:, :2], "b": Js[t][:, 2:]}, tree_state, losses=losses[t]
        )
        joined = jnp.concatenate([tree_update["a"], tree_update["b"]])
        np.testing.assert_allclose(joined, update, rtol=1e-12)
    if case["method"] != "GradNorm":
        assert int(state.count) == Js.shape[0]


def test_gradnorm_first_call_sets_the_initial_losses(x64):
    """Without initial_losses, L(0) is the first call's losses: r = 1 there, so the first
    step only equalises the gradient norms (alpha plays no part)."""
    G = jnp.array([[4.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.25]])
    L = jnp.array([1.0, 2.0, 0.5])
    states = []
    for alpha in (0.0, 3.0):
        weighting = jd.gradnorm_weighting(alpha=alpha, lr=0.1)
        w, state = weighting.update(G, weighting.init(3), losses=L)
        np.testing.assert_allclose(w, 1.0)
        np.testing.assert_array_equal(state.initial_losses, L)
        states.append(state)
    np.testing.assert_allclose(states[0].logits, states[1].logits, rtol=1e-15)
    # the largest gradient norm loses weight, the smallest gains
    assert float(states[0].logits[0]) < 0.0 < float(states[0].logits[2])


@pytest.mark.parametrize("make", [jd.moco, jd.db_mtl, jd.gradnorm])
def test_tracking_aggregators_policy(make):
    """No weights for MoCo and DB-MTL (the update combines the tracked rows, not this J); a
    non-finite J or loss
    gives a non-finite update and keeps the state; float32 stays float32; vmap over runs."""
    agg = make()
    rng = np.random.default_rng(0)
    J = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    L = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
    out = agg.aggregate(J, agg.init(J), losses=L)
    assert (out.weights is None) == (make is not jd.gradnorm)
    assert out.update.dtype == jnp.float32
    _, state = agg.update(J, agg.init(J), losses=L)
    for bad_J, bad_L in ((J.at[0, 1].set(jnp.nan), L), (J, L.at[2].set(jnp.inf))):
        update, kept = agg.update(bad_J, state, losses=bad_L)
        assert not bool(jnp.isfinite(update).all())
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, kept, state))
    Js = jnp.asarray(rng.standard_normal((4, 3, 5)), jnp.float32)
    Ls = jnp.asarray(rng.uniform(0.2, 2.0, (4, 3)), jnp.float32)
    states = jax.vmap(agg.init)(Js)
    batched, _ = jax.vmap(lambda J, s, L: agg.update(J, s, losses=L))(Js, states, Ls)
    for i in range(4):
        alone, _ = agg.update(Js[i], agg.init(Js[i]), losses=Ls[i])
        np.testing.assert_allclose(batched[i], alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reads the loss values"):
        agg.update(J, state)

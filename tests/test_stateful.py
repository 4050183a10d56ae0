"""The stateful methods (GradVac, PCD, ExcessMTL, Nash-MTL): parity with TorchJD 0.18.0 on single
calls and 5-step sequences, their defined behaviour where TorchJD fails, state under jit/scan/vmap,
and their use through jd_aggregate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import fast_or_slow, reference, reference_cases, rel_err

import jaxjd as jd


def _arrays(case):
    index, arrays = reference()
    mat = index["matrices"][case["matrix"]]
    return arrays[mat["J_key"]], arrays[mat["G_key"]], arrays


def _params(case):
    params = dict(case["params"])
    params.pop("n_tasks", None)
    if params.get("tau") == []:  # m = 1: no secondary objective
        params["tau"] = 0.02
    return params


WEIGHTINGS = {
    "GradVac": jd.gradvac_weighting,
    "PCD": jd.pcd_weighting,
    "NashMTL": jd.nash_mtl_weighting,
}
AGGREGATORS = {
    "GradVac": jd.gradvac,
    "PCD": jd.pcd,
    "NashMTL": jd.nash_mtl,
    "ExcessMTL": jd.excess_mtl,
}


def _first_call_weights(case, G):
    weighting = WEIGHTINGS[case["class"]](**_params(case))
    state = weighting.init(G.shape[0], G.dtype)
    return weighting.update(G, state, key=jax.random.key(0))[0]


# ----------------------------------------------------------------------------- exact methods ---

EXACT = reference_cases(("GradVac", "PCD"))


def test_exact_cases_are_all_there():
    counts = {c: sum(case["class"] == c for case in EXACT) for c in ("GradVac", "PCD")}
    # GradVac is deterministic only for m <= 2 (its random order cannot matter there).
    assert counts == {"GradVac": 12, "PCD": 72}


def _small_default(case):
    """Default suite: the default configuration on m <= 6, every configuration on the paper's
    2 x 3 matrix; the rest (each m compiles anew) in the slow sweep."""
    m = case["shape"][0]
    return case["matrix"] == "conflict_paper_2x3" or (case["config"] == case["class"] and m <= 6)


@pytest.mark.parametrize("case", fast_or_slow(EXACT, _small_default))
def test_gramian_weightings_match_torchjd(case, x64):
    J, G, arrays = _arrays(case)
    w = _first_call_weights(case, jnp.asarray(G))
    ref = arrays[case["outputs"]["gramian_weights"]]
    scale = max(np.linalg.norm(ref), 1e-12)
    assert rel_err(w, ref, scale) <= 1e-9
    update = J.T @ np.asarray(w)
    ref_update = arrays[case["outputs"]["aggregation"]]
    assert rel_err(update, ref_update, max(np.linalg.norm(ref_update), 1e-12)) <= 1e-9


EXCESS = reference_cases(("ExcessMTL",))


@pytest.mark.parametrize("case", fast_or_slow(EXCESS, _small_default))
def test_excess_mtl_matches_torchjd(case, x64):
    J, _, arrays = _arrays(case)
    agg = jd.excess_mtl(**_params(case))
    update, state = agg.update(jnp.asarray(J), agg.init(jnp.asarray(J)))
    assert rel_err(update, arrays[case["outputs"]["aggregation"]]) <= 1e-9
    assert rel_err(state.weights, arrays[case["outputs"]["weights"]]) <= 1e-9
    np.testing.assert_allclose(jnp.sum(state.weights), 1.0, rtol=1e-12)


# ------------------------------------------------------------------------------------ Nash-MTL ---

NASH = reference_cases(("NashMTL",))
NASH_CLEAN = [c for c in NASH if not any("inaccurate" in w for w in c.get("warnings") or [])]
NASH_FLAGGED = [c for c in NASH if c not in NASH_CLEAN]


@pytest.mark.parametrize("case", fast_or_slow(NASH_CLEAN, _small_default))
def test_nash_mtl_matches_cvxpy(case, x64):
    """TorchJD solves each convex program with ECOS; our interior-point answer agrees to 1e-4 of
    the update's norm (3e-6 seen)."""
    J, G, arrays = _arrays(case)
    w = _first_call_weights(case, jnp.asarray(G))
    ref = arrays[case["outputs"]["weights"]]
    ref_update = arrays[case["outputs"]["aggregation"]]
    assert rel_err(J.T @ np.asarray(w), ref_update) <= 1e-4
    assert rel_err(w, ref) <= 1e-4


def _nash_violation(G, alpha):
    """How far alpha is from the constraints alpha_i (G alpha)_i >= 1 of every program."""
    return max(0.0, 1.0 - float(np.min(alpha * (G @ alpha))))


@pytest.mark.parametrize(
    "case", fast_or_slow(NASH_FLAGGED, lambda c: c["config"] == "NashMTL" and c["shape"][0] <= 5)
)
def test_nash_mtl_where_ecos_is_inaccurate(case, x64):
    """Where ECOS warns "Solution may be inaccurate" we either (a) prove the programs infeasible
    (0 is in the hull of the normalised gradients: no alpha > 0 has G alpha > 0) and keep the
    previous weights, as TorchJD does on a solver failure, while TorchJD's answer violates the
    constraints; or (b) return a feasible point closer to the bargaining solution
    alpha_i (G alpha)_i = 1 than TorchJD's."""
    _, G, arrays = _arrays(case)
    params = _params(case)
    weighting = jd.nash_mtl_weighting(**{**params, "max_norm": 0.0})
    ours, _ = weighting.update(jnp.asarray(G), weighting.init(G.shape[0], jnp.float64))
    ours = np.asarray(ours)
    ref = arrays[case["outputs"]["weights"]]
    d = np.sqrt(np.maximum(np.diag(G), 0))
    C = G / np.outer(np.where(d > 0, d, 1), np.where(d > 0, d, 1))
    lam = np.asarray(jd.mgda_weighting(epsilon=1e-12, max_iters=5000)(jnp.asarray(C)))
    infeasible = lam @ C @ lam <= 1e-8 or np.any(d == 0)
    if infeasible:
        np.testing.assert_array_equal(ours, np.ones_like(ours))
        if params.get("max_norm", 1.0) == 0.0:
            assert _nash_violation(G, ref) > 0.1
    else:
        assert _nash_violation(G, ours) <= 1e-6
        if params.get("max_norm", 1.0) == 0.0:  # unclipped: the bargaining condition compares
            residual = lambda a: np.max(np.abs(a * (G @ a) - 1.0))  # noqa: E731
            assert _nash_violation(G, ref) > 1e-3 or residual(ours) < residual(ref)


def test_nash_mtl_where_torchjd_raises(x64):
    """TorchJD raises on an all-zero matrix and on m = 1; we keep the weights (the update is 0)
    and return alpha = 1 (G / |G|_F = 1 meets the stopping rule; clipped to max_norm)."""
    w = jd.nash_mtl_weighting()
    out, state = w.update(jnp.zeros((3, 3)), w.init(3, jnp.float64))
    np.testing.assert_array_equal(out, np.ones(3))
    assert int(state.count) == 1
    g = jnp.array([[3.0, 4.0]])
    out, _ = jd.nash_mtl_weighting(max_norm=0.0).update(g @ g.T, w.init(1, jnp.float64))
    np.testing.assert_allclose(out, [1.0], rtol=1e-9)
    out, _ = jd.nash_mtl_weighting(max_norm=0.5).update(g @ g.T, w.init(1, jnp.float64))
    np.testing.assert_allclose(out, [0.1], rtol=1e-9)


# ----------------------------------------------------------------------------------- sequences ---

SEQUENCES = [
    s
    for s in reference()[0]["sequences"]
    if s["class"] in ("PCD", "ExcessMTL", "NashMTL") and s["deterministic"]
]
SEQ_TOL = {"PCD": 1e-9, "ExcessMTL": 1e-9, "NashMTL": 1e-4}
# lax.scan compiles the whole sequence anew: checked on one sequence per class
SCANNED = {next(s["key"] for s in SEQUENCES if s["class"] == c) for c in SEQ_TOL}


@pytest.mark.parametrize(
    "seq",
    # every configuration on the 3 x 20 sequence by default, on the 5 x 40 one in the slow sweep
    [
        pytest.param(
            s, id=s["key"], marks=() if s["key"].startswith("seq_3x") else pytest.mark.slow
        )
        for s in SEQUENCES
    ],
)
def test_five_step_sequences(seq, x64):
    """Five calls on fresh state, carried explicitly and (one sequence per class) through
    lax.scan (same answer)."""
    index, arrays = reference()
    Js = jnp.asarray(arrays[index["sequence_inputs"][seq["sequence"]]["J_key"]])
    agg = AGGREGATORS[seq["class"]](**_params(seq))
    state = agg.init(Js[0])
    outs = []
    for J in Js:
        update, state = agg.update(J, state)
        outs.append(np.asarray(update))
    for k, out in enumerate(outs):
        assert rel_err(out, arrays[seq["outputs"]["aggregation"]][k]) <= SEQ_TOL[seq["class"]]
    if seq["key"] in SCANNED:
        _, scanned = jax.lax.scan(lambda s, J: agg.update(J, s)[::-1], agg.init(Js[0]), Js)
        np.testing.assert_allclose(scanned, np.stack(outs), rtol=1e-10, atol=1e-12)


RANDOM_SEQUENCES = [
    s for s in reference()[0]["sequences"] if "GradVac" in s["config"] and not s["deterministic"]
]


@pytest.mark.parametrize("seq", RANDOM_SEQUENCES, ids=[s["key"] for s in RANDOM_SEQUENCES])
def test_gradvac_sequences_properties(seq, x64):
    """TorchJD's order came from torch's RNG, so check what must hold for any order: the same key
    gives the same sequence, the first step is PCGrad with the same key, and CRMOGM around GradVac
    is the EMA of GradVac's own weights (its state carried inside)."""
    index, arrays = reference()
    Js = jnp.asarray(arrays[index["sequence_inputs"][seq["sequence"]]["J_key"]])
    m = Js.shape[1]
    keys = jax.random.split(jax.random.key(7), Js.shape[0])
    params = dict(seq["params"])
    if seq["class"] == "GradVac":
        weighting = jd.gradvac_weighting(**params)
        run = lambda: jax.lax.scan(  # noqa: E731
            lambda s, x: weighting.update(jd.gramian(x[0]), s, key=x[1])[::-1],
            weighting.init(m, jnp.float64),
            (Js, keys),
        )[1]
        first, again = run(), run()
        np.testing.assert_array_equal(first, again)
        np.testing.assert_allclose(
            first[0], jd.pcgrad_weighting(jd.gramian(Js[0]), key=keys[0]), rtol=1e-6
        )  # equal up to GradVac's eps = 1e-8 in its denominators
        assert np.all(np.isfinite(first))
        ref = arrays[seq["outputs"]["weights"]]
        assert ref.shape == first.shape
        return
    alpha = params["alpha"]
    outer = jd.crmogm_weighting(jd.gradvac_weighting(), alpha=alpha)
    inner = jd.gradvac_weighting()
    s_out, s_in = outer.init(m, jnp.float64), inner.init(m, jnp.float64)
    ema = None
    for J, k in zip(Js, keys):
        w, s_out = outer.update(jd.gramian(J), s_out, key=k)
        hat, s_in = inner.update(jd.gramian(J), s_in, key=k)
        ema = hat if ema is None else alpha * ema + (1 - alpha) * hat
        np.testing.assert_allclose(w, ema, rtol=1e-12)
        np.testing.assert_array_equal(s_out.inner.targets, s_in.targets)


# ------------------------------------------------------------------------- defined behaviour ---


def test_gradvac_targets_and_zero_input(x64):
    """The EMA targets follow phi_hat <- (1 - beta) phi_hat + beta phi (the diagonal is never
    touched); an all-zero Gramian gives weights 1 (a zero update), as in TorchJD."""
    J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    w = jd.gradvac_weighting(beta=0.25)
    _, state = w.update(jd.gramian(J), w.init(2, jnp.float64))
    cos = float(J[0] @ J[1] / jnp.linalg.norm(J[0]) / jnp.linalg.norm(J[1]))
    np.testing.assert_allclose(state.targets, [[0, 0.25 * cos], [0.25 * cos, 0]], rtol=1e-7)
    out, _ = w.update(jnp.zeros((3, 3)), w.init(3, jnp.float64), key=jax.random.key(0))
    np.testing.assert_array_equal(out, np.ones(3))


def test_pcd_special_cases(x64):
    """Primary gradient zero -> zero weights; non-finite input -> NaN weights and an untouched
    state; the second golden of TorchJD's docs; not permutation invariant by design."""
    w = jd.pcd_weighting()
    state = w.init(3, jnp.float64)
    J = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out, _ = w.update(jd.gramian(J), state)
    np.testing.assert_array_equal(out, np.zeros(3))
    bad = jnp.array([[1.0, jnp.nan, 0.0], [jnp.nan, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out, new = w.update(bad, state)
    assert np.all(np.isnan(out))
    np.testing.assert_array_equal(new.sq_norm_ema, state.sq_norm_ema)
    assert int(new.count) == 0
    J = jnp.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]])
    agg = jd.pcd()
    update, _ = agg.update(J, agg.init(J))
    np.testing.assert_allclose(update, [0.5271, 0.5760, 0.6248], atol=1e-4)
    flipped, _ = agg.update(J[::-1], agg.init(J))
    assert not np.allclose(flipped, update, atol=1e-3)


def test_pcd_satisfies_its_kkt_conditions(x64):
    """d = g~_1 + sum mu_j g~_j with mu >= 0, g~_j . d >= tau |g~_j|^2 and complementarity."""
    rng = np.random.default_rng(3)
    for m, n in [(3, 8), (12, 40)]:
        J = rng.standard_normal((m, n))
        G = jnp.asarray(J @ J.T)
        taus = jnp.linspace(0.05, 0.5, m - 1)
        w = np.asarray(jd.solve_priority_qp(G, taus))
        assert w[0] == 1.0 and np.all(w[1:] >= 0)
        d = J.T @ w
        slack = J[1:] @ d - np.asarray(taus) * np.sum(J[1:] ** 2, 1)
        assert np.all(slack >= -1e-9 * np.max(np.abs(J @ J.T)))
        np.testing.assert_allclose(w[1:] * slack, 0.0, atol=1e-8)


def test_excess_mtl_warmup_and_pytree_state(x64):
    """During warm-up the weights stay uniform; the state mirrors the Jacobian's pytree."""
    rng = np.random.default_rng(1)
    tree = {"w": jnp.asarray(rng.standard_normal((3, 4, 2))), "b": jnp.asarray(rng.random((3, 2)))}
    agg = jd.excess_mtl(n_warmup_steps=2)
    state = agg.init(tree)
    assert jax.tree_util.tree_map(jnp.shape, state.sq_grad_sum) == {"w": (3, 4, 2), "b": (3, 2)}
    for _ in range(2):
        _, state = agg.update(tree, state)
        np.testing.assert_allclose(state.weights, np.full(3, 1 / 3))
    other = jax.tree_util.tree_map(
        lambda x: x * jnp.array([1.0, 3.0, 0.5]).reshape(3, *[1] * (x.ndim - 1)), tree
    )
    _, state = agg.update(other, state)
    assert not np.allclose(state.weights, 1 / 3, atol=1e-2)
    # Matrix and pytree give the same weights.
    flat = jnp.concatenate([tree["b"], tree["w"].reshape(3, -1)], axis=1)
    state2 = agg.init(flat)
    other_flat = flat * jnp.array([[1.0], [3.0], [0.5]])
    for J in (flat, flat, other_flat):
        _, state2 = agg.update(J, state2)
    np.testing.assert_allclose(state2.weights, state.weights, rtol=1e-12)


@pytest.mark.parametrize("name", ["GradVac", "PCD", "NashMTL", "ExcessMTL"])
def test_vmap_over_batches_of_jacobians_and_states(name):
    """A batch of independent runs scanned over steps: vmap over Jacobians and states equals the
    loop (float32; tests/test_transformations.py covers both dtypes without the scan)."""
    dtype = "float32"
    agg = AGGREGATORS[name]()
    rng = np.random.default_rng(2)
    Js = jnp.asarray(rng.standard_normal((3, 2, 4, 6)).astype(dtype))
    keys = jax.random.split(jax.random.key(0), 3)

    def run(Js_, k):
        def step(s, J):
            return agg.update(J, s, key=k)[::-1]

        return jax.lax.scan(step, agg.init(Js_[0]), Js_)[1]

    batched = jax.jit(jax.vmap(run))(Js, keys)
    single = jax.jit(run)
    tol = 1e-10 if dtype == "float64" else 2e-4
    for b in range(3):
        np.testing.assert_allclose(batched[b], single(Js[b], keys[b]), rtol=tol, atol=tol)
    assert batched.dtype == Js.dtype


def test_jd_aggregate_carries_the_state(x64):
    """Inside an optax chain under jit, the state lives in JDAggregateState.inner and gives the
    same updates as calling the aggregator by hand."""
    rng = np.random.default_rng(4)
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    Js = [
        jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal((3, *p.shape))), params)
        for _ in range(3)
    ]
    for agg in (jd.pcd(), jd.nash_mtl(), jd.excess_mtl(), jd.gradvac()):
        tx = optax.chain(jd.jd_aggregate(agg, num_objectives=3, seed=1), optax.sgd(1.0))
        state = tx.init(params)
        step = jax.jit(tx.update)
        manual_state = agg.init(Js[0])
        key = jax.random.key(1)
        for J in Js:
            update, state = step(J, state, params)
            step_key = None
            if agg.needs_key:
                key, step_key = jax.random.split(key)
            expected, manual_state = agg.update(J, manual_state, key=step_key)
            for leaf, ref in zip(
                jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(expected)
            ):
                np.testing.assert_allclose(leaf, -ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="num_objectives"):
        jd.jd_aggregate(jd.pcd())


def test_errors():
    with pytest.raises(TypeError, match="stateful"):
        jd.pcd()(jnp.eye(2))
    with pytest.raises(ValueError, match="tau has length 2"):
        w = jd.pcd_weighting(tau=[0.1, 0.2])
        w.init(4)
    with pytest.raises(ValueError, match="tau must be in"):
        jd.pcd(tau=1.5)
    with pytest.raises(ValueError, match="beta"):
        jd.gradvac(beta=2.0)
    with pytest.raises(ValueError, match="beta"):
        jd.pcd(beta=1.0)
    with pytest.raises(ValueError, match="robust_step_size"):
        jd.excess_mtl(robust_step_size=0.0)
    with pytest.raises(ValueError, match="update_weights_every"):
        jd.nash_mtl(update_weights_every=0)
    with pytest.raises(ValueError, match="max_norm"):
        jd.nash_mtl(max_norm=-1.0)
    # a state built for another number of objectives (TorchJD's CRMOGMWeighting raises too)
    changed = r"objectives changed: .* built for m = 3, and this input has m = 4"
    with pytest.raises(ValueError, match=changed):
        w = jd.nash_mtl_weighting()
        w.update(jnp.eye(4), w.init(3))
    with pytest.raises(ValueError, match=changed):
        w = jd.crmogm_weighting(jd.mean_weighting())
        w.update(jnp.eye(4), w.init(3))
    with pytest.raises(ValueError, match=changed):
        w = jd.gradvac_weighting()
        w.update(jnp.eye(4), w.init(3), key=jax.random.key(0))
    with pytest.raises(ValueError, match="does not fit"):
        w = jd.nash_mtl_weighting()
        w.update(jnp.eye(3), w.init(3)._replace(count=jnp.zeros((2,), jnp.int32)))
    with pytest.raises(ValueError, match="PRNG key"):
        w = jd.gradvac_weighting()
        w.update(jnp.eye(3), w.init(3))
    with pytest.raises(ValueError, match=changed):
        agg = jd.excess_mtl()
        agg.update(jnp.ones((4, 2)), agg.init(jnp.ones((3, 2))))


def test_nash_mtl_float32_newton_steps_stay_finite():
    """Issue #13 item 4: in float32 the interior point's unscaled Newton system (diagonal
    spanning many orders of magnitude near an active constraint) returned a step of inf, the
    line search bottomed out and took it, and Nash-MTL stopped after one program with
    alpha_i (G alpha)_i = [0.056, 0.059, 99.9, 0.057]. Equilibrated, it reaches the float64
    bargaining solution."""
    rng = np.random.default_rng(2)
    J = jnp.asarray(rng.standard_normal((3, 2, 4, 6)).astype("float32")[1, 0])
    w = jd.nash_mtl_weighting(max_norm=0.0)
    G = jd.gramian(J)
    alpha = w.update(G, w.init(4))[1].alpha
    prod = np.asarray(alpha * ((G / jnp.linalg.norm(G)) @ alpha))
    assert prod.max() / prod.min() - 1.0 <= 1e-4
    with jax.enable_x64(True):
        G64 = jnp.asarray(np.asarray(G), jnp.float64)
        alpha64 = w.update(G64, w.init(4, jnp.float64))[1].alpha
    np.testing.assert_allclose(alpha, alpha64, rtol=1e-4)

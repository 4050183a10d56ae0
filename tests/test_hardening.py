"""Regressions of issue #13 (hardening): each test names what it protects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd


def _J(m=4, n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((m, n))


@pytest.mark.parametrize("scale", [1e-13, 1e-6, 1e6, 1e13, 1e100])
def test_imtl_g_weights_do_not_depend_on_the_scale_of_the_gradients(scale, x64):
    J = jnp.asarray(_J())
    ref = np.asarray(jd.imtl_g().weights(J))
    assert np.all(ref > 0.1)  # a matrix whose weights are far from the zero fallback
    np.testing.assert_allclose(jd.imtl_g().weights(J * scale), ref, rtol=1e-9)


def test_imtl_g_float32_scale_invariance():
    J = jnp.asarray(_J(), jnp.float32)
    ref = np.asarray(jd.imtl_g().weights(J))
    for scale in (1e-15, 1e15, 1e18):
        np.testing.assert_allclose(jd.imtl_g().weights(J * scale), ref, rtol=1e-4)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_graddrop_keeps_a_non_finite_coordinate_nan_under_jit(bad, x64):
    key = jax.random.key(0)
    J = jnp.asarray(_J()).at[1, 2].set(bad)
    eager = np.asarray(jd.graddrop()(J, key=key))
    jitted = np.asarray(jax.jit(lambda J: jd.graddrop()(J, key=key))(J))
    for out in (eager, jitted):
        assert np.isnan(out[2])
        assert np.all(np.isfinite(np.delete(out, 2)))
    np.testing.assert_allclose(np.delete(jitted, 2), np.delete(eager, 2), rtol=1e-12)


def test_a_python_list_as_jacobian_is_named():
    with pytest.raises(TypeError, match=r"Python number.*jnp.asarray"):
        jd.upgrad()([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="1-D vector"):
        jd.upgrad(jnp.array([1.0, 2.0, -1.0]))


@pytest.mark.parametrize(
    "build",
    [
        lambda: jd.cagrad(c=0.5, tol=-1),
        lambda: jd.cagrad(c=0.5, tol=0.0),
        lambda: jd.cagrad(c=0.5, max_iter=0),
        lambda: jd.cagrad(c=0.5, max_iter=-3),
        lambda: jd.fairgrad(alpha=1.0, tol=-1),
        lambda: jd.fairgrad(alpha=1.0, tol=float("nan")),
        lambda: jd.fairgrad(alpha=1.0, max_iters=0),
    ],
)
def test_invalid_stopping_parameters_are_refused(build):
    with pytest.raises(ValueError, match="must be"):
        build()


def test_numpy_jacobians_work_like_jax_arrays(x64):
    J = _J(5, 7)
    for method in (jd.trimmed_mean(trim_number=1), jd.krum(n_byzantine=1), jd.upgrad()):
        np.testing.assert_allclose(method(J), method(jnp.asarray(J)), rtol=1e-12)


@pytest.mark.parametrize("factory", [jd.upgrad_weighting, jd.dualproj_weighting])
def test_matrices_that_are_no_gramian_give_nan_and_not_converged(factory, x64):
    G = jnp.asarray(_J() @ _J().T)
    w = factory()
    for bad in (
        -G,  # negative diagonal
        jnp.array([[1.0, 2.0], [2.0, 1.0]]),  # symmetric, indefinite (|G_12| > sqrt(G_11 G_22))
        jnp.array([[1.0, 0.5], [-0.5, 1.0]]),  # not symmetric
        G.at[0, 1].add(1.0),  # not symmetric
    ):
        weights, info = w.solve(bad)
        assert np.all(np.isnan(weights)) and not np.any(info.converged)
        assert np.all(np.isnan(w(bad)))
    # Edge cases that are Gramians stay solved: duplicated rows, a zero row, all zeros.
    for good in (
        jnp.ones((2, 2)),
        jnp.array([[1.0, 0.0], [0.0, 0.0]]),
        jnp.zeros((3, 3)),
        G,
    ):
        weights, info = w.solve(good)
        assert np.all(np.isfinite(weights)) and np.all(info.converged)


def test_project_onto_dual_cone_refuses_a_non_gramian(x64):
    V, info = jd.project_onto_dual_cone(jnp.eye(2), jnp.array([[1.0, 2.0], [2.0, 1.0]]))
    assert np.all(np.isnan(V)) and not np.any(info.converged)


def test_jd_aggregate_refuses_a_plain_gradient():
    import optax

    params = {"w": jnp.ones(3)}
    tx = jd.jd_aggregate(jd.upgrad())
    state = tx.init(params)
    with pytest.raises(ValueError, match="plain gradient is shaped like the params"):
        tx.update({"w": jnp.array([1.0, 2.0, 3.0])}, state, params)
    # Behind a transformation that already reduced the Jacobian (not first in the chain).
    chain = optax.chain(jd.jd_aggregate(jd.mean()), jd.jd_aggregate(jd.upgrad()))
    J = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="must come first"):
        chain.update(J, chain.init(params), params)
    with pytest.raises(ValueError, match="structure"):
        tx.update({"v": jnp.ones((2, 3))}, state, params)
    updates, _ = tx.update(J, state, params)  # a Jacobian of params is accepted
    assert updates["w"].shape == (3,)


def test_mean_over_microbatches_splits_every_batched_argument():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 8, 2)), jnp.float32)
    p = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)

    def f(p, x, y):
        return jnp.mean((x @ p - y) ** 2, axis=0)  # 2 losses, means over the micro-batch

    values, J = jd.mean_over_microbatches(jd.value_and_jacobian(f))(p, x, y)
    whole_values, whole_J = jd.value_and_jacobian(f)(p, x.reshape(32, 3), y.reshape(32, 2))
    assert values.shape == (2,) and J.shape == (2, 3, 2)
    np.testing.assert_allclose(values, whole_values, rtol=1e-5)
    np.testing.assert_allclose(J, whole_J, rtol=1e-5, atol=1e-6)

    # batch_argnums names the batched ones; the others go whole to every micro-batch.
    def g(p, x, y, scale):
        return scale * f(p, x, y)

    step = jd.mean_over_microbatches(jd.value_and_jacobian(g), batch_argnums=(1, 2))
    values2, _ = step(p, x, y, jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(values2, whole_values * jnp.array([1.0, 2.0]), rtol=1e-5)
    with pytest.raises(ValueError, match="same leading axis"):
        jd.mean_over_microbatches(jd.value_and_jacobian(g))(p, x, y, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="batch_argnums"):
        jd.mean_over_microbatches(jd.value_and_jacobian(g), batch_argnums=0)


# ----------------------------------------------------------------- the value policy, registry-wide
from methods import BY_NAME, REGISTRY, default_or_slow  # noqa: E402

# NaN / Inf in, NaN out, the state kept: tests/test_policy_properties.py, every method.


@pytest.mark.parametrize("factory", [jd.upgrad, jd.dualproj])
def test_norm_eps_is_relative_by_default_and_torchjds_rule_on_request(factory, x64):
    """Issue #13 item 11, revisited (relative norm_eps): gradients of norm 2e-3 (trace of G
    1.6e-5 < 1e-4) got TorchJD's plain mean by default, which conflicts here. The default now
    falls back only when tr(G) < tiny / eps, so they get the projection; ``norm_eps=1e-4``
    (TorchJD's default) keeps TorchJD's mean, and ``norm_eps=0`` is the projection too."""
    rng = np.random.default_rng(4)
    J = rng.standard_normal((4, 6))
    J[1] = -J[0] + 0.1 * rng.standard_normal(6)  # two nearly opposite objectives
    J = jnp.asarray(J / np.linalg.norm(J, axis=1, keepdims=True) * 2e-3)
    assert float(jnp.trace(J @ J.T)) < 1e-4
    torchjd = factory(norm_eps=1e-4)
    np.testing.assert_allclose(torchjd.weights(J), np.full(4, 0.25), rtol=1e-12)
    assert float(jnp.min(J @ torchjd(J))) < 0  # the mean conflicts with one objective
    np.testing.assert_allclose(factory().weights(J), factory().weights(J * 1e4), rtol=1e-9)
    for exact in (factory(reg_eps=0.0), factory(norm_eps=0.0, reg_eps=0.0)):  # the projection
        assert float(jnp.min(J @ exact(J))) >= -1e-15
        np.testing.assert_allclose(exact(J * 1e4) * 1e-4, exact(J), rtol=1e-6, atol=1e-15)
        np.testing.assert_array_equal(exact(jnp.zeros((3, 5))), np.zeros(5))  # all-zero J: 0


def _nash_two_steps(J):
    agg = jd.nash_mtl()
    state = agg.init(J)
    _, state = agg.update(J, state)
    return agg.update(J * 1.1, state)[0]


def test_nash_mtl_state_says_how_far_the_weights_are_from_the_bargaining_solution():
    """Issue #13 item 4: a float32 step returned alpha with alpha_i (G alpha)_i =
    [0.056, 0.059, 99.9, 0.057] and nothing said so. The solve is now accurate there, and
    ``state.residual`` = max |alpha_i (G alpha)_i - 1| says how far the weights are: rounding
    on that input, large where a program failed and alpha = 1 was kept (a zero row, or two
    opposite rows: 0 in the hull)."""
    J = jnp.asarray(np.random.default_rng(2).standard_normal((3, 2, 4, 6))[1, 0], jnp.float32)
    method = jd.nash_mtl(max_norm=0.0)
    state = method.init(J)
    assert float(state.residual) == np.inf
    out = method.aggregate(J, state)
    G = np.asarray(J @ J.T, np.float64)
    alpha = np.asarray(out.weights, np.float64)
    spread = np.abs(alpha * (G @ alpha) - 1.0).max()
    assert float(out.state.residual) <= 1e-4 and spread <= 1e-4
    for bad in (J.at[2].set(0.0), jnp.stack([J[0], -J[0], J[1], J[2]])):
        out = method.aggregate(bad, method.init(bad))
        np.testing.assert_array_equal(out.weights, np.ones(4, np.float32))
        assert float(out.state.residual) >= 0.5


def test_nash_mtl_under_vmap_equals_each_lane_on_ill_scaled_float32_rows():
    """Issue #13 item 5: on these four float32 lanes (rows scaled 1e-2..1e2) the batched loops of
    the second step ran for minutes (each lane alone: milliseconds). The solve is mapped lane by
    lane under vmap now: the batch gives each lane's own answer, bit for bit on the CPU; on a GPU
    the lane-wise body is compiled apart from the unbatched program, and its fusions round
    differently (measured on an H100: 6e-8 absolute on weights of order 1, a few ulps)."""
    rng = np.random.default_rng(1880596630)
    J = jnp.asarray(
        rng.standard_normal((4, 4, 6)) * np.logspace(-2, 2, 4)[None, :, None], "float32"
    )
    batched = jax.jit(jax.vmap(_nash_two_steps))(J)
    step = jax.jit(_nash_two_steps)
    assert np.all(np.isfinite(batched))
    for i in range(4):
        if jax.default_backend() == "cpu":
            np.testing.assert_array_equal(batched[i], step(J[i]))
        else:
            np.testing.assert_allclose(batched[i], step(J[i]), rtol=8e-7, atol=8e-7)


def test_nash_mtl_vmap_equals_each_lane_in_float64(x64):
    rng = np.random.default_rng(1880596630)
    J = jnp.asarray(rng.standard_normal((4, 4, 6)) * np.logspace(-2, 2, 4)[None, :, None])
    batched = jax.jit(jax.vmap(_nash_two_steps))(J)
    step = jax.jit(_nash_two_steps)
    for i in range(4):
        np.testing.assert_allclose(batched[i], step(J[i]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("factor", ["qr", "gramian"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_config_undefined_direction_gives_zero(dtype, factor):
    """ConFIG on rows +-q in equal numbers with p = ones: pinv(U) p = 0, so the direction is
    0 / 0. It was rounding noise divided by rounding noise (found on a GPU, where the helpers'
    strongly stationary 20 x 100 rank-1 matrix came out with balanced signs: outputs of 1e-10
    that changed with every permutation of the rows); the update is 0 now, and stays defined
    as soon as the signs are unbalanced."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal(30)
    c = np.abs(rng.standard_normal(20)) + 0.1
    c[:10] *= -1
    J = c[:, None] * q[None, :]
    with jax.enable_x64(dtype == "float64"):
        for perm in (np.arange(20), rng.permutation(20)):
            out = np.asarray(jd.config(jnp.asarray(J[perm], dtype), factor=factor))
            np.testing.assert_array_equal(out, np.zeros(30))
        c[0] = -c[0]  # 9 negative, 11 positive: u = q / |q|, update (sum_i c_i) q
        out = np.asarray(jd.config(jnp.asarray(c[:, None] * q[None, :], dtype), factor=factor))
        np.testing.assert_allclose(out, c.sum() * q, rtol=1e-4 if dtype == "float32" else 1e-10)


SCALE_INVARIANT = [s for s in REGISTRY if s.weighting and s.weighting().scale_invariant]


def test_the_scale_invariant_methods_are_the_expected_ones():
    names = {s.name for s in SCALE_INVARIANT}
    assert names == {"mgda", "mgda_exact", "imtl_g", "aligned_mtl", "pcgrad", "krum"}


@pytest.mark.parametrize("spec", SCALE_INVARIANT, ids=lambda s: s.name)
def test_scale_invariant_claim_holds(spec, x64):
    """``scale_invariant = True`` lets the aggregator rescale J: the claim w(c G) = w(G)."""
    J = _J(5, 8, seed=3)
    G = J @ J.T
    weighting = spec.weighting()
    for c in (1e-6, 1e6):
        key = jax.random.key(0)  # PCGrad's random order: the same for both
        np.testing.assert_allclose(
            weighting(c * G, key=key), weighting(G, key=key), rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("spec", [*SCALE_INVARIANT, BY_NAME["config"]], ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_scale_invariant_methods_survive_gramian_overflow_and_underflow(spec, dtype):
    """Issue #13 items 8/9: J finite but J J^T overflowing (float32 J x 1e20) gave NaN, and
    underflowing (|g| ~ 1e-20) gave MGDA the conflicting weights [1, 0, 0, 0] and IMTL-G a zero
    update. A scale-invariant method's aggregator now forms G from J scaled by a power of two:
    the update is c times the update of J, plain and under vmap (a batch whose other
    members are well scaled: only the lanes that need it are rescaled)."""
    big, small = (1e20, 1e-20) if dtype == "float32" else (1e160, 1e-160)
    J = _J(5, 8, seed=3)
    with jax.enable_x64(dtype == "float64"):
        key = jax.random.key(0)  # PCGrad's random order: the same in every call
        built = spec.build()

        def agg(J):
            return built(J, key=key)

        ref = np.asarray(agg(jnp.asarray(J, dtype)), np.float64)
        tol = 1e-5 if dtype == "float32" else 1e-12
        batch = jnp.asarray(np.stack([J, J * big, J * small]), dtype)
        vmapped = np.asarray(jax.vmap(agg)(batch), np.float64)
        for i, c in enumerate((1.0, big, small)):
            # (plain calls: test_float32_gives_float64s_answer_or_nan_at_every_scale, under jit)
            out = np.asarray(agg(jnp.asarray(J * c, dtype)), np.float64)
            np.testing.assert_allclose(out / c, ref, rtol=tol, atol=tol * np.abs(ref).max())
            np.testing.assert_allclose(vmapped[i] / c, ref, rtol=tol, atol=tol * np.abs(ref).max())
        bad = jnp.asarray(J * big, dtype).at[0, 0].set(jnp.nan)
        assert np.isnan(np.asarray(agg(bad))).any()


DEGREES = {"fairgrad": -0.5, "mgda_l2": -0.5}


def test_the_methods_with_another_scale_degree_are_the_expected_ones():
    found = {
        s.name: s.weighting().scale_degree
        for s in REGISTRY
        if s.weighting and s.weighting().scale_degree not in (None, 0.0)
    }
    assert found == DEGREES
    rescalable = {s.name for s in REGISTRY if s.weighting and s.weighting().rescalable}
    own_rule = {"nash_mtl", "pcd", "upgrad", "upgrad_pgd", "dualproj", "gradvac"}
    own_rule |= {"cagrad", "cagrad_rescale"}  # (an absolute norm_eps, on the true trace)
    own_rule |= {"crmogm_upgrad", "crmogm_gradvac"}  # (as their inner weighting)
    assert rescalable == {*DEGREES, *(s.name for s in SCALE_INVARIANT), *own_rule}


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_fairgrad_weights_are_homogeneous_of_their_declared_degree(alpha, x64):
    """w(t G) = t^p w(G) with p = -alpha / (alpha + 1): what lets the aggregator weigh the
    Gramian of J scaled by a power of two when J J^T is out of range."""
    G = jnp.asarray(_J(5, 8, seed=3) @ _J(5, 8, seed=3).T)
    weighting = jd.fairgrad_weighting(alpha=alpha)
    p = weighting.scale_degree
    assert p == pytest.approx(-alpha / (alpha + 1))
    for t in (1e-6, 1e6):
        np.testing.assert_allclose(weighting(t * G), t**p * weighting(G), rtol=1e-9)


SCALES = (1.0, 1e-5, 1e-10, 1e-15, 1e-20, 1e-30, 1e20)
# Random draws depend on the dtype: these two cannot be compared across dtypes.
# By default the fast suite's methods (methods.FAST); every method in the slow sweep.
ACROSS_DTYPES = [p for p in default_or_slow() if p.values[0].name not in ("random", "graddrop")]


@pytest.mark.parametrize("spec", ACROSS_DTYPES)
def test_float32_gives_float64s_answer_or_nan_at_every_scale(spec):
    """No finite wrong answer from the range of float32 (issue #13 items 8/9): the same J
    times 1 ... 1e-30 and 1e20, one step under jit, in float32 and in float64 (whose Gramian
    is in range at every one of these scales). float32 must give float64's update to 1e-4
    (the iterative solvers: their float32 tolerance), or a non-finite one. Before: FairGrad,
    PCD and MGDA with the l2 or loss+ normaliser gave a different or zero update once J J^T
    underflowed (1e-20), and Nash-MTL kept its initial weights from 1e-10 (its programs left
    float32's range: its weights scale as 1/|g|); now FairGrad and the l2/loss+ MGDA weigh the
    rescaled Gramian and apply their degree, Nash-MTL and PCD take the scale into their programs
    and state, UPGrad and DualProj their norm_eps test, GradVac its eps (NaN at 1e20 before)."""
    J = _J(4, 7, seed=0)
    key = jax.random.key(0)
    outs = {}
    for dtype in ("float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            method = spec.build()
            batch = jnp.asarray(np.stack([J * s for s in SCALES]), dtype)

            def step(J, method=method):
                return method.aggregate(J, method.init(J), key=key).update

            run = jax.jit(step)
            outs[dtype] = np.stack([np.asarray(run(J), np.float64) for J in batch])
    for i, s in enumerate(SCALES):
        got, ref = outs["float32"][i], outs["float64"][i]
        if not np.all(np.isfinite(got)):
            continue
        size = np.linalg.norm(ref)
        if size < 1e-30:  # the true update is below float32's range: zero is its rounding
            assert np.linalg.norm(got) <= 1e-30, (s, got)
            continue
        tol = max(1e-4, spec.loose.get("float32", 0.0))  # CAGrad's fallback loop: 1e-3
        assert np.linalg.norm(got - ref) <= tol * size, (s, got, ref)
    # the well-scaled J always gets an answer; so does every scale, for a weighting that takes
    # the rescaled Gramian (but PCD at 1e20, whose EMA of squared norms would overflow: NaN)
    assert np.all(np.isfinite(outs["float32"][0]))
    if getattr(getattr(spec.build(), "weighting", None), "rescalable", False):
        finite = np.all(np.isfinite(outs["float32"]), axis=1)
        assert finite.all() or (spec.name == "pcd" and list(finite) == [True] * 6 + [False])


def test_nash_mtl_and_pcd_keep_their_state_at_the_true_scale():
    """Two steps at 1e-20 in float32 (the Gramian underflows: the aggregator rescales J): the
    state (Nash-MTL's alpha, PCD's EMA of squared norms) is float64's, and so are both
    updates; at 1e20 PCD's EMA would overflow: NaN weights and the state is kept."""
    J = _J(4, 7, seed=1)
    for build in (jd.nash_mtl, jd.pcd):
        res = {}
        for dtype in ("float32", "float64"):
            with jax.enable_x64(dtype == "float64"):
                method = build()
                Js = jnp.asarray(J * 1e-20, dtype)
                state = method.init(Js)
                first = method.aggregate(Js, state)
                second = method.aggregate(Js * 2, first.state)
                kept = second.state[:2]  # alpha or the EMA, and the count
                res[dtype] = [
                    np.asarray(x, np.float64) for x in (first.update, second.update, *kept)
                ]
                if build is jd.nash_mtl:  # at the bargaining solution to rounding
                    assert float(second.state.residual) <= 1e-4
        for got, ref in zip(res["float32"], res["float64"]):
            # (PCD's EMA of squared norms, 1e-42, is below float32's normal range: it is 0)
            atol = max(1e-4 * np.abs(ref).max(), 1e-37)
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=atol)
    method = jd.pcd()
    Jb = jnp.asarray(J * 1e20, jnp.float32)
    state = method.init(Jb)
    out = method.aggregate(Jb, state)
    assert np.all(np.isnan(np.asarray(out.weights)))
    np.testing.assert_array_equal(out.state.sq_norm_ema, state.sq_norm_ema)


def test_cagrad_float32_passes_torchjds_non_conflict_check():
    """Issue #13 item 6: TorchJD's own check (``|(Jd)_+| = |Jd|`` to atol = rtol = 4e-4) on
    its matrices, in float32. Through the Gramian, ``q^2 = w^T G_n w ~ 1e-8`` near TorchJD's
    threshold ``q < 1e-4`` was lost in rounding: the threshold went the wrong way and the
    weights grew to 1/q (9.4 times the tolerance on a strong 20 x 100 matrix, c = 2; TorchJD
    solves in float64). The aggregator now solves on J's triangular factor (``q = |R w|``)."""
    from helpers import typical_matrices

    hard = ("strong_matrix_20x100_r19", "strictly_weak_matrix_20x100_r19", "strong_matrix_20x10_r5")
    matrices = dict(typical_matrices())
    step = jax.jit(lambda J, c: jd.cagrad(J, c=c))
    worst = 0.0
    for name in hard:
        a = matrices[name]
        for c in (1.0, 2.0):
            d = np.asarray(step(jnp.asarray(a, jnp.float32), c), np.float64)
            Jd = a @ d
            gap = np.linalg.norm(Jd) - np.linalg.norm(np.maximum(Jd, 0.0))
            worst = max(worst, gap / (4e-4 + 4e-4 * np.linalg.norm(Jd)))
    assert worst <= 0.5  # 0.06 measured


def _min_cos(J, d):
    return float(((J @ d) / (np.linalg.norm(J, axis=1) * np.linalg.norm(d))).min())


@pytest.mark.parametrize("seed", range(3))
def test_mgda_exact_does_not_conflict_on_ill_conditioned_rows(seed, x64):
    """Issue #13 item 3: Frank-Wolfe (TorchJD's MGDA, method="frank_wolfe") conflicts on rows
    scaled 1e-8 and 1e8 and is far from the minimum-norm point at m = 64; method="exact" (the
    default: an interior-point solve, certified) gives the minimum-norm point: no row conflicts
    with it (cosines >= 0 to rounding) and it is much shorter than Frank-Wolfe's."""
    rng = np.random.default_rng(seed)
    J4 = rng.standard_normal((4, 10)) * np.array([1e-8, 1e8, 1e-8, 1e8])[:, None]
    J64 = rng.standard_normal((64, 200)) * np.logspace(-8, 8, 64)[:, None]
    for J in (J4, J64):
        d = np.asarray(jd.mgda(jnp.asarray(J), method="exact"))
        assert np.all(np.isfinite(d)) and _min_cos(J, d) >= -1e-12
    d_fw = np.asarray(jd.mgda(jnp.asarray(J64), method="frank_wolfe"))
    d_exact = np.asarray(jd.mgda(jnp.asarray(J64)))
    assert _min_cos(J64, d_fw) < -0.05  # the documented parity behaviour
    assert np.linalg.norm(d_exact) < 1e-3 * np.linalg.norm(d_fw)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mgda_exact_is_the_minimum_norm_point(dtype):
    """KKT of min_{a in simplex} |J^T a|^2: a >= 0, sum a = 1, (G a)_i >= a^T G a for every i,
    with equality where a_i > 0. With two exactly opposite rows (0 in the hull: stationary) the
    weights are 0 (before the certified solve they were a point of the simplex)."""
    rng = np.random.default_rng(5)
    J = rng.standard_normal((10, 30)) * np.logspace(-2, 2, 10)[:, None]
    J[0] = -2 * J[1] + 1e-2 * rng.standard_normal(30)  # nearly opposite rows
    tol = 1e-4 if dtype == "float32" else 1e-11
    with jax.enable_x64(dtype == "float64"):
        weighting = jax.jit(jd.mgda_weighting(method="exact"))
        a = np.asarray(weighting(jnp.asarray(J @ J.T, dtype)), np.float64)
        J_opposite = J.copy()
        J_opposite[0] = -2 * J[1]
        G_opposite = jnp.asarray(J_opposite @ J_opposite.T, dtype)
        np.testing.assert_array_equal(weighting(G_opposite), np.zeros(10))
    G = J @ J.T
    Ga, aGa = G @ a, a @ G @ a
    assert a.min() >= 0 and abs(a.sum() - 1) <= tol
    assert Ga.min() >= aGa - tol * np.abs(G).max()
    np.testing.assert_allclose(Ga[a > 1e-3], aGa, rtol=0, atol=tol * np.abs(G).max())


def test_mgda_exact_when_zero_is_in_the_hull(x64):
    """Opposite rows put 0 in the hull: the update vanishes; a zero row takes all the weight."""
    q = np.random.default_rng(0).standard_normal(5)
    d = np.asarray(jd.mgda(jnp.asarray(np.stack([q, -q, 2 * q])), method="exact"))
    assert np.linalg.norm(d) <= 1e-12 * np.linalg.norm(q)
    G = jnp.asarray(np.diag([4.0, 0.0, 1.0]))
    np.testing.assert_array_equal(jd.mgda_weighting(G, method="exact"), [0.0, 1.0, 0.0])

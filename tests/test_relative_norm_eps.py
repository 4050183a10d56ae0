"""norm_eps relative to the dtype (issue: UPGrad, DualProj and CR-MOGM returned the plain mean
on small gradients, min cos(g_i, d) = -0.47 on 1e-3 times a 4 x 6 Jacobian, and CAGrad a zero
update: TorchJD's absolute rule, tr(G) < norm_eps = 1e-4, fired on valid small J).

By default (``norm_eps=None``) the Gramian falls back only when ``tr(G) < tiny / eps`` of its
dtype (no longer known to its precision); an aggregator rescales an underflowing ``J J^T``, so
it falls back on J = 0 alone, and its weights are the same for ``c J`` at every ``c`` that does
not underflow J. ``norm_eps=1e-4`` is TorchJD's rule. The checks compile once per method,
dtype and call path (XLA compilation is what these tests cost) and loop over the scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxjd as jd
from jaxjd.solvers import normalize_regularize

# float32 by default, float64 in the slow sweep (each test compiles UPGrad's or CAGrad's solver
# anew per dtype).
DTYPES = ["float32", pytest.param("float64", marks=pytest.mark.slow)]


def _issue_J():
    """The issue's matrix: a Gaussian 4 x 6 whose row 1 is -2 times row 0 (the dual cone lies
    in the hyperplane g_0^T x = 0; the mean conflicts: min cos -0.47)."""
    J = np.random.default_rng(0).standard_normal((4, 6))
    J[1] = -2 * J[0]
    return J


def _cagrad_J():
    """A matrix on which the mean conflicts (min cos -0.11) and CAGrad (c = 0.5) does not
    (0.12); on the issue's matrix 0 is in the rows' hull and CAGrad's update is zero."""
    rng = np.random.default_rng(7)
    J = rng.standard_normal((4, 6))
    J[1] = -2 * J[0] + 0.5 * rng.standard_normal(6)
    return J


# Scales that do not underflow J (checked), far past where J J^T underflows (float32: c ~
# 1e-19, float64: c ~ 1e-154; the aggregators rescale J there).
SCALES = {
    "float32": (1.0, 1e-3, 1e-10, 1e-17, 1e-20, 1e-30, 1e-35),
    "float64": (1.0, 1e-3, 1e-10, 1e-17, 1e-30, 1e-100, 1e-200, 1e-300),
}
# (build, matrix, fallback weights on J = 0). UPGrad and DualProj with reg_eps = 0, the exact
# projection (the default reg_eps = 1e-4 conflicts by 1e-3 on this degenerate cone, at every
# scale alike).
METHODS = {
    "upgrad": (lambda: jd.upgrad(reg_eps=0.0), _issue_J, np.full(4, 0.25)),
    "dualproj": (lambda: jd.dualproj(reg_eps=0.0), _issue_J, np.full(4, 0.25)),
    "cagrad": (lambda: jd.cagrad(c=0.5), _cagrad_J, np.zeros(4)),
    "crmogm_upgrad": (
        lambda: jd.crmogm(jd.upgrad_weighting(reg_eps=0.0), alpha=0.5),
        _issue_J,
        np.full(4, 0.25),
    ),
}
COS_TOL = {"float32": 1e-5, "float64": 1e-12}
# the weights at scale c against scale 1 (CAGrad in float32: 1e-3, its fallback loop's, as in
# tests/methods.py)
W_TOL = {"float32": 1e-4, "float64": 1e-9}
# the fallback's weights: the preference, to rounding
EXACT = {"float32": 1e-6, "float64": 1e-12}


def _min_cos(J, d):
    J, d = np.asarray(J, np.float64), np.asarray(d, np.float64)
    d = d / np.abs(d).max()  # (d may be 1e-300: its square underflows)
    return float(np.min(J @ d / (np.linalg.norm(J, axis=1) * np.linalg.norm(d))))


def _step(method):
    def step(J):
        out = method.aggregate(J, method.init(J))
        return out.update, out.weights

    return step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name", [n if n == "upgrad" else pytest.param(n, marks=pytest.mark.slow) for n in METHODS]
)
def test_the_guarantee_holds_at_every_scale(name, dtype):
    """On c J: non-conflicting (min_i g_i^T d >= -tol |g_i| |d|, and well above the mean's min
    cos), with the weights of J, for every c down to where J itself would underflow (J J^T
    underflows first: the aggregators rescale J, CR-MOGM as its inner UPGrad); J = 0 gives the
    documented fallback (update 0). Under jit and vmap (one batch of every scale and J = 0: the
    rescaling of only the lanes that need it), and plain (its own jitted pieces and the
    unbatched rescaling) on the smallest scale, 1e-3 and J = 0."""
    build, matrix, fallback = METHODS[name]
    J0 = matrix()
    scales = SCALES[dtype]
    with jax.enable_x64(dtype == "float64"):
        method = build()
        scaled = jnp.asarray(np.stack([J0 * c for c in scales]), dtype)
        assert np.all(np.abs(np.asarray(scaled)) >= jnp.finfo(dtype).tiny)  # J does not underflow
        batch = jnp.concatenate([scaled, jnp.zeros((1, *J0.shape), dtype)])
        updates, weights = jax.jit(jax.vmap(_step(method)))(batch)
        plain = [_step(method)(batch[i]) for i in (1, len(scales) - 1, len(scales))]
        runs = {"vmap": list(zip(updates, weights)), "plain": plain}
        w_ref = np.asarray(weights[0], np.float64)
        mean_cos = _min_cos(J0, J0.mean(axis=0))
        tol = 1e-3 if (name, dtype) == ("cagrad", "float32") else W_TOL[dtype]
        for how, outs in runs.items():
            *on_scales, (zero_update, zero_weights) = outs
            for update, w in on_scales:
                cos = _min_cos(J0, update)
                assert cos >= -COS_TOL[dtype] and cos > mean_cos + 0.1, (how, cos, mean_cos)
                np.testing.assert_allclose(w, w_ref, rtol=tol, atol=tol, err_msg=how)
            np.testing.assert_array_equal(zero_update, np.zeros(J0.shape[1]), err_msg=how)
            np.testing.assert_allclose(zero_weights, fallback, rtol=EXACT[dtype], err_msg=how)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torchjds_rule_is_norm_eps_1e_4(dtype):
    """``norm_eps=1e-4``: TorchJD's absolute rule, on the true trace (also where the aggregator
    rescaled J: 1e-20): on the issue's 1e-3 J, UPGrad and DualProj give the mean (its
    conflict, kept on request), CAGrad the zero update; at scale 1 (tr(G) = 16) the weights are
    the default's, bit for bit."""
    J0 = _issue_J()
    with jax.enable_x64(dtype == "float64"):
        cases = {
            "upgrad": (jd.upgrad, {}, np.full(4, 0.25), (1e-3, 1e-20)),
            "dualproj": (jd.dualproj, {}, np.full(4, 0.25), (1e-3,)),
            "cagrad": (jd.cagrad, {"c": 0.5}, np.zeros(4), (1e-3,)),
        }
        for name, (factory, kwargs, fallback, scales) in cases.items():
            torchjd = factory(**kwargs, norm_eps=1e-4)
            for c in scales:
                J = jnp.asarray(J0 * c, dtype)
                update, weights = _step(torchjd)(J)
                np.testing.assert_allclose(weights, fallback, rtol=EXACT[dtype], err_msg=name)
                np.testing.assert_allclose(update, fallback @ np.asarray(J), rtol=1e-5)
                if name == "upgrad":
                    assert _min_cos(J0, update) < -0.4
            J = jnp.asarray(J0, dtype)
            default = factory(**kwargs)
            np.testing.assert_array_equal(_step(torchjd)(J)[1], _step(default)(J)[1], name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_fallback_is_at_tiny_over_eps(dtype):
    """The default rule, pinned where no aggregator rescales G: ``normalize_regularize`` keeps
    ``G / tr(G)`` at ``tr(G) = tiny / eps`` and zeros it one ulp below; a weighting given a
    Gramian below it gives the fallback (UPGrad the preference, CAGrad zeros) and solves one at
    twice the floor."""
    with jax.enable_x64(dtype == "float64"):
        info = jnp.finfo(dtype)
        floor = float(info.tiny) / float(info.eps)
        unit = jnp.diag(jnp.asarray([0.25, 0.25, 0.25, 0.25], dtype))
        zero = jnp.zeros((), dtype)
        at = normalize_regularize(unit * floor, None, zero)
        np.testing.assert_allclose(at, unit, rtol=EXACT[dtype])
        below = np.nextafter(np.asarray(floor, dtype), np.asarray(0.0, dtype))
        below = normalize_regularize(unit * below, None, zero)
        np.testing.assert_array_equal(below, np.zeros((4, 4)))
        # TorchJD's rule: tr(G) < norm_eps (not <=), and tr(G) = 0 with norm_eps = 0
        np.testing.assert_allclose(normalize_regularize(unit * 1e-4, 1e-4, zero), unit)
        np.testing.assert_array_equal(normalize_regularize(unit * 0.0, 0.0, zero), unit * 0)

        G0 = _cagrad_J() @ _cagrad_J().T
        for weighting, fallback in (
            (jd.upgrad_weighting(), np.full(4, 0.25)),
            (jd.cagrad_weighting(c=0.5), np.zeros(4)),
        ):
            ref = weighting(jnp.asarray(G0, dtype))
            above = jnp.asarray(G0 * (2.0 * floor / np.trace(G0)), dtype)
            below = jnp.asarray(G0 * (0.5 * floor / np.trace(G0)), dtype)
            assert float(jnp.trace(above)) >= floor > float(jnp.trace(below)) > 0
            np.testing.assert_allclose(weighting(above), ref, rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(weighting(below), fallback, rtol=EXACT[dtype])


def test_norm_eps_is_none_by_default_and_validated():
    for factory in (jd.upgrad_weighting, jd.dualproj_weighting, jd.cagrad_weighting):
        kwargs = {"c": 0.5} if factory is jd.cagrad_weighting else {}
        assert factory(**kwargs).norm_eps is None
        assert float(np.asarray(factory(**kwargs, norm_eps=1e-4).norm_eps)) == 1e-4
        with pytest.raises(ValueError, match="norm_eps must be >= 0"):
            factory(**kwargs, norm_eps=-1.0)

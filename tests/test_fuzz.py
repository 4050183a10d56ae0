"""A fuzz of every registered method (``tests/methods.py``) over adversarial Jacobians, plain,
under ``jit`` and under ``vmap``, in float32 and float64 (slow: CI runs ``pytest -m slow``).

Each case (method, input family, dtype, mode) is classified as

- ``OK``;
- ``SILENT_WRONG``: a finite answer that is wrong: a float32 update more than
  ``max(1e-4, spec.loose["float32"])`` (relative) from float64's on the same input; a float64
  update from one mode off float64's reference mode (``jit``) by more than ``max(1e-6, twice
  spec.loose["float64"])``; an update that is not
  ``J^T weights``; a row that conflicts with the update of a method that promises none does
  (see ``_non_conflict_rule``); a finite update entry where ``J`` has a NaN or an Inf;
- ``NONFINITE_UNDOCUMENTED``: a NaN or Inf in the update or the weights on a finite ``J``,
  unless ``ALLOWED_NONFINITE`` names the case and the sentence that documents it;
- ``OBSCURE_ERROR``: an exception that is not a ``ValueError``/``TypeError`` raised by a
  ``raise`` in jaxjd's own code with a message that names the argument (``J``, the state, a
  hyper-parameter): one raised from inside jax or numpy, or any other type, is obscure;
- ``HANG``: a call that runs longer than ``RUN_LIMIT_S`` (its compilation: ``COMPILE_LIMIT_S``);
  a watchdog ends the process (with every thread's traceback) past ``WATCHDOG_S``.

``KNOWN_DEFECTS`` lists the open defects exactly, by (method, family, dtype): their cases are
reported as ``KNOWN_DEFECT``, and an entry that no longer fails fails the test until it is
removed, so the list is always the fuzz's current count of defects.

Not asserted, but listed: ``ALLOWED_NONFINITE`` (a documented NaN), ``REFUSED`` (a clean
``ValueError``/``TypeError``), ``UNVERIFIED`` (a finite float32 answer where float64's is not
finite: nothing to compare it with), ``NEAR_TIE`` and ``BELOW_RESOLUTION`` (see below),
``WARNED`` (a warning was
emitted).

Judgment calls, so that each class is judged correctly:

- Near-ties and ill-conditioned answers. A method that takes a threshold decision (a support, a
  stopping test, a trimmed entry) may be at a discontinuity on the very input, and a method that
  runs a fixed number of expanding steps (SDMGrad's 20 steps at ``lr = 10``) multiplies any
  change of its input: float32's rounding then moves the answer by itself. float32 is compared
  with float64 on ``J`` *and* float64 on ``J`` rounded to float32 (the input float32 actually
  saw); it is wrong only when it is far from both, by more than twice the *spread*: how far
  float64's answer moves when ``J`` moves within float32's rounding (on ``J`` rounded to
  float32, and on ``PERTURBATIONS`` random relative changes of at most ``eps32 / 2`` per
  entry, run only when needed). Where the spread is what lets it pass, the case is listed as
  ``NEAR_TIE``: see ``_against_float64``.
- Below float32's resolution. Where float64's answer depends on directions of ``J`` that
  float32 cannot resolve (a pseudo-inverse that keeps singular values down to float64's
  ``eps``), no float32 arithmetic can give it. float32 is then compared with float64 on ``J``
  with those directions removed: the singular values below ``m eps32`` times the largest, of
  ``J`` or of its unit rows (each row scaled back), set to 0 (``_resolved32``), where that
  changes each row by at most ``m^2 eps32`` of its norm: within a few float32 roundings. A
  float32 answer that matches one of them and none of the float64 answers above is listed as
  ``BELOW_RESOLUTION``: float64's exact answer for an input float32 cannot tell from ``J``
  (README, Values).
- Rounding floor. Comparisons and the non-conflict test allow, besides the relative tolerance,
  ``16 m eps S`` absolute, ``S = sum_i |w_i| |g_i|``: the rounding of ``J^T w`` itself, all a
  dtype can resolve where the rows cancel (``|d| << S``, e.g. 0 in the convex hull).
- Random draws depend on the dtype: Random and GradDrop are not compared across dtypes.

Cost: a program is compiled once per (method, dtype, mode, shape) and run on every input of that
shape (``jit`` and ``vmap`` ahead of time, so that the compilation is timed apart). The main
4 x 6 shape runs every family in every mode; the other shapes (n = 1, n = 0, m = 1, a pytree)
run few families, in one mode (``_modes``; ``JAXJD_FUZZ_FULL=1``: every mode).
``JAXJD_FUZZ_METHODS=upgrad,mgda`` restricts the methods; ``JAXJD_FUZZ_REPORT=path`` writes the
report there (``path.gwN`` from each pytest-xdist worker: one test per method, so the methods
spread over the workers). One case again, with its references and verdict::

    python tests/test_fuzz.py METHOD FAMILY DTYPE MODE
"""

from __future__ import annotations

import dataclasses
import faulthandler
import linecache
import os
import re
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import REGISTRY, unwrapped

from jaxjd import aggregation as agg

DTYPES = ("float64", "float32")  # float64 first: it is float32's reference
MODES = ("plain", "jit", "vmap")
CLASSES = (
    "OK",
    "SILENT_WRONG",
    "NONFINITE_UNDOCUMENTED",
    "OBSCURE_ERROR",
    "HANG",
    "ALLOWED_NONFINITE",
    "REFUSED",
    "UNVERIFIED",
    "NEAR_TIE",
    "BELOW_RESOLUTION",
    "WARNED",
    "KNOWN_DEFECT",
)
FAILING = ("SILENT_WRONG", "NONFINITE_UNDOCUMENTED", "OBSCURE_ERROR", "HANG")
_SHORT = {
    "SILENT_WRONG": "WRONG",
    "NONFINITE_UNDOCUMENTED": "NONFINITE",
    "OBSCURE_ERROR": "OBSCURE",
    "ALLOWED_NONFINITE": "ALLOWED_NAN",
    "BELOW_RESOLUTION": "BELOW_RES",
}

RUN_LIMIT_S = 60.0  # one call on compiled code (or an eager call after the first)
COMPILE_LIMIT_S = 300.0  # a compilation, or the first eager call (its op-by-op compilations)
WATCHDOG_S = 900  # a call still running then ends the process: it must never hang

TOL = 1e-4  # float32 against float64, relative (or the method's own float32 tolerance)
TOL64 = 1e-6  # float64 plain / vmap against float64 jit (or twice the method's own tolerance)
NC_TOL = {"float32": 1e-4, "float64": 1e-9}  # cos(g_i, d) >= -NC_TOL, see _conflict
# Random draws depend on the dtype (the bits drawn for a float32 and a float64 uniform differ).
RANDOM_DRAWS = {"random", "graddrop"}

# --- documented exceptions ------------------------------------------------------------------

_OVERFLOW = (
    "README, Values: 'The other methods (MoDo, SDMGrad, CR-MOGM around another, and those "
    "reading losses: ExcessMTL, MoCo, DB-MTL, GradNorm, MGDA `loss`) give NaN on an overflowed "
    "Gramian' (float32 rows of norm ~2e20: |g|^2 > 3.4e38)"
)
_PCD_OVERFLOW = (
    "README, Values: '... and so does PCD when its running mean of squared norms would "
    "overflow (it then keeps its state)'"
)
# (method, family, dtype) -> the sentence that documents a non-finite output on that finite
# input (in every mode). As small as the documentation allows: each entry is a case the
# documentation names, for the dtype where it happens.
ALLOWED_NONFINITE = {
    **{
        (name, family, "float32"): _OVERFLOW
        for name in (
            "modo",
            "sdmgrad",
            "excess_mtl",
            "moco",
            "db_mtl",
            "gradnorm",
            "mgda_loss",
        )
        for family in ("scale_1e20", "tree_scale_1e20")
    },
    ("pcd", "scale_1e20", "float32"): _PCD_OVERFLOW,
    ("pcd", "tree_scale_1e20", "float32"): _PCD_OVERFLOW,
    # MGDA (exact, the default): cond(J) = 1e12 puts d = J^T a at |d| ~ 1e-8 S, below what the
    # certificate resolves (float64: g_i . d ~ 1e-16 |g_i| against a margin of 4 eps |g_i| S;
    # converged, not stationary, not certified: MGDAWeighting.solve says so; float32 likewise).
    **{
        (name, "cond_1e12", dtype): "MGDAWeighting: 'Otherwise an answer that is not "
        "certified, or not optimal to rounding, gives NaN; :meth:`solve` says why (:class:"
        "`MGDAInfo`). In float32 that happens where the rows conflict beyond what float32 "
        "resolves'"
        for name in ("mgda", "mgda_exact")
        for dtype in DTYPES
    },
    # MGDA "loss+" in float32: losses 0.5 + |g|^2 of 1e30 on rows of norm 1e15 (float64's
    # weights: 3e-47, below float32's range).
    ("mgda_loss", "scale_1e15", "float32"): "MGDAWeighting: 'and NaN where every weight would "
    "be below the dtype's normal range'",
    # Nash-MTL in float32 on rows of norms 1e-8 and 1e8: its sequence of programs does not settle.
    **{
        ("nash_mtl", family, "float32"): "NashMTLWeighting: 'In float32 the weights are NaN (the "
        "value policy: never a finite answer other than float64's) unless the sequence stopped "
        "on that rule, or kept the previous alpha at its first program [...]: not after "
        "optim_niter programs without settling, nor after a program failed midway'"
        for family in ("norms_16_decades", "tree_norms_16_decades")
    },
}

# Open defects (issue #33), listed exactly: a failing case of one of these (method, family, dtype)
# is reported as KNOWN_DEFECT, and an entry whose cases all pass fails the test until it is
# removed. Any other failing case fails the test.
KNOWN_DEFECTS: dict[tuple[str, str, str], str] = {}

# (method, family) -> the sentence that documents a finite update entry where J is not finite.
ALLOWED_FINITE_ON_BAD = {
    ("trimmed_mean", "inf_entry"): "README, Values: 'TrimmedMean drops an infinite entry as the "
    "extreme it is; a NaN propagates.'",
    ("trimmed_mean", "tree_inf_entry"): "README, Values: 'TrimmedMean drops an infinite entry "
    "as the extreme it is; a NaN propagates.'",
}

# --- input families -------------------------------------------------------------------------

M, N = 4, 6


@dataclass(frozen=True)
class Family:
    name: str
    shape: str  # the compile group: every family of a shape shares the programs
    J: object  # numpy float64 array (m, n) or a dict of them (leading axis m)
    bad: int | None = None  # the column of the matrix form holding a NaN / Inf


def _gauss(seed, shape=(M, N)):
    return np.random.default_rng(seed).standard_normal(shape)


def _orthonormal(rng, k):
    q, r = np.linalg.qr(rng.standard_normal((k, k)))
    return q * np.sign(np.diag(r))


def _main_families():
    g = _gauss(0)
    out = {"gaussian": g}
    c = _gauss(1)
    c[1] = -2.0 * c[0]
    out["conflicting"] = c
    rng = np.random.default_rng(2)
    out["rank_one"] = np.outer(rng.standard_normal(M), rng.standard_normal(N))
    rng = np.random.default_rng(3)
    out["low_rank"] = rng.standard_normal((M, 2)) @ rng.standard_normal((2, N))
    d = _gauss(4)
    d[1] = d[0]
    out["duplicate_rows"] = d
    z = _gauss(5)
    z[2] = 0.0
    out["zero_row"] = z
    out["all_zero"] = np.zeros((M, N))
    out["norms_16_decades"] = g * np.array([1e-8, 1e8, 1e-8, 1e8])[:, None]
    rng = np.random.default_rng(7)
    u, v = _orthonormal(rng, M), _orthonormal(rng, N)[:, :M]
    out["cond_1e12"] = u @ np.diag(np.logspace(0, -12, M)) @ v.T
    for label, s in (("1e-3", 1e-3), ("1e-10", 1e-10), ("1e-20", 1e-20)):
        out[f"scale_{label}"] = g * s
    for label, s in (("1e15", 1e15), ("1e20", 1e20)):
        out[f"scale_{label}"] = g * s
    fams = [Family(name, "4x6", J) for name, J in out.items()]
    for name, value in (("nan_entry", np.nan), ("inf_entry", np.inf)):
        J = g.copy()
        J[1, 2] = value
        fams.append(Family(name, "4x6", J, bad=2))
    return fams


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((M, 3)) * scale, "b": rng.standard_normal((M, 2, 2)) * scale}


def _minor_families():
    fams = []
    # n = 1: every pair of rows is aligned or opposite
    fams += [
        Family("n1_gaussian", "4x1", _gauss(10, (M, 1))),
        Family("n1_zero_row", "4x1", _gauss(10, (M, 1)) * np.array([[1.0], [1.0], [0.0], [1.0]])),
        Family("n1_same_sign", "4x1", np.abs(_gauss(11, (M, 1)))),
    ]
    # n = 0: no columns at all (the update is empty)
    fams.append(Family("n0_empty", "4x0", np.zeros((M, 0))))
    # m = 1: a single objective
    fams += [
        Family("m1_gaussian", "1x6", _gauss(12, (1, N))),
        Family("m1_zero", "1x6", np.zeros((1, N))),
        Family("m1_scale_1e-20", "1x6", _gauss(12, (1, N)) * 1e-20),
    ]
    # a pytree: {"a": (4, 3), "b": (4, 2, 2)}; matrix columns: a's 3, then b's 4
    fams += [
        Family("tree_gaussian", "tree", _tree(13)),
        Family("tree_scale_1e-20", "tree", _tree(13, 1e-20)),
        Family("tree_scale_1e20", "tree", _tree(13, 1e20)),
    ]
    rows = _tree(14)
    rows["a"][0] *= 1e-8
    rows["b"][0] *= 1e-8
    rows["a"][1] *= 1e8
    rows["b"][1] *= 1e8
    fams.append(Family("tree_norms_16_decades", "tree", rows))
    for name, value in (("tree_nan_entry", np.nan), ("tree_inf_entry", np.inf)):
        J = _tree(13)
        J["b"][1, 0, 1] = value
        fams.append(Family(name, "tree", J, bad=3 + 1))
    return fams


FAMILIES = _main_families() + _minor_families()
BY_FAMILY = {f.name: f for f in FAMILIES}
SHAPES = tuple(dict.fromkeys(f.shape for f in FAMILIES))

# The modes of the minor shapes (the main one runs all three in both dtypes): the one mode that
# costs least for the method, so that all 33 methods take ~10 minutes on two quiet cores. A
# Gramian-weighted aggregator called plainly runs its weighting's program, compiled per (m, dtype)
# and already compiled for the main shape: plain costs next to nothing on a new n. The other
# methods run op by op when called plainly (slower than one compilation): jit. The float64
# reference of those shapes is taken in that mode. JAXJD_FUZZ_FULL=1: every mode everywhere.
FULL = os.environ.get("JAXJD_FUZZ_FULL") == "1"
MAIN = "4x6"


def _cheap_mode(method):
    return "plain" if isinstance(unwrapped(method), agg.GramianWeightedAggregator) else "jit"


def _reference_mode(shape, method):
    """The mode of the float64 reference: jit on the main shape, else the cheap mode."""
    return "jit" if shape == MAIN or FULL else _cheap_mode(method)


def _modes(shape, method):
    return MODES if shape == MAIN or FULL else (_cheap_mode(method),)


# --- running one case -----------------------------------------------------------------------


def _tree_map(f, J):
    return jax.tree_util.tree_map(f, J)


def _matrix(J):
    """The matrix form (m, n) of a Jacobian pytree: its leaves' columns side by side."""
    leaves = jax.tree_util.tree_leaves(J)
    m = leaves[0].shape[0]
    return np.concatenate([np.asarray(x, np.float64).reshape(m, -1) for x in leaves], axis=1)


def _flat(update):
    leaves = jax.tree_util.tree_leaves(update)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def _rounded32(J):
    return _tree_map(lambda x: np.asarray(x, np.float32).astype(np.float64), J)


PERTURBATIONS = 8  # random changes of J within float32's rounding, for the spread

RESOLVED = ("svd32", "rows32")  # the references on J with float32's unresolved part removed


class _Perturbed:
    """float64's outcomes on ``PERTURBATIONS`` changes of ``J`` by a relative ``eps32 / 2``
    (float32's unit roundoff) times a uniform draw in [-1, 1] (seeded) per entry, computed when
    first asked for."""

    def __init__(self, run, J):
        self.run, self.J, self.outcomes = run, J, None

    def __call__(self):
        if self.outcomes is None:
            u = 0.5 * float(np.finfo(np.float32).eps)  # float32's unit roundoff
            self.outcomes = []
            with jax.enable_x64(True):
                for k in range(PERTURBATIONS):
                    rng = np.random.default_rng(k)
                    Jk = _tree_map(lambda x, r=rng: x * (1 + u * r.uniform(-1, 1, x.shape)), self.J)
                    self.outcomes.append(self.run(_tree_map(jnp.asarray, Jk)))
        return self.outcomes


def _resolved32(J, by_rows):
    """``J`` with the singular values below ``m eps32`` times the largest set to 0: of ``J``
    itself, or (``by_rows``) of its unit rows ``D^-1 J``, then ``D`` times the result. None
    where that changes nothing float64 resolves, where it changes a row by more than
    ``m^2 eps32`` of its norm (more than float32's rounding of that row: a small row of a
    matrix whose large rows dominate its spectrum), or where J is a pytree or not finite."""
    if not isinstance(J, np.ndarray) or J.size == 0 or not np.all(np.isfinite(J)):
        return None
    m, _ = J.shape
    eps = float(np.finfo(np.float32).eps)
    rows = np.linalg.norm(J, axis=1)
    d = (np.where(rows > 0, rows, 1.0) if by_rows else np.ones(m))[:, None]
    u, sv, vt = np.linalg.svd(J / d, full_matrices=False)
    if sv[0] == 0:
        return None
    sv = np.where(sv < m * eps * sv[0], 0.0, sv)
    out = (u * sv) @ vt * d
    change = np.linalg.norm(out - J, axis=1)
    if np.linalg.norm(out - J) <= 1e-13 * np.linalg.norm(J) or np.any(change > m * m * eps * rows):
        return None
    return out


@dataclass
class Outcome:
    update: np.ndarray | None = None
    weights: np.ndarray | None = None
    error: tuple | None = None  # (class, detail)
    seconds: float = 0.0
    compile_seconds: float = 0.0
    warned: list = field(default_factory=list)


def _argument_names(method) -> set:
    """Names a refusal may name: the call's arguments and every hyper-parameter of the method
    and of the methods it is built from."""
    names = {"J", "G", "jacobian", "Jacobian", "gramian", "Gramian", "state", "key", "losses"}
    todo = [method]
    while todo:
        obj = todo.pop()
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                if len(f.name) > 1:  # not CAGrad's "c": any message may hold a lone "c"
                    names.add(f.name)
                value = getattr(obj, f.name, None)
                if isinstance(value, (agg.AbstractWeighting, agg.AbstractAggregator)):
                    todo.append(value)
    return names


def _judge_error(exc, names) -> tuple:
    """``("REFUSED", ...)`` for a ValueError/TypeError raised by a ``raise`` in jaxjd's code that
    names an argument; ``("OBSCURE_ERROR", ...)`` for anything else."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    where = f"{last.filename}:{last.lineno}" if last else "?"
    message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    detail = f"{type(exc).__name__}: {message} [raised at {where}]"
    if not isinstance(exc, (ValueError, TypeError)) or last is None:
        return "OBSCURE_ERROR", detail
    path = last.filename.replace("\\", "/")
    if "/jaxjd/" not in path or "/tests/" in path:
        return "OBSCURE_ERROR", detail
    # The raising statement: the line itself or the start of a statement spanning lines.
    lines = [linecache.getline(last.filename, last.lineno - k) for k in range(4)]
    if not any(line.lstrip().startswith("raise ") for line in lines):
        return "OBSCURE_ERROR", detail + " (not a raise statement)"
    if not any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", str(exc)) for n in names):
        return "OBSCURE_ERROR", detail + " (names no argument)"
    return "REFUSED", detail


class _Runner:
    """One method in one dtype and mode, compiled once for a shape, called on its inputs."""

    def __init__(self, method, mode, names):
        self.mode, self.names = mode, names
        self.compiled = None
        self.compile_error = None
        self.compile_seconds = 0.0
        self.calls = 0
        key = jax.random.key(0)

        def step(J):
            out = method.aggregate(J, method.init(J), key=key)
            return out.update, out.weights

        self.step = step

    def _argument(self, J):
        if self.mode == "vmap":  # a batch of two: the input and twice it; lane 0 is judged
            return _tree_map(lambda x: jnp.stack([x, 2 * x]), J)
        return J

    def __call__(self, J) -> Outcome:
        out = Outcome()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
            try:
                self._run(J, out)
            finally:
                faulthandler.cancel_dump_traceback_later()
        out.warned = sorted({f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught})
        return out

    def _run(self, J, out):
        x = self._argument(J)
        if self.mode != "plain" and self.compiled is None and self.compile_error is None:
            t0 = time.perf_counter()
            try:
                fn = jax.jit(jax.vmap(self.step) if self.mode == "vmap" else self.step)
                self.compiled = fn.lower(x).compile()
            except Exception as exc:
                self.compile_error = _judge_error(exc, self.names)
            self.compile_seconds = out.compile_seconds = time.perf_counter() - t0
        if self.compile_error is not None:
            out.error = self.compile_error
            return
        fn = self.step if self.mode == "plain" else self.compiled
        t0 = time.perf_counter()
        try:
            update, weights = jax.block_until_ready(fn(x))
        except Exception as exc:
            out.error = _judge_error(exc, self.names)
            return
        finally:
            out.seconds = time.perf_counter() - t0
            if self.mode == "plain" and self.calls == 0:  # its op-by-op compilations
                out.compile_seconds, out.seconds = out.seconds, 0.0
            self.calls += 1
        if self.mode == "vmap":
            update = _tree_map(lambda u: u[0], update)
            weights = None if weights is None else weights[0]
        out.update = _flat(update)
        out.weights = None if weights is None else np.asarray(weights, np.float64)


# --- judging one case -----------------------------------------------------------------------


def _non_conflict_rule(method):
    """``(rule, weighting)`` for the methods that promise an update no row conflicts with:

    - UPGrad and DualProj (``"dual_cone"``): ``J^T w`` in the dual cone of the rows; with
      TorchJD's ``reg_eps`` the cone of ``G / tr(G) + reg_eps I``, i.e. ``(J d)_i >= -reg_eps
      tr(G) w_i`` (the KKT conditions of their QP), to the solver's acceptance (its KKT residual
      test: ``max(16 m eps, 1000 eps)``, or an iterative solver's ``tol``, in units of the rows
      of ``G'``); not with an absolute ``norm_eps`` below which they take the mean ("which can
      conflict");
    - MGDA, ``method="exact"`` (``"mgda"``): ``g_i . d >= |d|^2``, certified to ``-32 eps`` in
      cosine (or NaN); with the l2 / loss+ normalisers too (the rows ``g_i / n_i``, ``n_i > 0``);
      Frank-Wolfe is documented to conflict;
    - FairGrad (``"fairgrad"``): ``g_i . d = x_i^{-1/alpha} > 0``, to its ``tol`` relative to
      ``max_j g_j . d``, where such a solution exists (some ``d`` with ``J d > 0``; otherwise it
      documents a large finite iterate).

    CAGrad (its docstring names TorchJD's non-conflict test only as a float32 rounding check;
    the registry's c = 0.5 and 0.7 promise no such property), Nash-MTL (no such sentence),
    PCGrad, IMTL-G, ConFIG and the rest promise nothing of the kind."""
    method = unwrapped(method)
    w = getattr(method, "weighting", None)
    if isinstance(w, (agg.UPGradWeighting, agg.DualProjWeighting)):
        return "dual_cone", w
    if isinstance(w, agg.MGDAWeighting) and w.method == "exact":
        return "mgda", w
    if isinstance(w, agg.FairGradWeighting):
        return "fairgrad", w
    return None, None


def _strictly_feasible(Jm):
    """Whether some d has ``g_i . d > 0`` for every row (a margin of 1e-6 in cosine)."""
    from scipy.optimize import linprog

    norms = np.linalg.norm(Jm, axis=1)
    m, n = Jm.shape
    if n == 0 or np.any(norms == 0):
        return False
    U = Jm / norms[:, None]
    c = np.zeros(n + 1)
    c[-1] = -1.0  # max t  s.t.  U d >= t, |d|_inf <= 1
    res = linprog(
        c, A_ub=np.hstack([-U, np.ones((m, 1))]), b_ub=np.zeros(m),
        bounds=[(-1.0, 1.0)] * n + [(None, 1.0)], method="highs",
    )  # fmt: skip
    return res.status == 0 and -res.fun > 1e-6


def _size(Jm, w):
    """``S = sum_i |w_i| |g_i|`` (the size of the terms of ``J^T w``), or the largest row norm for
    methods that do not weigh the rows."""
    norms = np.linalg.norm(Jm, axis=1)
    if w is None or not np.all(np.isfinite(w)):
        return float(norms.max(initial=0.0))
    return float(np.sum(np.abs(w) * norms))


def _floor(m, dtype, S):
    return 16.0 * m * float(np.finfo(dtype).eps) * S


def _conflict(rule, weighting, Jm, d, w, dtype):
    """A description of the worst row conflicting with ``d`` beyond what ``rule`` allows, or
    None."""
    if rule is None or w is None or Jm.shape[1] == 0:
        return None
    m = Jm.shape[0]
    eps = float(np.finfo(dtype).eps)
    norms = np.linalg.norm(Jm, axis=1)
    Jd, nd, S = Jm @ d, np.linalg.norm(d), _size(Jm, w)
    slack = NC_TOL[dtype] * norms * nd + 16.0 * m * eps * norms * S
    if rule == "dual_cone":
        trace = float(np.sum(norms**2))
        if weighting.norm_eps is not None and trace < float(np.asarray(weighting.norm_eps)):
            return None  # TorchJD's rule: the mean, "which can conflict"
        reg = float(np.asarray(weighting.reg_eps))
        accept = weighting.solver.acceptance(jnp.dtype(dtype), m)
        # the solver's residual, in units of the rows of G' (tr(G) times): summed over the
        # right-hand sides v_k >= 0, sum_k max_j r_j v_kj <= sum_j r_j w_j
        r = np.sqrt(norms**2 + reg * trace)
        slack = slack + reg * trace * np.abs(w) + accept * r * np.sum(r * np.abs(w))
    elif rule == "fairgrad":
        if not _strictly_feasible(Jm):
            return None
        tol = weighting.tol
        if tol is None:  # its documented default
            tol = 1e-6 if dtype == "float32" else 1e-12
        slack = slack + tol * max(float(Jd.max()), 0.0)
    excess = -Jd - slack
    if np.all(excess <= 0):
        return None
    cos = Jd / (np.where(norms > 0, norms, 1.0) * max(nd, 1e-300))
    i = int(np.argmin(np.where(excess > 0, cos, np.inf)))  # the worst conflicting row
    return (
        f"row {i} conflicts with the update: cos(g_i, d) = {cos[i]:.3g}, "
        f"allowed down to {-slack[i] / (norms[i] * nd):.3g}"
    )


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@dataclass
class Case:
    method: str
    family: str
    dtype: str
    mode: str
    cls: str
    detail: str = ""

    def repro(self):
        return f"python tests/test_fuzz.py {self.method} {self.family} {self.dtype} {self.mode}"

    def line(self):
        return f"{self.cls:<22} {self.method} / {self.family} / {self.dtype} / {self.mode}: " + (
            f"{self.detail}\n    repro: {self.repro()}"
        )


def _grouped(cases, order):
    """One line per (class, method, family, dtype), with the modes it holds in (the detail and
    the reproduction of the first)."""
    groups = {}
    for c in sorted(cases, key=lambda c: (order.index(c.cls), c.method, c.family, c.dtype)):
        groups.setdefault((c.cls, c.method, c.family, c.dtype), []).append(c)
    lines = []
    for (cls, method, family, dtype), group in groups.items():
        modes = ",".join(c.mode for c in group)
        lines.append(
            f"{cls:<22} {method} / {family} / {dtype} / {modes}: {group[0].detail}\n"
            f"    repro: {group[0].repro()}"
        )
    return lines


def _judge(spec, fam, dtype, mode, out, results, rule, weighting, ref_mode):
    """The findings of one case: ``[(class, detail)]``, empty when it is OK."""
    found = []
    if out.compile_seconds > COMPILE_LIMIT_S:
        found.append(("HANG", f"compilation took {out.compile_seconds:.0f} s"))
    if out.seconds > RUN_LIMIT_S:
        found.append(("HANG", f"the call took {out.seconds:.0f} s"))
    if out.warned:
        found.append(("WARNED", "; ".join(out.warned)))
    if out.error is not None:
        return [*found, out.error]
    J = fam.J if dtype == "float64" else _rounded32(fam.J)  # what the method saw, exactly
    Jm = _matrix(J)
    m = Jm.shape[0]
    u, w = out.update, out.weights
    finite = np.all(np.isfinite(u)) and (w is None or np.all(np.isfinite(w)))

    if fam.bad is not None:  # a NaN or an Inf in J: the update is not finite where it is
        if np.isfinite(u[fam.bad]) and (spec.name, fam.name) not in ALLOWED_FINITE_ON_BAD:
            found.append(("SILENT_WRONG", f"finite update entry {u[fam.bad]:.6g} where J is not"))
        return found

    if not finite:
        what = "update" if not np.all(np.isfinite(u)) else "weights"
        doc = ALLOWED_NONFINITE.get((spec.name, fam.name, dtype))
        if doc is None:
            found.append(("NONFINITE_UNDOCUMENTED", f"non-finite {what} on a finite J"))
        else:
            found.append(("ALLOWED_NONFINITE", doc))
        return found

    if w is not None:  # update = J^T w
        gap = float(np.linalg.norm(u - Jm.T @ w))
        allowed = TOL * np.linalg.norm(u) + _floor(m, dtype, _size(Jm, w))
        if dtype == "float64":
            allowed = 1e-9 * np.linalg.norm(u) + _floor(m, dtype, _size(Jm, w))
        if gap > allowed:
            found.append(("SILENT_WRONG", f"update is not J^T weights: |u - J^T w| = {gap:.3g}"))

    conflict = _conflict(rule, weighting, Jm, u, w, dtype)
    if conflict is not None:
        found.append(("SILENT_WRONG", conflict))

    ref = results.get((fam.name, "float64", ref_mode))
    ref_ok = ref is not None and ref.error is None and np.all(np.isfinite(ref.update))
    if dtype == "float64" and mode != ref_mode and ref_ok:
        tol = max(TOL64, 2 * spec.loose.get("float64", 0.0))
        allowed = tol * np.linalg.norm(ref.update) + _floor(m, dtype, _size(Jm, ref.weights))
        if np.linalg.norm(u - ref.update) > allowed:
            found.append(
                (
                    "SILENT_WRONG",
                    f"float64 {mode} differs from float64 {ref_mode} by "
                    f"{_rel(u, ref.update):.3g} relative (allowed {tol:g})",
                )
            )
    if dtype == "float32" and spec.name not in RANDOM_DRAWS:
        if not ref_ok:
            found.append(("UNVERIFIED", f"float64's update ({ref_mode}) is not finite"))
            return found
        resolved = [
            (results.get((fam.name, label, ref_mode)), Jr) for label, Jr in _resolved_inputs(fam)
        ]
        found += _against_float64(
            spec,
            u,
            ref,
            results.get((fam.name, "ref32", ref_mode)),
            fam,
            resolved,
            results.get((fam.name, "perturbed", ref_mode)),
        )
    return found


def _resolved_inputs(fam):
    """``[(label, J')]``: the inputs of the float64 references below float32's resolution."""
    out = [(label, _resolved32(fam.J, label == "rows32")) for label in RESOLVED]
    return [(label, Jr) for label, Jr in out if Jr is not None]


def _against_float64(spec, u, ref, ref32, fam, resolved=(), perturbed=None):
    """float32's update ``u`` against float64's on J (``ref``) and on J rounded to float32
    (``ref32``). Wrong when it is far from both: ``tol |d64| + 16 m eps32 S`` (the rounding of
    ``J^T w``), plus twice the *spread*, the largest ``|ref - r|`` that is not an outlier
    (above 10 times their median) over float64's answers ``r`` on J rounded to float32 and on
    ``perturbed()`` (J changed within float32's rounding), from float64's answer on any of
    these inputs: where float64's own answer moves that much when J does (an amplifying
    iteration), float32's arithmetic moves it as much again, and where J crosses a threshold
    (an outlier), float32 may give the answer on the other side; such a case is listed as
    ``NEAR_TIE`` instead of ``OK``. Then ``resolved``: float64 on J less what float32 cannot
    resolve (``BELOW_RESOLUTION``)."""
    m = _matrix(fam.J).shape[0]
    tol = max(TOL, spec.loose.get("float32", 0.0))
    refs = [(ref, fam.J)]
    if ref32 is not None and ref32.error is None and np.all(np.isfinite(ref32.update)):
        refs.append((ref32, _rounded32(fam.J)))
    allowed = [
        tol * np.linalg.norm(r.update) + _floor(m, "float32", _size(_matrix(Jr), r.weights))
        for r, Jr in refs
    ]
    errors = [float(np.linalg.norm(u - r.update)) for r, _ in refs]
    if any(e <= a for e, a in zip(errors, allowed)):
        return []
    rounded = refs[-1][0]  # float64 on J rounded to float32 (or on J)
    moved = [rounded] + (perturbed() if perturbed is not None else [])
    moved = [r for r in moved if r.error is None and np.all(np.isfinite(r.update))]
    # the largest move that is not an outlier (> 10 times the median: J moved across a
    # threshold; float32 may still be near that answer, below), so that a jump does not widen
    # the test around float64's answer
    moves = [float(np.linalg.norm(ref.update - r.update)) for r in moved] or [0.0]
    spread = max(d for d in moves if d <= 10 * float(np.median(moves)))
    # float32 may be near float64's answer on any of those inputs (each float32 could have seen)
    for r in moved[1:]:
        refs.append((r, fam.J))
        allowed.append(
            tol * np.linalg.norm(r.update) + _floor(m, "float32", _size(_matrix(fam.J), r.weights))
        )
        errors.append(float(np.linalg.norm(u - r.update)))
    d64 = float(np.linalg.norm(ref.update))
    detail = (
        f"float32 update {_rel(u, ref.update):.3g} relative from float64's (from float64's on "
        f"the float32-rounded J: {_rel(u, rounded.update):.3g}; allowed {tol:g}, and "
        f"float64's spread within float32's rounding of J: {spread / max(d64, 1e-300):.3g}); "
        f"|d64| = {d64:.3g}"
    )
    if any(e <= a + 2 * spread for e, a in zip(errors, allowed)):
        return [("NEAR_TIE", detail)]
    for r, Jr in resolved:  # float64 on J less what float32 cannot resolve
        if r is None or r.error is not None or not np.all(np.isfinite(r.update)):
            continue
        a = tol * np.linalg.norm(r.update) + _floor(m, "float32", _size(Jr, r.weights))
        if np.linalg.norm(u - r.update) <= a:
            return [("BELOW_RESOLUTION", detail)]
    return [("SILENT_WRONG", detail)]


# --- the fuzz of one method -----------------------------------------------------------------


def fuzz_method(spec, families=FAMILIES, only=None, keep=False):
    """Every case of one method: ``(cases, seconds per shape)`` (and the outcomes with
    ``keep``). ``only = (dtype, mode)`` runs that case and its float64 references alone."""
    cases, timing, kept = [], {}, {}
    rule, weighting = _non_conflict_rule(spec.build())
    names = _argument_names(unwrapped(spec.build()))
    for shape in dict.fromkeys(f.shape for f in families):
        fams = [f for f in families if f.shape == shape]
        results = {}
        t0 = time.perf_counter()
        ref_mode = _reference_mode(shape, spec.build())
        for dtype in DTYPES:
            with jax.enable_x64(dtype == "float64"):
                method = spec.build()
                for mode in _modes(shape, method):
                    reference = dtype == "float64" and mode == ref_mode
                    if only is not None and not reference and (dtype, mode) != only:
                        continue
                    run = _Runner(method, mode, names)
                    for fam in fams:
                        results[fam.name, dtype, mode] = run(_tree_map(jnp.asarray, fam.J))
                    if reference:  # float64 on the input float32 sees: near-ties show here
                        for fam in fams:
                            results[fam.name, "ref32", mode] = run(
                                _tree_map(jnp.asarray, _rounded32(fam.J))
                            )
                            for label, Jr in _resolved_inputs(fam):
                                results[fam.name, label, mode] = run(jnp.asarray(Jr))
                            results[fam.name, "perturbed", mode] = _Perturbed(run, fam.J)
        timing[shape] = time.perf_counter() - t0
        if keep:
            kept.update(results)
        for (family, dtype, mode), out in results.items():
            if dtype in ("ref32", "perturbed", *RESOLVED) or (
                only is not None and (dtype, mode) != only
            ):
                continue
            fam = BY_FAMILY[family]
            found = _judge(spec, fam, dtype, mode, out, results, rule, weighting, ref_mode)
            if not [c for c, _ in found if c not in ("WARNED", "NEAR_TIE", "BELOW_RESOLUTION")]:
                found.insert(0, ("OK", ""))
            cases += [Case(spec.name, family, dtype, mode, c, d) for c, d in found]
    return (cases, timing, kept) if keep else (cases, timing)


# --- pytest ---------------------------------------------------------------------------------

_SELECTED = os.environ.get("JAXJD_FUZZ_METHODS")
SPECS = [s for s in REGISTRY if not _SELECTED or s.name in _SELECTED.split(",")]


def _report(cases, timing, stale, header=""):
    counts = defaultdict(Counter)
    for c in cases:
        counts[c.method][c.cls] += 1
    shown = [k for k in CLASSES if any(counts[m][k] for m in counts)]
    short = {k: _SHORT.get(k, k) for k in shown}
    width = max([len(m) for m in counts] + [6])
    lines = [header] if header else []
    lines.append(
        f"{'method':<{width}} " + " ".join(f"{short[k]:>11}" for k in shown) + "  seconds (wall)"
    )
    total = Counter()
    for name in counts:
        total.update(counts[name])
        secs = sum(timing.get(name, {}).values())
        lines.append(
            f"{name:<{width}} "
            + " ".join(f"{counts[name][k]:>11}" for k in shown)
            + f"  {secs:7.1f}"
        )
    lines.append(
        f"{'TOTAL':<{width}} "
        + " ".join(f"{total[k]:>11}" for k in shown)
        + f"  {sum(sum(t.values()) for t in timing.values()):7.1f}"
    )
    legend = [f"{short[k]} = {k}" for k in shown if short[k] != k]
    if legend:
        lines.append("(" + ", ".join(legend) + ")")
    bad = [c for c in cases if c.cls != "OK"]
    if bad:
        lines.append("")
        lines.append("Cases that are not plainly OK (class, method / family / dtype / modes):")
        lines += _grouped(bad, CLASSES)
    if stale:
        lines.append("")
        lines.append("Allow-list entries no case needed (stale?):")
        lines += [f"  {e}" for e in stale]
    return "\n".join(lines)


def _stale_entries(spec, cases):
    used = {(c.method, c.family, c.dtype) for c in cases if c.cls == "ALLOWED_NONFINITE"}
    return [e for e in ALLOWED_NONFINITE if e[0] == spec.name and e not in used]


@pytest.fixture(scope="module")
def collected():
    """Every method's cases, for the report at the end of the module."""
    store = {"cases": [], "timing": {}, "stale": []}
    traceback_filtering = jax.config.jax_traceback_filtering
    # Unfiltered tracebacks: an error raised inside jax must show its last frame there.
    jax.config.update("jax_traceback_filtering", "off")
    t0 = time.perf_counter()
    yield store
    jax.config.update("jax_traceback_filtering", traceback_filtering)
    text = _report(
        store["cases"],
        store["timing"],
        store["stale"],
        header=f"jaxjd fuzz: {len(store['timing'])} methods, "
        f"{time.perf_counter() - t0:.0f} s wall, {time.process_time():.0f} s CPU (process)",
    )
    print("\n" + text)
    path = os.environ.get("JAXJD_FUZZ_REPORT")
    if path:
        worker = os.environ.get("PYTEST_XDIST_WORKER")  # each worker reports its own methods
        with open(f"{path}.{worker}" if worker else path, "w") as f:
            f.write(text + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_fuzz(spec, collected):
    """Every case of the method is OK, a documented NaN, or a clean refusal: no finite wrong
    answer, no undocumented NaN, no error from inside jax, no hang."""
    cases, timing = fuzz_method(spec)
    stale = _stale_entries(spec, cases)
    collected["cases"] += cases
    collected["timing"][spec.name] = timing
    collected["stale"] += stale
    for c in cases:
        if c.cls in FAILING and (c.method, c.family, c.dtype) in KNOWN_DEFECTS:
            c.cls = "KNOWN_DEFECT"
    print("\n" + _report(cases, {spec.name: timing}, stale))
    failing = [c for c in cases if c.cls in FAILING]
    assert not failing, f"{len(failing)} failing cases of {spec.name}:\n" + "\n".join(
        _grouped(failing, FAILING)
    )
    seen = {(c.method, c.family, c.dtype) for c in cases if c.cls == "KNOWN_DEFECT"}
    fixed = [e for e in KNOWN_DEFECTS if e[0] == spec.name and e not in seen]
    assert not fixed, f"known defects that no longer fail (remove them): {fixed}"


@pytest.mark.slow
def test_the_allow_list_names_registered_methods_and_families():
    names = {s.name for s in REGISTRY}
    for method, family, dtype in ALLOWED_NONFINITE:
        assert method in names and family in BY_FAMILY and dtype in DTYPES
    for method, family, dtype in KNOWN_DEFECTS:
        assert method in names and family in BY_FAMILY and dtype in DTYPES
    for method, family in ALLOWED_FINITE_ON_BAD:
        assert method in names and BY_FAMILY[family].bad is not None


def _reproduce(method, family, dtype, mode):
    from methods import BY_NAME

    spec = BY_NAME[method]
    jax.config.update("jax_traceback_filtering", "off")
    fam = BY_FAMILY[family]
    cases, _, results = fuzz_method(spec, [fam], only=(dtype, mode), keep=True)
    np.set_printoptions(precision=17, linewidth=150)
    print(f"J ({family}), as a matrix:\n{_matrix(fam.J)}")
    for (_, d, mo), out in results.items():
        if d == "perturbed":
            continue
        what = {
            "ref32": "float64 on J rounded to float32",
            "svd32": "float64 on J less its singular values below float32's resolution",
            "rows32": "float64 on J less its unit rows' singular values below float32's resolution",
        }.get(d, f"{d} {mo}")
        print(f"{what}: update {out.update}, weights {out.weights}, error {out.error}")
    for c in cases:
        print(c.line())


if __name__ == "__main__":
    _reproduce(*sys.argv[1:5])

"""Test inputs: TorchJD's reference data and matrix families, tolerances, small checks."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"


@functools.cache
def reference():
    index = json.loads((DATA / "index.json").read_text())
    arrays = dict(np.load(DATA / "reference.npz"))
    return index, arrays


def reference_cases(classes, deterministic=True):
    index, _ = reference()
    return [
        c
        for c in index["cases"]
        if c["class"] in classes and c["status"] == "ok" and c["deterministic"] == deterministic
    ]


def rel_err(a, b, scale=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(b) if scale is None else scale
    return np.linalg.norm(a - b) / max(scale, 1e-300)


# --- TorchJD's matrix families (tests/unit/aggregation/_matrix_samplers.py), rebuilt in numpy ---


def _orthonormal(rng, n, k):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    return q[:, :k]


def normal_matrix(rng, m, n, r):
    """``U[:, :r] diag(|N(0,1)|) V[:r]`` with random orthonormal U, V."""
    u = _orthonormal(rng, m, r)
    v = _orthonormal(rng, n, r).T
    return u @ np.diag(np.abs(rng.standard_normal(r))) @ v


def strong_matrix(rng, m, n, r):
    """Strongly stationary: a positive v with ``v^T A = 0``."""
    v = np.abs(rng.standard_normal(m)) + 0.1
    # Orthonormal basis of the complement of v, r directions of it.
    comp = np.linalg.svd(np.eye(m) - np.outer(v, v) / (v @ v))[0][:, : m - 1]
    u = comp @ _orthonormal(rng, m - 1, min(r, m - 1))
    s = np.abs(rng.standard_normal(u.shape[1]))
    return u @ np.diag(s) @ _orthonormal(rng, n, u.shape[1]).T


def strictly_weak_matrix(rng, m, n, r):
    """Weakly but not strongly stationary: ``v^T A = 0`` for some ``v >= 0`` (zero on the last
    row), and every left null vector vanishes on the last row, so none is positive."""
    v = np.abs(rng.standard_normal(m)) + 0.1
    v[-1] = 0.0
    e_last = np.zeros(m)
    e_last[-1] = 1.0
    # r - 1 random directions orthogonal to both v and e_last, then e_last itself.
    basis = np.linalg.qr(np.stack([v, e_last], axis=1), mode="complete")[0][:, 2:]
    q = basis @ _orthonormal(rng, m - 2, r - 1)
    cols = np.concatenate([e_last[:, None], q], axis=1)
    s = np.abs(rng.standard_normal(r)) + 0.1
    return cols @ np.diag(s) @ _orthonormal(rng, n, r).T


def non_weak_matrix(rng, m, n, r):
    """A positive left singular vector with positive singular value: no v >= 0 annihilates A."""
    v = np.abs(rng.standard_normal(m)) + 0.1
    v /= np.linalg.norm(v)
    k = min(r, m, n)
    others = np.linalg.svd(np.eye(m) - np.outer(v, v))[0][:, : m - 1]
    u = np.concatenate([v[:, None], others @ _orthonormal(rng, m - 1, k - 1)], axis=1)
    s = np.abs(rng.standard_normal(k)) + 0.1
    return u @ np.diag(s) @ _orthonormal(rng, n, k).T


NORMAL_DIMS = [(1, 1, 1), (4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9)]
STATIONARY_DIMS = [(20, 10, 10), (20, 10, 5), (20, 10, 1), (20, 100, 1), (20, 100, 19)]
SCALES = [0.0, 1e-10, 1e3, 1e5, 1e10, 1e15]


def _family(fn, dims, seed):
    rng = np.random.default_rng(seed)
    return [(f"{fn.__name__}_{m}x{n}_r{r}", fn(rng, m, n, r)) for (m, n, r) in dims]


def normal_matrices():
    return _family(normal_matrix, NORMAL_DIMS, 0)


def zero_matrices():
    return [(f"zero_{m}x{n}", np.zeros((m, n))) for (m, n) in [(1, 1), (4, 3), (9, 11)]]


def strong_matrices():
    return _family(strong_matrix, STATIONARY_DIMS, 1)


def strictly_weak_matrices():
    return _family(strictly_weak_matrix, STATIONARY_DIMS, 2)


def non_weak_matrices():
    return _family(non_weak_matrix, STATIONARY_DIMS, 3)


def non_strong_matrices():
    return strictly_weak_matrices() + non_weak_matrices()


def typical_matrices():
    return zero_matrices() + normal_matrices() + strong_matrices() + non_strong_matrices()


def scaled_matrices():
    return [(f"{name}_x{scale:g}", a * scale) for name, a in normal_matrices() for scale in SCALES]


def ids(cases):
    return [name for name, _ in cases]


#: One strong, strictly weak and non-weak matrix at m = 20 (one shape: one compile per method)
#: by default; the property tests run on every matrix in the slow sweep (the zero J's update is
#: checked by test_errors and test_methods).
FAST_MATRICES = frozenset(
    {
        "strong_matrix_20x10_r5",
        "strictly_weak_matrix_20x10_r5",
        "non_weak_matrix_20x10_r5",
    }
)


def matrix_params(cases):
    """pytest params over named matrices: :data:`FAST_MATRICES` by default, every matrix in the
    slow sweep (``pytest -m slow``); ids are the matrices' names."""
    import pytest

    return [
        pytest.param(c, id=c[0], marks=() if c[0] in FAST_MATRICES else pytest.mark.slow)
        for c in cases
    ]


def fast_or_slow(cases, fast):
    """pytest params: the cases where ``fast(case)`` holds run by default, the others only in
    the slow sweep (``pytest -m slow``); ids are the case keys."""
    import pytest

    return [pytest.param(c, id=c["key"], marks=() if fast(c) else pytest.mark.slow) for c in cases]


def run_on_cpu_devices(args: list, timeout: int = 900):
    """Runs ``python *args`` in a subprocess on CPU devices (the simulated device count is fixed
    when JAX starts, so multi-device tests run apart; the script sets its own XLA_FLAGS) and
    returns the completed process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"  # the simulated devices are CPU devices, also on a GPU machine
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )

"""Families of test Jacobians shared by the solver tests and the benchmarks (NumPy, float64).

Each family is a function ``(rng, m, n) -> (m, n) array``. They cover what makes the dual-cone
QP hard or easy: shared directions with random signs (many conflicting pairs), plain Gaussian
rows, row norms spread over orders of magnitude, low rank, ill-conditioning, near-duplicate rows,
and per-sample gradients of a small network.
"""

from __future__ import annotations

import numpy as np


def conflicting(rng, m, n):
    """Gaussian rows sharing a direction with random signs: many conflicting pairs."""
    base = rng.standard_normal(n)
    return rng.standard_normal((m, n)) + rng.choice([-1.5, 1.0], size=(m, 1)) * base


def gaussian(rng, m, n):
    """Independent Gaussian rows (nearly orthogonal when n >> m)."""
    return rng.standard_normal((m, n))


def imbalanced(rng, m, n):
    """Conflicting rows whose norms spread over four orders of magnitude (1e-2 .. 1e2)."""
    return conflicting(rng, m, n) * np.logspace(-2, 2, m)[rng.permutation(m), None]


def low_rank(rng, m, n):
    """Rank ``max(1, m // 8)`` plus 1e-3 noise."""
    r = max(1, m // 8)
    a = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    return a * rng.choice([-1.0, 1.0], size=(m, 1)) + 1e-3 * rng.standard_normal((m, n))


def ill_conditioned(rng, m, n):
    """Singular values ``logspace(0, -6)``: condition number 1e12 of the Gramian."""
    k = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, k)))[0]
    v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    return (u * np.logspace(0, -6, k)) @ v.T


def near_duplicates(rng, m, n):
    """A few distinct directions, each repeated with 1e-4 relative perturbations and signs."""
    d = max(2, m // 4)
    base = rng.standard_normal((d, n))
    rows = base[rng.integers(0, d, m)] * rng.choice([-1.0, 1.0], size=(m, 1))
    return rows + 1e-4 * rng.standard_normal((m, n))


def per_sample(rng, m, n):
    """Per-sample gradients of a two-layer tanh network (about n parameters) on a regression
    task, at a random point: one row per sample."""
    d_in = 8
    h = max(1, (n - 1) // (d_in + 1))
    x = rng.standard_normal((m, d_in))
    y = rng.standard_normal(m)
    w1 = rng.standard_normal((d_in, h)) / np.sqrt(d_in)
    w2 = rng.standard_normal(h) / np.sqrt(h)
    z = np.tanh(x @ w1)  # (m, h)
    r = z @ w2 - y  # residuals: the loss is r^2 / 2
    g_w2 = r[:, None] * z
    g_w1 = (r[:, None] * w2 * (1 - z**2))[:, None, :] * x[:, :, None]  # (m, d_in, h)
    g = np.concatenate([g_w1.reshape(m, -1), g_w2], axis=1)
    out = np.zeros((m, n))
    out[:, : min(n, g.shape[1])] = g[:, :n]
    return out


FAMILIES = {
    "conflicting": conflicting,
    "gaussian": gaussian,
    "imbalanced": imbalanced,
    "low_rank": low_rank,
    "ill_conditioned": ill_conditioned,
    "near_duplicates": near_duplicates,
    "per_sample": per_sample,
}


def family_matrices(m, n, seeds=(0, 1, 2)):
    """``(name, seed, J)`` for every family; the conflicting family with every seed, the others
    with the first seed only (a worst case over families and seeds)."""
    out = []
    for name, fn in FAMILIES.items():
        for seed in seeds if name == "conflicting" else seeds[:1]:
            out.append((name, seed, fn(np.random.default_rng([seed, m, n]), m, n)))
    return out


def gramian_batch(B, m, n, seed):
    """``(B, m, m)`` Gramians ``J J^T``, one family per Gramian, cycling (from ``seed``)."""
    names = list(FAMILIES)
    rng = np.random.default_rng(seed)
    Gs = []
    for b in range(B):
        a = FAMILIES[names[(b + seed) % len(names)]](rng, m, n)
        Gs.append(a @ a.T)
    return np.stack(Gs)

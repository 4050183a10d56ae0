"""Writes tests/data/libmtl.npz and libmtl.json: LibMTL's own weighting code (commit 4336804,
2025-05-14) run on fixed Jacobians and losses (float64), for the options jaxjd takes from it.

LibMTL's weightings are mixins of its trainer; this script runs their ``backward`` unchanged,
giving them the few trainer attributes they read (one shared parameter vector ``p`` and losses
``L_i(p) = c_i + g_i . p`` at ``p = 0``, so that the rows of J are the given ``g_i`` and the loss
values the given ``c_i``), and stores the gradient they write into ``p.grad`` (the update) and
the weights they return. Run by hand with a LibMTL checkout (only torch, numpy and scipy are
imported from it; its package ``__init__`` files are skipped):

    git clone https://github.com/median-research-group/LibMTL /tmp/LibMTL
    git -C /tmp/LibMTL checkout 4336804
    python tests/data/make_libmtl_goldens.py /tmp/LibMTL
"""

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
ROOT = Path(sys.argv[1])
COMMIT = subprocess.run(
    ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
).stdout.strip()
assert COMMIT.startswith("4336804"), COMMIT
for name, sub in (("LibMTL", ""), ("LibMTL.weighting", "weighting")):
    package = types.ModuleType(name)
    package.__path__ = [str(ROOT / "LibMTL" / sub)]
    sys.modules[name] = package
HERE = Path(__file__).parent
rng = np.random.default_rng(20261127)


def run_sequence(cls_name, Js, losses_seq, own_lr=None, initial_losses=None, **kwargs):
    """LibMTL's ``cls_name.backward`` on one instance, step after step, on rows ``Js[t]`` and
    loss values ``losses_seq[t]``: the updates and the returned weights of every step. With
    ``own_lr``, the weighting's own parameters (GradNorm's ``loss_scale``) take a step of
    ``torch.optim.Adam(lr=own_lr)`` after each backward, as LibMTL's trainer's optimizer does;
    ``initial_losses`` fills the trainer's ``train_loss_buffer[:, 0]`` (GradNorm's L(0))."""
    module = importlib.import_module(f"LibMTL.weighting.{cls_name}")
    base = getattr(module, cls_name)
    p = torch.nn.Parameter(torch.zeros(Js[0].shape[1]))

    class Harness(base):
        def __init__(self):
            super().__init__()
            self.task_num, self.device, self.rep_grad, self.epoch = Js[0].shape[0], "cpu", False, 1

        def get_share_params(self):
            return [p]

        def zero_grad_share_params(self):  # as the trainer's: zeros, kept allocated
            if p.grad is not None:
                p.grad.zero_()

    w = Harness()
    w.init_param()
    if initial_losses is not None:
        w.train_loss_buffer = np.stack([initial_losses, initial_losses], axis=1)
    own = torch.optim.Adam(list(w.parameters()), lr=own_lr) if own_lr is not None else None
    updates, weights = [], []
    for J, losses in zip(Js, losses_seq, strict=True):
        g = torch.tensor(J)
        values = torch.stack([torch.tensor(c) + g[i] @ p for i, c in enumerate(losses)])
        weights.append(np.asarray(w.backward(values, **kwargs), np.float64))
        updates.append(p.grad.detach().numpy().copy())
        p.grad = None
        if own is not None:
            own.step()
            own.zero_grad()
    return np.stack(updates), np.stack(weights)


def run(cls_name, J, losses, **kwargs):
    """One step of :func:`run_sequence`: (update, returned weights)."""
    updates, weights = run_sequence(cls_name, [J], [losses], **kwargs)
    return updates[0], weights[0]


def jacobian(m, n, kind):
    A = rng.standard_normal((m, n))
    if kind == "scaled":
        A *= np.logspace(-1, 1, m)[:, None]
    elif kind == "conflicting":
        A -= 1.5 * A.mean(0)
    return A


arrays, cases = {}, []
for m, n, kind in ((2, 5, "gaussian"), (3, 6, "scaled"), (4, 8, "conflicting"), (5, 7, "scaled")):
    J = jacobian(m, n, kind)
    losses = rng.uniform(0.2, 3.0, m)
    tag = f"{kind}_{m}x{n}"
    arrays[f"J/{tag}"], arrays[f"losses/{tag}"] = J, losses
    for gn in ("none", "l2", "loss", "loss+"):
        update, weights = run("MGDA", J, losses, mgda_gn=gn)
        key = f"MGDA/{tag}/{gn}"
        arrays[f"update/{key}"], arrays[f"weights/{key}"] = update, weights
        cases.append({"key": key, "method": "MGDA", "input": tag, "normalizer": gn})
    for calpha in (0.4, 0.9):
        for rescale in (0, 1, 2):
            update, weights = run("CAGrad", J, losses, calpha=calpha, rescale=rescale)
            key = f"CAGrad/{tag}/c={calpha}/rescale={rescale}"
            arrays[f"update/{key}"], arrays[f"weights/{key}"] = update, weights
            cases.append(
                {"key": key, "method": "CAGrad", "input": tag, "c": calpha, "rescale": rescale}
            )

# MoCo and DB-MTL: five steps on one instance (their state tracks the gradients).
sequences = []
for m, n in ((3, 6), (4, 5)):
    Js = np.stack([jacobian(m, n, "conflicting") for _ in range(5)])
    losses_seq = rng.uniform(0.2, 3.0, (5, m))
    tag = f"seq_{m}x{n}"
    arrays[f"J/{tag}"], arrays[f"losses/{tag}"] = Js, losses_seq
    configs = [
        (
            "MoCo",
            {},
            {
                "MoCo_beta": 0.5,
                "MoCo_beta_sigma": 0.5,
                "MoCo_gamma": 0.1,
                "MoCo_gamma_sigma": 0.5,
                "MoCo_rho": 0.0,
            },
        ),
        (
            "MoCo",
            {"beta": 0.3, "beta_sigma": 0.2, "gamma": 2.0, "gamma_sigma": 0.7, "rho": 0.5},
            {
                "MoCo_beta": 0.3,
                "MoCo_beta_sigma": 0.2,
                "MoCo_gamma": 2.0,
                "MoCo_gamma_sigma": 0.7,
                "MoCo_rho": 0.5,
            },
        ),
        ("DB_MTL", {}, {"DB_beta": 0.9, "DB_beta_sigma": 0.0}),
        ("DB_MTL", {"beta": 0.6, "beta_sigma": 0.5}, {"DB_beta": 0.6, "DB_beta_sigma": 0.5}),
    ]
    for i, (cls, ours, theirs) in enumerate(configs):
        updates, weights = run_sequence(cls, Js, losses_seq, **theirs)
        key = f"{cls}/{tag}/{i}"
        arrays[f"updates/{key}"], arrays[f"weights/{key}"] = updates, weights
        sequences.append({"key": key, "method": cls, "input": tag, "params": ours})

# GradNorm: five steps, its loss scales trained by Adam (as the trainer's optimizer would).
for m, n in ((3, 6), (4, 5)):
    tag = f"seq_{m}x{n}"
    Js, losses_seq = arrays[f"J/{tag}"], arrays[f"losses/{tag}"]
    L0 = rng.uniform(1.0, 4.0, m)
    arrays[f"initial_losses/{tag}"] = L0
    for i, (alpha, lr) in enumerate(((1.5, 0.05), (0.5, 0.3))):
        updates, weights = run_sequence(
            "GradNorm", Js, losses_seq, own_lr=lr, initial_losses=L0, alpha=alpha
        )
        key = f"GradNorm/{tag}/{i}"
        arrays[f"updates/{key}"], arrays[f"weights/{key}"] = updates, weights
        sequences.append(
            {"key": key, "method": "GradNorm", "input": tag, "params": {"alpha": alpha, "lr": lr}}
        )

np.savez_compressed(HERE / "libmtl.npz", **arrays)
(HERE / "libmtl.json").write_text(
    json.dumps({"libmtl_commit": COMMIT, "cases": cases, "sequences": sequences}, indent=1) + "\n"
)
print(len(cases), "cases")

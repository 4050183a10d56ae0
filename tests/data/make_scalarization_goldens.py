"""Writes tests/data/scalarization.npz and scalarization.json: TorchJD 0.18.0's scalarizers on
fixed losses (float64), their values and their gradients with respect to the losses.

Run by hand, where torchjd 0.18.0 is installed (the tests only read the files):

    python tests/data/make_scalarization_goldens.py
"""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torchjd import scalarization as sc

TORCHJD = version("torchjd")
assert TORCHJD == "0.18.0", TORCHJD
HERE = Path(__file__).parent
rng = np.random.default_rng(20261127)

INPUTS = {
    "pos4": rng.uniform(0.1, 3.0, 4),
    "pos2x3": rng.uniform(0.1, 3.0, (2, 3)),
    "mixed5": rng.standard_normal(5) * np.array([1e-3, 1.0, 10.0, 0.5, 2.0]),
    "one": np.array([1.7]),
}


def configs(shape):
    w = rng.dirichlet(np.ones(int(np.prod(shape)))).reshape(shape)
    z = rng.uniform(-0.5, 0.1, shape)
    return [
        ("Mean", {}, sc.Mean()),
        ("Sum", {}, sc.Sum()),
        ("Constant", {"weights": w}, sc.Constant(torch.tensor(w))),
        ("STCH", {"mu": 0.1}, sc.STCH(0.1)),
        (
            "STCH",
            {"mu": 1e-3, "weights": w, "reference": z},
            sc.STCH(1e-3, torch.tensor(w), torch.tensor(z)),
        ),
        ("COSMOS", {"lambda_": 2.0, "weights": w}, sc.COSMOS(2.0, torch.tensor(w))),
        ("COSMOS", {"lambda_": 0.0, "weights": w}, sc.COSMOS(0.0, torch.tensor(w))),
        ("PBI", {"theta": 5.0, "weights": w}, sc.PBI(5.0, torch.tensor(w))),
        (
            "PBI",
            {"theta": 0.5, "weights": w, "reference": z},
            sc.PBI(0.5, torch.tensor(w), torch.tensor(z)),
        ),
    ]


arrays, cases = {}, []
for name, x in INPUTS.items():
    arrays[f"in/{name}"] = x
    todo = configs(x.shape)
    if x.min() > 0:
        todo.append(("GeometricMean", {}, sc.GeometricMean()))
    for i, (cls, params, scalarizer) in enumerate(todo):
        t = torch.tensor(x, requires_grad=True)
        value = scalarizer(t)
        (grad,) = torch.autograd.grad(value, t)
        key = f"{name}/{cls}/{i}"
        stored = {}
        for p, v in params.items():
            if isinstance(v, np.ndarray):
                arrays[f"param/{key}/{p}"] = v
                stored[p] = f"param/{key}/{p}"
            else:
                stored[p] = v
        arrays[f"value/{key}"] = np.asarray(value.detach().numpy())
        arrays[f"grad/{key}"] = grad.numpy()
        cases.append({"key": key, "class": cls, "input": f"in/{name}", "params": stored})

# Trainable scalarizers: values and gradients (losses and parameters) at given parameters.
learned = []
for cls in ("UW", "IMTLL"):
    for name in ("pos4", "pos2x3"):
        x = INPUTS[name]
        theta = rng.uniform(-1.0, 1.0, x.shape)
        scalarizer = getattr(sc, cls)(x.shape).double()  # float64 parameters
        param = next(iter(scalarizer.parameters()))
        with torch.no_grad():
            param.copy_(torch.tensor(theta))
        t = torch.tensor(x, requires_grad=True)
        value = scalarizer(t)
        g_values, g_params = torch.autograd.grad(value, [t, param])
        key = f"learned/{cls}/{name}"
        arrays[f"{key}/params"] = theta
        arrays[f"{key}/value"] = np.asarray(value.detach().numpy())
        arrays[f"{key}/grad_values"] = g_values.numpy()
        arrays[f"{key}/grad_params"] = g_params.numpy()
        learned.append({"key": key, "class": cls, "input": f"in/{name}"})

# DWA: epochs of batches, the value and gradient of every call (step() after each epoch).
sequences = []
for temperature in (2.0, 0.5):
    dwa = sc.DWA(temperature)
    key = f"dwa/T={temperature}"
    batches = rng.uniform(0.2, 3.0, (4, 3, 3))  # 4 epochs, 3 batches, 3 losses
    arrays[f"{key}/losses"] = batches
    values, grads = [], []
    for epoch in batches:
        for losses in epoch:
            t = torch.tensor(losses, requires_grad=True)
            value = dwa(t)
            (grad,) = torch.autograd.grad(value, t)
            values.append(value.item())
            grads.append(grad.numpy())
        dwa.step()
    arrays[f"{key}/values"] = np.asarray(values)
    arrays[f"{key}/grads"] = np.stack(grads)
    sequences.append({"key": key, "class": "DWA", "temperature": temperature})

# FAMO: calls and updates with the losses after a (simulated) step; the value, the gradient and
# the weights after every update (float64 logits and Adam).
for lr, wd, with_min in ((0.025, 1e-3, False), (0.3, 0.05, True)):
    shape = (3,) if not with_min else (2, 2)
    b = rng.uniform(0.0, 0.1, shape) if with_min else None
    famo = sc.FAMO(shape, None if b is None else torch.tensor(b), lr=lr, weight_decay=wd).double()
    key = f"famo/lr={lr}/min={with_min}"
    steps = rng.uniform(0.2, 3.0, (6, 2, *shape))  # 6 steps: losses before and after
    arrays[f"{key}/losses"] = steps
    if b is not None:
        arrays[f"{key}/min_losses"] = b
    values, grads, weights = [], [], []
    for before, after in steps:
        t = torch.tensor(before, requires_grad=True)
        value = famo(t)
        (grad,) = torch.autograd.grad(value, t)
        famo.update(torch.tensor(after))
        values.append(value.item())
        grads.append(grad.numpy())
        weights.append(torch.softmax(famo._w.detach().flatten(), 0).reshape(shape).numpy())
    arrays[f"{key}/values"] = np.asarray(values)
    arrays[f"{key}/grads"] = np.stack(grads)
    arrays[f"{key}/weights"] = np.stack(weights)
    sequences.append(
        {"key": key, "class": "FAMO", "lr": lr, "weight_decay": wd, "min_losses": with_min}
    )

np.savez_compressed(HERE / "scalarization.npz", **arrays)
(HERE / "scalarization.json").write_text(
    json.dumps(
        {"torchjd": TORCHJD, "cases": cases, "learned": learned, "sequences": sequences},
        indent=1,
    )
    + "\n"
)
print(len(cases), "cases")

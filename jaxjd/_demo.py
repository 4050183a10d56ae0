"""The main job: multi-task learning on scikit-learn's bundled digits, mean of losses vs UPGrad.

Three tasks share an MLP trunk, each with its own head: which digit (10-way cross-entropy), is it
even (logistic), is it >= 5 (logistic). Each run trains from the same initialisation with Adam;
one sums the gradients of the mean loss, the other aggregates the Jacobian with UPGrad. The table
at the end gives per-task test accuracy and how much the task gradients conflicted.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxjd as jd

TASKS = ("digit", "even", "ge5")


def load_digits(seed: int = 0):
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError as e:  # pragma: no cover - the examples extra installs it
        raise SystemExit('The demo needs scikit-learn: pip install "jaxjd[examples]"') from e
    data: Any = sk_load()
    x = data.data.astype(np.float32) / 16.0
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    cut = int(0.75 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def init_params(key, sizes=(64, 64, 64)):
    keys = jax.random.split(key, len(sizes) + 3)

    def dense(k, n_in, n_out):
        return {
            "w": jax.random.normal(k, (n_in, n_out)) * jnp.sqrt(2.0 / n_in),
            "b": jnp.zeros(n_out),
        }

    trunk = [dense(keys[i], a, b) for i, (a, b) in enumerate(itertools.pairwise(sizes))]
    heads = {
        "digit": dense(keys[-3], sizes[-1], 10),
        "even": dense(keys[-2], sizes[-1], 1),
        "ge5": dense(keys[-1], sizes[-1], 1),
    }
    return {"trunk": trunk, "heads": heads}


def forward(params, x):
    h = x
    for layer in params["trunk"]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return {name: h @ head["w"] + head["b"] for name, head in params["heads"].items()}


def task_targets(y):
    return {
        "digit": y,
        "even": (y % 2 == 0).astype(jnp.float32),
        "ge5": (y >= 5).astype(jnp.float32),
    }


def losses_fn(params, x, y):
    out = forward(params, x)
    t = task_targets(y)
    digit = optax.softmax_cross_entropy_with_integer_labels(out["digit"], t["digit"]).mean()
    even = optax.sigmoid_binary_cross_entropy(out["even"][:, 0], t["even"]).mean()
    ge5 = optax.sigmoid_binary_cross_entropy(out["ge5"][:, 0], t["ge5"]).mean()
    return jnp.stack([digit, even, ge5])


def accuracies(params, x, y):
    out = forward(params, x)
    t = task_targets(y)
    return np.array(
        [
            float(jnp.mean(jnp.argmax(out["digit"], -1) == t["digit"])),
            float(jnp.mean((out["even"][:, 0] > 0) == (t["even"] > 0.5))),
            float(jnp.mean((out["ge5"][:, 0] > 0) == (t["ge5"] > 0.5))),
        ]
    )


def make_step(aggregator, optimizer):
    @jax.jit
    def step(params, opt_state, x, y):
        losses, J = jd.value_and_jacobian(losses_fn)(params, x, y)
        G = jd.gramian(J)
        weights = aggregator.weights(J)
        update = jd.combine(weights, J)
        stats = jd.monitoring.conflict_statistics(G, weights)
        updates, opt_state = optimizer.update(update, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, losses, stats

    return step


def train(name, aggregator, data, *, steps, batch, seed, progress):
    (xtr, ytr), _ = data
    params = init_params(jax.random.key(seed))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)
    step = make_step(aggregator, optimizer)
    rng = np.random.default_rng(seed)
    history = {"conflict": [], "min_cos": [], "nc": []}
    bar = progress(range(steps), desc=f"{name:>6}")
    for i in bar:
        idx = rng.choice(len(ytr), batch, replace=False)
        params, opt_state, losses, stats = step(params, opt_state, xtr[idx], ytr[idx])
        history["conflict"].append(float(stats.conflict_fraction))
        history["min_cos"].append(float(stats.min_cosine))
        history["nc"].append(bool(stats.non_conflicting))
        if hasattr(bar, "set_postfix") and i % 50 == 0:
            bar.set_postfix(loss=f"{float(losses.sum()):.3f}")
    return params, history


def _progress():
    try:
        from tqdm import tqdm

        return lambda it, desc: tqdm(it, desc=desc, ncols=88, mininterval=1.0)
    except ImportError:  # pragma: no cover

        def plain(it, desc):
            print(f"{desc}: training ...", flush=True)
            return it

        return plain


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jaxjd", description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_digits(args.seed)
    (xtr, _), (xte, yte) = data
    print(f"digits: {len(xtr)} train / {len(xte)} test images, tasks: {', '.join(TASKS)}")
    progress = _progress()
    methods = {"mean": jd.mean(), "upgrad": jd.upgrad()}
    results = {}
    start = time.perf_counter()
    for name, agg in methods.items():
        params, hist = train(
            name, agg, data, steps=args.steps, batch=args.batch, seed=args.seed, progress=progress
        )
        results[name] = (accuracies(params, jnp.asarray(xte), jnp.asarray(yte)), hist)
    elapsed = time.perf_counter() - start

    print()
    print(
        "| method | "
        + " | ".join(f"test acc. {t}" for t in TASKS)
        + " | conflicting pairs | mean min cos | steps non-conflicting |"
    )
    print("|---|" + "---|" * (len(TASKS) + 3))
    for name, (acc, hist) in results.items():
        cells = " | ".join(f"{a:.3f}" for a in acc)
        print(
            f"| {name} | {cells} | {np.mean(hist['conflict']):.2f} | "
            f"{np.mean(hist['min_cos']):+.3f} | {np.mean(hist['nc']):.0%} |"
        )
    print(
        f"\n{args.steps} steps per method in {elapsed:.1f} s (jax {jax.__version__}, "
        f"{jax.default_backend()}). 'steps non-conflicting': the update did not increase any "
        "task loss to first order (J d >= 0)."
    )
    return results

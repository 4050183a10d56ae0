"""The main job: multi-task learning on scikit-learn's bundled digits, mean of losses vs UPGrad.

Three tasks share an MLP trunk, each with its own head: which digit (10-way cross-entropy), is it
even (logistic), and the digit's value as a number (regression, squared error: a loss on another
scale, whose gradient often points against the other two). Each run trains from the same
initialisation with Adam; one follows the gradient of the mean loss, the other aggregates the
Jacobian with UPGrad (exact projection, ``reg_eps=0``). The table gives per-task test scores
and, per method, the fraction of steps whose update increased some task's loss to first order
(``J d`` has a negative entry); a plot of the per-task training losses is saved.
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

TASKS = ("digit", "even", "value")


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
        "value": dense(keys[-1], sizes[-1], 1),
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
        "value": y.astype(jnp.float32),
    }


def losses_fn(params, x, y):
    out = forward(params, x)
    t = task_targets(y)
    digit = optax.softmax_cross_entropy_with_integer_labels(out["digit"], t["digit"]).mean()
    even = optax.sigmoid_binary_cross_entropy(out["even"][:, 0], t["even"]).mean()
    value = jnp.mean((out["value"][:, 0] - t["value"]) ** 2)
    return jnp.stack([digit, even, value])


def accuracies(params, x, y):
    out = forward(params, x)
    t = task_targets(y)
    return np.array(
        [
            float(jnp.mean(jnp.argmax(out["digit"], -1) == t["digit"])),
            float(jnp.mean((out["even"][:, 0] > 0) == (t["even"] > 0.5))),
            float(jnp.sqrt(jnp.mean((out["value"][:, 0] - t["value"]) ** 2))),
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
    rng = np.random.default_rng(seed)
    batches = [rng.choice(len(ytr), batch, replace=False) for _ in range(steps)]
    # Compile first, so that the progress bar's rate and ETA are the training's.
    print(f"{name:>6}: compiling ...", flush=True)
    step = make_step(aggregator, optimizer)
    step = step.lower(params, opt_state, xtr[batches[0]], ytr[batches[0]]).compile()
    history = {"conflict": [], "min_cos": [], "nc": [], "losses": []}
    bar = progress(range(steps), desc=f"{name:>6}")
    for i in bar:
        idx = batches[i]
        params, opt_state, losses, stats = step(params, opt_state, xtr[idx], ytr[idx])
        history["conflict"].append(float(stats.conflict_fraction))
        history["min_cos"].append(float(stats.min_cosine))
        history["nc"].append(bool(stats.non_conflicting))
        history["losses"].append(np.asarray(losses))
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
    parser.add_argument("--plot", default="jaxjd_demo_losses.png", help="'' for no plot")
    args = parser.parse_args(argv)

    data = load_digits(args.seed)
    (xtr, _), (xte, yte) = data
    print(f"digits: {len(xtr)} train / {len(xte)} test images, tasks: {', '.join(TASKS)}")
    progress = _progress()
    methods = {"mean": jd.mean(), "upgrad": jd.upgrad(reg_eps=0.0)}
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
        "| method | test acc. digit | test acc. even | test RMSE value | conflicting pairs | "
        "mean min cos | steps raising a task loss |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (acc, hist) in results.items():
        print(
            f"| {name} | {acc[0]:.3f} | {acc[1]:.3f} | {acc[2]:.3f} | "
            f"{np.mean(hist['conflict']):.2f} | {np.mean(hist['min_cos']):+.3f} | "
            f"{1 - np.mean(hist['nc']):.1%} |"
        )
    print(
        f"\n{args.steps} steps per method in {elapsed:.1f} s with compilation (jax "
        f"{jax.__version__}, {jax.default_backend()}). 'steps raising a task loss': the update "
        "increased some task's loss to first order (J d had a negative entry); the mean's does "
        "when the value task's gradient outweighs and opposes another, UPGrad's never does."
    )
    if args.plot:
        path = _plot(results, args.plot)
        if path:
            print(f"per-task training losses: {path}")
    return results


def _plot(results, path):
    """Saves the per-task training loss curves of every method; returns the path (``None``
    without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the examples extra installs it
        return None
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.2))
    for name, (_, hist) in results.items():
        losses = np.stack(hist["losses"])
        for k, ax in enumerate(axes):
            ax.plot(losses[:, k], label=name, lw=1)
    for k, ax in enumerate(axes):
        ax.set_title(f"task {TASKS[k]}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel("training loss (batch)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

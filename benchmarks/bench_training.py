"""Training steps: multi-task (trunk + heads) and instance-wise risk minimisation (one loss per
sample), jaxjd vs a plain step vs TorchJD (when installed), one CPU thread, medians.

* MTL: trunk MLP, m task heads, losses (m,). Plain step = grad of the summed losses + Adam.
  jaxjd = ``mtl_value_and_grad(trunk, heads, upgrad(), method=...)`` + Adam ("layerwise", the
  default, and "jacobian"). The (1 + 2m)/3 plain steps of the floor count one forward and m trunk
  backward passes; the layerwise engine skips the per-task weight gradients of wide layers, so
  its own floor is one forward plus m activation-cotangent passes. TorchJD = ``mtl_backward`` +
  ``jac_to_grad(..., UPGrad())`` + Adam; its plain step (sum of the losses) for reference.
* IWRM: MLP 784-512-512-10 (B = 32, 64) and a small CNN (in plain JAX, and from equinox's
  and Flax NNX's layers: eqx_cnn, nnx_cnn; TorchJD runs the same CNN); per-sample
  cross-entropy losses (B,).
  Plain step = grad of the mean + SGD. jaxjd = ``value_and_weighted_grad(..., upgrad_weighting(),
  method=...)`` + SGD for the ghost engine ("per_sample") and the materialised Jacobian.
  TorchJD = ``autogram.Engine`` Gramian + ``UPGradWeighting`` + ``losses.backward(w)``.

    python benchmarks/bench_training.py [--quick] [--out benchmarks/results/training.md]
"""

from __future__ import annotations

import argparse
import warnings

import _common  # noqa: F401  (one thread: must come before jax and torch)
import jax
import jax.numpy as jnp
import optax
from _common import emit, median_time, median_times, write_table

import jaxjd as jd


def dense_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def time_steps(steps, args, repeats=15):
    """Round-robin medians of jitted steps on the same arguments."""
    return median_times(
        {
            name: lambda step=step: jax.block_until_ready(step(*args))
            for name, step in steps.items()
        },
        repeats=repeats,
    )


def mlp(layers, x, last_relu=True):
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1 or last_relu:
            x = jax.nn.relu(x)
    return x


# ----------------------------------------------------------------------------------------- MTL


def mtl_case(width_in, width, tasks, batch):
    key = jax.random.key(0)
    trunk_params = dense_init(key, [width_in, width, width])
    head_params = {
        "w": jax.random.normal(key, (tasks, width)) / jnp.sqrt(width),
        "b": jnp.zeros(tasks),
    }
    x = jax.random.normal(jax.random.key(1), (batch, width_in))
    y = jax.random.normal(jax.random.key(2), (batch, tasks))

    def trunk(p, x, y):
        return mlp(p, x)

    def heads(h, f, x, y):
        return jnp.mean((f @ h["w"].T + h["b"] - y) ** 2, axis=0)  # (tasks,)

    opt = optax.adam(1e-3)
    params = (trunk_params, head_params)
    state = opt.init(params)

    @jax.jit
    def plain(params, state, x, y):
        g = jax.grad(lambda p: jnp.sum(heads(p[1], trunk(p[0], x, y), x, y)))(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    def jd_step_for(method):
        jd_grad = jd.mtl_value_and_grad(trunk, heads, jd.upgrad(), method=method)

        @jax.jit
        def jd_step(params, state, x, y):
            _, grads, _ = jd_grad(params[0], params[1], x, y)
            u, state = opt.update(grads, state, params)
            return optax.apply_updates(params, u), state

        return jd_step

    steps = {"plain": plain, **{m: jd_step_for(m) for m in ("layerwise", "jacobian")}}
    times = time_steps(steps, (params, state, x, y))
    times["torchjd"], times["torch_plain"] = torch_mtl(width_in, width, tasks, batch)
    return times


def torch_mtl(width_in, width, tasks, batch):
    try:
        import torch
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return float("nan"), float("nan")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(
        torch.nn.Linear(width_in, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
    )
    heads = torch.nn.ModuleList([torch.nn.Linear(width, 1) for _ in range(tasks)])
    opt = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    x, y = torch.randn(batch, width_in), torch.randn(batch, tasks)
    agg = UPGrad()

    def step():
        opt.zero_grad()
        f = trunk(x)
        losses = [((h(f)[:, 0] - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]
        mtl_backward(losses, features=f)
        jac_to_grad(list(trunk.parameters()), agg)
        opt.step()

    def plain_step():
        opt.zero_grad()
        f = trunk(x)
        sum(((h(f)[:, 0] - y[:, i]) ** 2).mean() for i, h in enumerate(heads)).backward()
        opt.step()

    times = median_times({"jd": step, "plain": plain_step})
    return times["jd"], times["plain"]


# ---------------------------------------------------------------------------------------- IWRM


def iwrm_case(model, batch):
    key = jax.random.key(0)
    if model == "mlp":
        params = dense_init(key, [784, 512, 512, 10])
        x = jax.random.normal(jax.random.key(1), (batch, 784))

        def logits(p, x):
            return mlp(p, x, last_relu=False)

    elif model in ("eqx_cnn", "nnx_cnn"):  # the same CNN from equinox's or Flax NNX's layers
        params, logits = _library_cnn(model)
        x = jax.random.normal(jax.random.key(1), (batch, 1, 28, 28))
    else:
        k = jax.random.split(key, 3)
        params = {
            "c1": jax.random.normal(k[0], (8, 1, 3, 3)) * 0.3,
            "c2": jax.random.normal(k[1], (16, 8, 3, 3)) * 0.1,
            "out": dense_init(k[2], [16 * 24 * 24, 10])[0],
        }
        x = jax.random.normal(jax.random.key(1), (batch, 1, 28, 28))

        def logits(p, x):
            h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["c1"], (1, 1), "VALID"))
            h = jax.nn.relu(jax.lax.conv_general_dilated(h, p["c2"], (1, 1), "VALID"))
            h = h.reshape(x.shape[0], -1)
            return h @ p["out"]["w"] + p["out"]["b"]

    labels = jnp.arange(batch) % 10

    def losses(p, x, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), labels)

    opt = optax.sgd(1e-2)
    state = opt.init(params)

    @jax.jit
    def plain(params, state, x, labels):
        g = jax.grad(lambda p: jnp.mean(losses(p, x, labels)))(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    def jd_step_for(method):
        f = jd.value_and_weighted_grad(losses, jd.upgrad_weighting(), method=method)

        @jax.jit
        def step(params, state, x, labels):
            _, _, g = f(params, x, labels)
            u, state = opt.update(g, state, params)
            return optax.apply_updates(params, u), state

        return step

    steps = {"plain": plain, **{m: jd_step_for(m) for m in ("per_sample", "jacobian")}}
    times = time_steps(steps, (params, state, x, labels), repeats=7)
    times["torchjd"] = torch_iwrm(model, batch)
    return times


def _library_cnn(model):
    """``(params, logits)`` of the CNN below from equinox's (under vmap) or Flax NNX's layers:
    what the per-sample engine must read from those libraries' jaxprs (no fallback)."""
    if model == "eqx_cnn":
        import equinox as eqx

        k = jax.random.split(jax.random.key(0), 3)
        net = [
            eqx.nn.Conv2d(1, 8, 3, key=k[0]),
            eqx.nn.Conv2d(8, 16, 3, key=k[1]),
            eqx.nn.Linear(16 * 24 * 24, 10, key=k[2]),
        ]
        params, static = eqx.partition(net, eqx.is_inexact_array)

        def logits(p, x):
            c1, c2, out = eqx.combine(p, static)

            def one(image):
                h = jax.nn.relu(c2(jax.nn.relu(c1(image))))
                return out(h.reshape(-1))

            return jax.vmap(one)(x)

        return params, logits
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(1, 8, (3, 3), padding="VALID", rngs=rngs)
            self.c2 = nnx.Conv(8, 16, (3, 3), padding="VALID", rngs=rngs)
            self.out = nnx.Linear(16 * 24 * 24, 10, rngs=rngs)

        def __call__(self, x):  # NCHW in, as the others
            h = jnp.moveaxis(x, 1, -1)
            h = jax.nn.relu(self.c2(jax.nn.relu(self.c1(h))))
            return self.out(h.reshape(x.shape[0], -1))

    graphdef, params = nnx.split(CNN(nnx.Rngs(0)), nnx.Param)
    return params, lambda p, x: nnx.merge(graphdef, p)(x)


def torch_iwrm(model, batch):
    try:
        import torch
        from torchjd.aggregation import UPGradWeighting
        from torchjd.autogram import Engine
    except ImportError:
        return float("nan")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if model == "mlp":
        net = torch.nn.Sequential(
            torch.nn.Linear(784, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        )
        x = torch.randn(batch, 784)
    else:
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(16 * 24 * 24, 10),
        )
        x = torch.randn(batch, 1, 28, 28)
    labels = torch.arange(batch) % 10
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    engine = Engine(net, batch_dim=0)
    weighting = UPGradWeighting()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")

    def step():
        opt.zero_grad()
        losses = loss_fn(net(x), labels)
        gramian = engine.compute_gramian(losses)
        w = weighting(gramian)
        losses.backward(w)
        opt.step()

    return median_time(step, 5)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--iwrm", default=None, help="only these IWRM models (B = 32), e.g. cnn")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    lines = [
        f"jax {jax.__version__}, float32, one CPU thread, medians of jitted steps.",
        "",
        "MTL (UPGrad on the trunk's m-row Jacobian). floor = (1 + 2m)/3 plain steps. "
        "layerwise = the default (Gramian and J^T w from per-layer task cotangents); "
        "jacobian = trunk Jacobian materialised.",
        "",
        "| trunk | tasks | B | plain ms | layerwise ms | / plain | floor | / floor "
        "| jacobian ms | TorchJD ms | TorchJD plain ms | TorchJD / layerwise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    mtl_sizes = [(32, 128, 3, 64)] if args.quick else [(32, 128, 3, 64), (64, 512, 8, 128)]
    mtl_sizes = [] if args.iwrm else mtl_sizes
    for width_in, width, tasks, batch in mtl_sizes:
        t = mtl_case(width_in, width, tasks, batch)
        floor = (1 + 2 * tasks) / 3
        ratio = t["layerwise"] / t["plain"]
        row = (
            f"| {width_in}-{width}-{width} | {tasks} | {batch} | {t['plain'] * 1e3:.3f} | "
            f"{t['layerwise'] * 1e3:.3f} | {ratio:.2f} | {floor:.2f} | {ratio / floor:.2f} | "
            f"{t['jacobian'] * 1e3:.3f} | {t['torchjd'] * 1e3:.2f} | "
            f"{t['torch_plain'] * 1e3:.2f} | {t['torchjd'] / t['layerwise']:.1f} |"
        )
        emit(lines, row)
    header = [
        "",
        "IWRM (UPGrad weighting of the B x B per-sample Gramian, then the weighted gradient).",
        "",
        "| model | B | plain ms | ghost ms | ghost / plain | jacobian ms | jacobian / plain "
        "| TorchJD autogram ms | TorchJD / ghost |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    lines += header
    iwrm_sizes = [("mlp", 32)] if args.quick else [("mlp", 32), ("mlp", 64), ("cnn", 32)]
    if not args.quick:
        iwrm_sizes += [("eqx_cnn", 32), ("nnx_cnn", 32)]
    if args.iwrm:
        iwrm_sizes = [(m, 32) for m in args.iwrm.split(",")]
    for model, batch in iwrm_sizes:
        t = iwrm_case(model, batch)
        row = (
            f"| {model} | {batch} | {t['plain'] * 1e3:.3f} | {t['per_sample'] * 1e3:.3f} | "
            f"{t['per_sample'] / t['plain']:.2f} | {t['jacobian'] * 1e3:.3f} | "
            f"{t['jacobian'] / t['plain']:.2f} | {t['torchjd'] * 1e3:.2f} | "
            f"{t['torchjd'] / t['per_sample']:.1f} |"
        )
        emit(lines, row)
    write_table(lines, args.out)


if __name__ == "__main__":
    main()

"""Data-parallel Jacobian descent: two training loops to copy, and what crosses devices.

Run ``python examples/data_parallel.py`` (8 simulated CPU devices; ``--real-devices`` uses the
machine's own, e.g. its GPUs; ``--steps N`` sets the training length). Several hosts: call
``jax.distributed.initialize()`` first on every host; ``jax.devices()`` then lists every host's
devices, the mesh below spans them, and each host feeds its own slice of the batch (e.g. with
``jax.make_array_from_process_local_data``). Nothing in jaxjd is per-process.

1. **Instance-wise risk minimisation** (one loss per sample, UPGrad over the global batch) under
   ``jax.jit`` with the batch sharded along ``"data"``: the same code as on one device. Each
   device captures its samples' layer inputs and output cotangents; they are all-gathered, every
   device forms the same B x B Gramian and solves it whole (the QP is never split), and each
   device's share of ``J^T w`` is all-reduced.
2. **Multi-task learning** (T task losses, means over the batch) under ``shard_map`` with
   ``axis_name="data"``: ``mtl_value_and_grad(..., method="layerwise", axis_name="data")``
   aggregates the Jacobian of the global mean losses from the gathered activations and task
   cotangents of the dense layers, never the trunk Jacobian.

Each loop is timed against a plain data-parallel step (the gradient of the mean loss), and the
compiled collectives are counted.
"""

from __future__ import annotations

import os
import re
import sys
import time

if "jax" not in sys.modules and "--real-devices" not in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxjd as jd

SIZES = {"f64": 8, "f32": 4, "bf16": 2, "s64": 8, "s32": 4, "u32": 4, "pred": 1}


def collective_bytes(compiled) -> tuple[int, int]:
    """(number, bytes) of the cross-device collectives in a compiled program."""
    count = total = 0
    for line in compiled.as_text().splitlines():
        op = re.search(
            r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
            r"(-start)?\(",
            line,
        )
        if op:
            count += 1
            for kind, dims in re.findall(r"(f64|f32|bf16|s64|s32|u32|pred)\[([0-9,]*)\]", op[1]):
                total += SIZES[kind] * int(np.prod([int(v) for v in dims.split(",") if v]))
    return count, total


def timed(f, *args, repeats=20) -> float:
    """Median milliseconds of a compiled call."""
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def mlp_init(key, sizes):
    params = []
    for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes)):
        params.append({"W": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)})
    return params


def mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["W"] + layer["b"])
    return x @ params[-1]["W"] + params[-1]["b"]


def main(steps: int = 30) -> None:
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    print(f"{len(devices)} devices ({devices[0].platform})")

    # Data: a regression problem; per device 16 samples.
    key = jax.random.key(0)
    B, d, T = 16 * len(devices), 32, 3
    kx, kw, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (B, d))
    targets = jnp.tanh(x @ jax.random.normal(kw, (d, T)))
    x, targets = jax.device_put((x, targets), batch_sharding)

    # 1. Instance-wise risk minimisation under jit: one loss per sample.
    params = jax.device_put(mlp_init(kp, [d, 64, 64, 1]), replicated)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    def per_sample_losses(p, x, y):
        return (mlp(p, x)[:, 0] - y) ** 2

    step_grad = jd.value_and_weighted_grad(
        per_sample_losses, jd.upgrad_weighting(), method="per_sample"
    )

    @jax.jit
    def iwrm_step(params, opt_state, x, y):
        losses, _weights, grad = step_grad(params, x, y)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jnp.mean(losses)

    @jax.jit
    def plain_step(params, opt_state, x, y):
        loss, grad = jax.value_and_grad(lambda p: jnp.mean(per_sample_losses(p, x, y)))(params)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    y = targets[:, 0]
    for _i in range(steps):
        params, opt_state, loss = iwrm_step(params, opt_state, x, y)
    print(f"IWRM (UPGrad over {B} samples): mean loss after {steps} steps {float(loss):.4f}")
    report("IWRM, jit", iwrm_step, plain_step, params, opt_state, x, y)

    # 2. Multi-task learning under shard_map: T task losses, means over each device's batch.
    trunk_params = jax.device_put(mlp_init(kp, [d, 64, 64])[:2], replicated)
    head_params = jax.device_put(jax.random.normal(kw, (T, 64)) / 8, replicated)
    tx = optax.adam(1e-2)
    states = tx.init((trunk_params, head_params))

    def trunk(p, x, targets):  # every step argument reaches the trunk and the heads
        for layer in p:
            x = jax.nn.relu(x @ layer["W"] + layer["b"])
        return x

    def heads(h, z, x, targets):
        return jnp.mean((z @ h.T - targets) ** 2, axis=0)  # (T,) local means

    mtl = jd.mtl_value_and_grad(trunk, heads, jd.upgrad(), method="layerwise", axis_name="data")

    def local_step(trunk_params, head_params, states, x, targets):
        losses, (trunk_grad, head_grad), _ = mtl(trunk_params, head_params, x, targets)
        updates, states = tx.update((trunk_grad, head_grad), states)
        trunk_params, head_params = optax.apply_updates((trunk_params, head_params), updates)
        return trunk_params, head_params, states, losses

    def plain_local(trunk_params, head_params, states, x, targets):
        def loss(p):
            return jnp.mean(heads(p[1], trunk(p[0], x, targets), x, targets))

        params = (trunk_params, head_params)
        # Replicated params, device-varying batch: JAX sums the gradient over "data".
        value, grad = jax.value_and_grad(loss)(params)
        grad = jax.tree_util.tree_map(lambda g: g / len(devices), grad)
        updates, states = tx.update(grad, states)
        trunk_params, head_params = optax.apply_updates(params, updates)
        return trunk_params, head_params, states, jax.lax.pmean(value, "data")

    specs = dict(
        mesh=mesh,
        in_specs=(P(), P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P(), P()),
    )
    mtl_step = jax.jit(jax.shard_map(local_step, **specs))
    plain_mtl = jax.jit(jax.shard_map(plain_local, **specs))
    for _i in range(steps):
        trunk_params, head_params, states, losses = mtl_step(
            trunk_params, head_params, states, x, targets
        )
    print(f"MTL (UPGrad over {T} tasks): task losses after {steps} steps {np.round(losses, 4)}")
    report("MTL, shard_map", mtl_step, plain_mtl, trunk_params, head_params, states, x, targets)


def report(name, step, plain, *args) -> None:
    n, moved = collective_bytes(step.lower(*args).compile())
    n0, moved0 = collective_bytes(plain.lower(*args).compile())
    t, t0 = timed(step, *args), timed(plain, *args)
    print(
        f"{name}: {n} collectives, {moved / 1e3:.1f} kB (plain data-parallel step: {n0}, "
        f"{moved0 / 1e3:.1f} kB); {t:.2f} ms a step (plain {t0:.2f} ms)"
    )


if __name__ == "__main__":
    main(steps=int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 30)

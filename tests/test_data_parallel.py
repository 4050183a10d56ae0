"""Data-parallel Jacobian descent on 8 simulated CPU devices (in a subprocess: the device count
is fixed when JAX starts): every sharded step equals the single-device step (float64), and the
compiled collectives are what the design says crosses devices."""

import textwrap
from pathlib import Path

import jax.numpy as jnp
import optax
import pytest
from helpers import run_on_cpu_devices

import jaxjd as jd

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import re
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import jaxjd as jd
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8
    B, d, h, T = 64, 10, 32, 3
    rng = np.random.default_rng(0)
    params = {"W1": rng.standard_normal((d, h)) / 3, "b1": rng.standard_normal(h) / 10,
              "W2": rng.standard_normal((h, 1)) / 5, "b2": np.zeros(1)}
    params = jax.tree_util.tree_map(jnp.asarray, params)
    x = jnp.asarray(rng.standard_normal((B, d)))
    y = jnp.asarray(rng.standard_normal(B))
    heads = jnp.asarray(rng.standard_normal((T, h)) / 5)

    def losses(p, x, y):  # one loss per sample (instance-wise risk minimisation)
        z = jnp.tanh(x @ p["W1"] + p["b1"])
        return ((z @ p["W2"] + p["b2"])[:, 0] - y) ** 2

    def trunk(p, x):
        return jnp.tanh(x @ p["W1"] + p["b1"])

    def task_losses(hp, z, x):  # T tasks, each a mean over the (local) batch
        return jnp.mean((z @ hp.T - x[:, :T]) ** 2, axis=0)

    def close(a, b, what):
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            err = float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
            assert err < 1e-10, (what, err)

    SIZE = {"f64": 8, "f32": 4, "s64": 8, "s32": 4, "pred": 1, "u32": 4}

    def collectives(compiled):
        out = []
        for line in compiled.as_text().splitlines():
            op = re.search(r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|"
                           r"reduce-scatter)(-start)?\\(", line)
            if op:
                shapes = re.findall(r"(f64|f32|s64|s32|pred|u32)\\[([0-9,]*)\\]", op.group(1))
                size = sum(SIZE[t] * int(np.prod([int(v) for v in dims.split(",") if v]))
                           for t, dims in shapes)
                out.append((op.group(2), size, op.group(1)))
        return out

    upg = jd.upgrad_weighting()
    ref = {m: jax.jit(jd.value_and_weighted_grad(losses, upg, method=m))(params, x, y)
           for m in ("per_sample", "jacobian", "layerwise", "columns")}
    plain = jax.grad(lambda p, x, y: jnp.mean(losses(p, x, y)))

    for types in ((AxisType.Auto,), (AxisType.Explicit,)):
        mesh = jax.make_mesh((8,), ("data",), axis_types=types)
        batch = NamedSharding(mesh, P("data"))
        xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
        ps = jax.device_put(params, NamedSharding(mesh, P()))
        # 1. jit with the batch sharded: every method equals one device.
        for m, expected in ref.items():
            f = jax.jit(jd.value_and_weighted_grad(losses, upg, method=m))
            close(f(ps, xs, ys), expected, (types, m))
            cols = collectives(f.lower(ps, xs, ys).compile())
            # The solver is never partitioned: no loop predicates or lanes cross devices.
            assert all(k in ("all-reduce", "all-gather") for k, _, _ in cols), cols
            assert not any("pred" in s for _, _, s in cols), cols
        f = jax.jit(jd.value_and_weighted_grad(losses, upg, method="per_sample"))
        cols = collectives(f.lower(ps, xs, ys).compile())
        base = collectives(jax.jit(plain).lower(ps, xs, ys).compile())
        grad_bytes = 8 * sum(v.size for v in jax.tree_util.tree_leaves(params))
        assert [k for k, _, _ in base] == ["all-reduce"] and base[0][1] == grad_bytes, base
        # Factors: the dense layers' inputs and cotangents, the biases' rows, B values each.
        # XLA may gather a B x B partial product of G in place of some factors (Explicit
        # axes: f64[64,1,64,1]): one G's worth is allowed on top.
        factor_bytes = 8 * B * ((d + h) + (h + 1) + (h + 1)) + 8 * B * B
        traffic = sum(s for _, s, _ in cols)
        assert traffic <= 2 * grad_bytes + factor_bytes, (traffic, grad_bytes, factor_bytes)
        print("jit", types[0], "per_sample bytes", traffic, "plain", grad_bytes,
              "factors", factor_bytes, "collectives", len(cols))

        # 2. Multi-task, jit with the batch sharded: the chain and the fused step.
        tx = optax.chain(jd.jd_aggregate(jd.upgrad()), optax.sgd(0.1))
        def chain_step(p, x):
            L, J = jd.value_and_jacobian(lambda q: task_losses(heads, trunk(q, x), x))(p)
            return tx.update(J, tx.init(p), p)[0]
        close(jax.jit(chain_step)(ps, xs), jax.jit(chain_step)(params, x), (types, "chain"))
        # (Every input on the mesh: on Explicit axes JAX cannot transpose z @ heads.T for
        # heads that are not placed, "Contracting dimensions are sharded".)
        hs = jax.device_put(heads, NamedSharding(mesh, P()))
        for m in ("layerwise", "jacobian"):
            g = jd.mtl_value_and_grad(trunk, task_losses, jd.upgrad(), method=m)
            close(jax.jit(g)(ps, hs, xs), jax.jit(g)(params, heads, x), (types, "mtl", m))

        # 3. shard_map with axis_name (checked and unchecked varying axes).
        for check in (True, False):
            def smap(f, out, ins=(P(), P("data"), P("data"))):
                return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=ins, out_specs=out,
                                             check_vma=check))
            for m in ("per_sample", "jacobian"):
                step = jd.value_and_weighted_grad(losses, upg, method=m, axis_name="data")
                f = smap(step, (P("data"), P("data"), P()))
                close(f(ps, xs, ys), ref[m], (types, "shard_map", m, check))
                cols = collectives(f.lower(ps, xs, ys).compile())
                assert all(k in ("all-reduce", "all-gather") for k, _, _ in cols), cols
                if m == "per_sample":
                    traffic = sum(s for _, s, _ in cols)
                    assert traffic <= 2 * grad_bytes + factor_bytes, (traffic, grad_bytes)
            for m in ("layerwise", "jacobian"):
                g = jd.mtl_value_and_grad(trunk, task_losses, jd.upgrad(), method=m,
                                          axis_name="data")
                one = jd.mtl_value_and_grad(trunk, task_losses, jd.upgrad(), method=m)
                f = smap(g, P(), (P(), P(), P("data")))
                close(f(ps, heads, xs), jax.jit(one)(params, heads, x), (types, "mtl", m, check))
            txa = optax.chain(jd.jd_aggregate(jd.upgrad(), axis_name="data"), optax.sgd(0.1))
            def chain_local(p, x, y):
                L, J = jd.value_and_jacobian(lambda q: task_losses(heads, trunk(q, x), x))(p)
                return txa.update(J, txa.init(p), p)[0]
            f = smap(chain_local, P())
            close(f(ps, xs, ys), jax.jit(chain_step)(params, x), (types, "shard_map chain"))

        # 3b. A wide trunk on a small batch: layerwise then gathers X and D (cheaper than the
        # rows' all-reduce), and the result still equals one device.
        wide = {"W1": jnp.asarray(rng.standard_normal((64, 256)) / 8), "b1": jnp.zeros(256)}
        wide_heads = jnp.asarray(rng.standard_normal((T, 256)) / 16)
        x16 = jnp.asarray(rng.standard_normal((16, 64)))
        xw = jax.device_put(x16, batch)
        g = jd.mtl_value_and_grad(trunk, task_losses, jd.upgrad(), axis_name="data")
        f = jax.jit(jax.shard_map(g, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P()))
        one = jax.jit(jd.mtl_value_and_grad(trunk, task_losses, jd.upgrad()))
        close(f(wide, wide_heads, xw), one(wide, wide_heads, x16), (types, "wide layerwise"))
        kinds = [k for k, _, s in collectives(f.lower(wide, wide_heads, xw).compile())]
        assert "all-gather" in kinds, kinds

        # 4. A weighting on each device's own Gramian under shard_map (its loops are legal).
        Gs = jax.device_put(jnp.asarray(rng.standard_normal((8 * 6, 9))), batch)
        w = jax.jit(jax.shard_map(lambda J: upg(J @ J.T), mesh=mesh, in_specs=P("data"),
                                  out_specs=P("data")))(Gs)
        Jn = np.asarray(Gs)
        expected = np.concatenate([np.asarray(upg(jnp.asarray(Jn[6 * i:6 * i + 6] @
                                                              Jn[6 * i:6 * i + 6].T)))
                                   for i in range(8)])
        close(w, expected, (types, "local weighting"))
        # ... and aggregators that weigh from each device's own J's triangular factor
        for agg in (jd.imtl_g(), jd.pcd()):
            step = lambda J, agg=agg: agg.update(J, agg.init(J))[0]
            local = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=P("data"),
                                          out_specs=P("data")))(Gs)
            expected = np.concatenate([np.asarray(step(jnp.asarray(Jn[6 * i:6 * i + 6])))
                                       for i in range(8)])
            close(local, expected, (types, "local", type(agg).__name__))

    # 5. Data x model (2-D mesh): batch on "data", W1's columns on "model"; multi-task step.
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    p2 = {k: jax.device_put(v, NamedSharding(mesh2, P(None, "model") if k == "W1" else P()))
          for k, v in params.items()}
    x2 = jax.device_put(x, NamedSharding(mesh2, P("data")))
    h2 = jax.device_put(heads, NamedSharding(mesh2, P()))
    for m in ("layerwise", "jacobian"):
        g = jax.jit(jd.mtl_value_and_grad(trunk, task_losses, jd.upgrad(), method=m))
        close(g(p2, h2, x2), g(params, heads, x), ("2-D", m))
    # Parameter-sharded Jacobian, model axis only: only the m x m Gramian crosses.
    J = {"W1": jax.device_put(jnp.asarray(rng.standard_normal((T, d, h))),
                              NamedSharding(mesh2, P(None, None, "model")))}
    f = jax.jit(jd.gramian)
    cols = collectives(f.lower(J).compile())
    assert [(k, s) for k, s, _ in cols] == [("all-reduce", 8 * T * T)], cols
    print("ok")
    """
)


@pytest.mark.slow  # about 2 minutes of compilation on 2 cores
def test_data_parallel_equals_one_device():
    result = run_on_cpu_devices(["-c", SCRIPT])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.slow  # about a minute on 2 cores
def test_data_parallel_example_runs():
    """``examples/data_parallel.py`` trains both loops on 8 simulated devices and reports the
    collectives against a plain data-parallel step."""
    path = Path(__file__).parents[1] / "examples" / "data_parallel.py"
    result = run_on_cpu_devices([str(path), "--steps", "3"])
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "8 devices (cpu)", lines
    for name in ("IWRM, jit", "MTL, shard_map"):
        (line,) = [x for x in lines if x.startswith(name)]
        assert "collectives" in line and "plain data-parallel step: 1," in line, line


@pytest.mark.parametrize("name", ["upgrad", "pcd", "moco", "gradvac", "nash_mtl", "gradnorm"])
def test_tree_map_params_on_jd_aggregate_states(name):
    """``optax.tree_map_params`` (how users shard optimiser state) maps the params-shaped parts
    of a chain that starts with ``jd_aggregate``, for stateless and stateful aggregators."""
    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    tx = optax.chain(jd.jd_aggregate(getattr(jd, name)(), num_objectives=2), optax.adam(1e-3))
    state = tx.init(params)
    shapes = optax.tree_map_params(tx, lambda p: p.shape, state, transform_non_params=lambda _: 0)
    adam = shapes[1][0]
    assert adam.mu == {"w": (3, 4), "b": (4,)} and adam.nu == adam.mu
    assert shapes[0].inner == 0  # the aggregator's state: one non-params field
    assert shapes[1][0].count == 0

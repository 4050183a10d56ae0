"""Parameter-sharded Jacobians on 8 simulated CPU devices (in a subprocess: the device count is
fixed when JAX starts). Only the m x m Gramian may cross devices."""

import textwrap

from helpers import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import jaxjd as jd
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rng = np.random.default_rng(0)
    J = rng.standard_normal((6, 64 * 8)) * rng.choice([-2.0, 1.0], size=(6, 1))
    single = np.asarray(jd.upgrad(jnp.asarray(J)))

    # jit with a column-sharded Jacobian: same answer, output keeps the sharding, and the only
    # collective is an all-reduce of the 6 x 6 Gramian (and, in the branch that runs only when
    # J J^T is out of range, of max |J| and of the Gramian of J scaled by a power of two).
    Js = jax.device_put(jnp.asarray(J), NamedSharding(mesh, P(None, "x")))
    f = jax.jit(jd.upgrad())
    out = f(Js)
    assert out.sharding.spec == P("x"), out.sharding
    np.testing.assert_allclose(np.asarray(out), single, rtol=1e-12, atol=1e-13)
    hlo = f.lower(Js).compile().as_text()
    collectives = [l for l in hlo.splitlines()
                   if any(c + "(" in l for c in ("all-reduce", "all-gather", "all-to-all",
                                                 "collective-permute"))]
    rescale = [l for l in collectives if "_gramian_in_range)/cond/branch_1_fun/" in l]
    main = [l for l in collectives if l not in rescale]
    assert main and all("all-reduce" in l and "f64[6,6]" in l for l in main), collectives
    assert all("all-reduce" in l and ("f64[6,6]" in l or "f64[]" in l) for l in rescale), (
        rescale)

    # shard_map: local Gramians psum-ed through axis_name.
    G = jax.shard_map(lambda Jl: jd.gramian(Jl, axis_name="x"), mesh=mesh,
                      in_specs=P(None, "x"), out_specs=P())(Js)
    np.testing.assert_allclose(np.asarray(G), J @ J.T, rtol=1e-12)
    print("ok")
    """
)


def test_sharded_upgrad_all_reduces_only_the_gramian():
    result = run_on_cpu_devices(["-c", SCRIPT], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")

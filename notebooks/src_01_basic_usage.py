# %% [markdown]
# # 1. Basic usage: aggregators on two conflicting gradients
#
# Two losses, two gradients `g1`, `g2` in the plane. They conflict (`g1 . g2 < 0`) and have very
# different norms, so their mean points against `g1`: a small step along it *increases* loss 1.
# UPGrad projects each gradient onto the dual cone `{x : g1 . x >= 0, g2 . x >= 0}` and averages
# the projections, so its direction lies in that cone and no loss gets worse.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxjd as jd

J = jnp.array([[-1.0, 2.0], [4.0, -1.0]])  # rows: g1, g2
G = jd.gramian(J)
print("g1 . g2 =", float(G[0, 1]))

# %% [markdown]
# Every aggregator, its direction `d`, and the directional derivatives `J d` (both must be >= 0
# for a non-conflicting step). Random methods take an explicit PRNG key.

# %%
key = jax.random.key(0)
methods = {
    "mean": jd.mean(),
    "upgrad": jd.upgrad(),
    "dualproj": jd.dualproj(),
    "mgda": jd.mgda(),
    "imtl_g": jd.imtl_g(),
    "aligned_mtl": jd.aligned_mtl(),
    "cagrad (c=0.5)": jd.cagrad(c=0.5),
    "fairgrad (alpha=1)": jd.fairgrad(alpha=1.0),
    "pcgrad": jd.pcgrad(),
    "config": jd.config(),
}
directions = {}
print(f"{'method':<20} {'d':>22} {'g1.d':>8} {'g2.d':>8}  non-conflicting")
for name, agg in methods.items():
    d = agg(J, key=key)
    directions[name] = np.asarray(d)
    jd_ = np.asarray(J @ d)
    print(
        f"{name:<20} {np.array2string(np.asarray(d), precision=3):>22} "
        f"{jd_[0]:8.3f} {jd_[1]:8.3f}  {bool(np.all(jd_ >= -1e-6))}"
    )

assert (J @ directions["mean"])[0] < 0  # the mean increases loss 1
assert np.all(np.asarray(J @ directions["upgrad"]) >= 0)  # UPGrad does not

# %% [markdown]
# DualProj's `g1 . d` of -0.001 is TorchJD's default regularisation at work (`reg_eps = 1e-4` added
# to the trace-normalised Gramian); `jd.dualproj(reg_eps=0.0)` gives the exact projection.
#
# The picture: the dual cone (shaded), the two gradients, and the mean and UPGrad directions.

# %%
fig, ax = plt.subplots(figsize=(5.5, 5))
t = np.linspace(0, 2 * np.pi, 721)
circle = np.stack([np.cos(t), np.sin(t)], 1)
inside = np.all(circle @ np.asarray(J).T >= 0, axis=1)
angles = t[inside]
ax.fill(
    np.r_[0, 5 * np.cos(angles), 0],
    np.r_[0, 5 * np.sin(angles), 0],
    color="tab:green",
    alpha=0.15,
    label="dual cone {x : Jx >= 0}",
)
style = dict(angles="xy", scale_units="xy", scale=1, width=0.012)
for vec, name, color in [
    (J[0], "g1", "black"),
    (J[1], "g2", "gray"),
    (directions["mean"], "mean", "tab:red"),
    (directions["upgrad"], "UPGrad", "tab:blue"),
]:
    ax.quiver(0, 0, *np.asarray(vec), color=color, label=name, **style)
ax.set_xlim(-2.5, 4.5)
ax.set_ylim(-2.0, 3.0)
ax.set_aspect("equal")
ax.axhline(0, lw=0.5, color="k")
ax.axvline(0, lw=0.5, color="k")
ax.legend(loc="lower left")
ax.set_title("UPGrad stays in the dual cone; the mean leaves it")
plt.show()

# %% [markdown]
# ## The same functions under `jit`, `vmap`, on pytrees, and from the Gramian alone
#
# * `jd.upgrad(J)` is a pure function: `jax.jit` it, or `vmap` it over a batch of Jacobians.
# * A Jacobian can be any pytree whose leaves share a leading axis `m`.
# * `jd.upgrad_weighting()(G)` gives the weights from the Gramian only; `.solve(G)` also returns
#   the exact solver's certificate (converged flag, iterations, KKT residual).

# %%
batch = jax.random.normal(jax.random.key(1), (1000, 4, 20))  # 1000 Jacobians, m = 4
updates = jax.jit(jax.vmap(jd.upgrad()))(batch)
dd = jnp.einsum("bmn,bn->bm", batch, updates)
print("batch of updates:", updates.shape, "| min directional derivative:", float(dd.min()))
assert float(dd.min()) >= -1e-4

tree = {"w": J[:, :1], "b": J[:, 1]}  # same numbers, split into two leaves
print("pytree:", jd.upgrad(tree), "| matrix:", jd.upgrad(J))

weights, info = jd.upgrad_weighting().solve(G)
print(
    "weights:",
    weights,
    "| converged:",
    bool(info.converged.all()),
    "| KKT residual:",
    float(info.kkt_residual.max()),
)

# %% [markdown]
# Conflict statistics, cheap enough to log at every step of a jitted training loop:

# %%
stats = jd.monitoring.conflict_statistics(G, weights)
print("cosine(g1, g2) =", round(float(stats.cosine[0, 1]), 3))
print("fraction of conflicting pairs =", float(stats.conflict_fraction))
print("norm ratio =", round(float(stats.norm_ratio), 3))
print("directional derivatives of the UPGrad step:", stats.directional_derivatives)

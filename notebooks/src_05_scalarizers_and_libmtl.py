# %% [markdown]
# # 5. Scalarizers and LibMTL's methods, side by side
#
# The multi-task digits of notebook 2 (an MLP trunk, three heads: *which digit*, *is it even*,
# *is it >= 5*), trained from the same initialisation on the same mini-batches with two kinds
# of method:
#
# - **scalarizers** (`jaxjd.scalarization`): the losses become one scalar, `jax.grad` of it is the
#   update; no per-task gradient is formed. Mean, uncertainty weighting (UW: trainable
#   log-variances in the params pytree), smooth Tchebycheff (STCH) and FAMO (task logits learned
#   from how much each loss fell across the step, in explicit state);
# - **aggregators** of the Jacobian, in an optax chain: UPGrad, and LibMTL's GradNorm and DB-MTL,
#   which also read the loss values: `tx.update(J, state, params, losses=losses)`.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import jaxjd as jd
from jaxjd import _demo as demo  # the main job's data, model and losses
from jaxjd import scalarization as sc

(xtr, ytr), (xte, yte) = demo.load_digits(seed=0)
xte, yte = jnp.asarray(xte), jnp.asarray(yte)
STEPS, BATCH, EVAL_EVERY, LR = 200, 128, 20, 3e-3
batches = np.random.default_rng(0).choice(len(ytr), (STEPS, BATCH))  # the same for every run
print(len(ytr), "training images,", len(yte), "test images; tasks:", demo.TASKS)


def evaluate(params):
    return demo.accuracies(params, xte, yte), np.asarray(demo.losses_fn(params, xte, yte))


# %% [markdown]
# A scalarizer's training step: `loss, state = scalarizer.update(losses, state, params=...)`
# inside the differentiated function (the new state comes back as auxiliary output). UW's
# log-variances sit next to the model's weights and are trained by the same optimizer; FAMO's
# logits take their own Adam step in `after_step`, from the losses of the same batch measured
# after the model's step.


# %%
def train_scalarizer(scalarizer, seed=0):
    params = {"model": demo.init_params(jax.random.key(seed))}
    losses0 = demo.losses_fn(params["model"], xte[:2], yte[:2])
    if scalarizer.trainable:
        params["scalarizer"] = scalarizer.init_params(losses0)
    tx = optax.adam(LR)
    opt_state, s_state = tx.init(params), scalarizer.init(losses0)

    @jax.jit
    def step(params, opt_state, s_state, x, y):
        def objective(p):
            losses = demo.losses_fn(p["model"], x, y)
            return scalarizer.update(losses, s_state, params=p.get("scalarizer"))

        (_, s_state), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if isinstance(scalarizer, sc.FAMO):  # the losses after the step, on the same batch
            s_state = scalarizer.after_step(demo.losses_fn(params["model"], x, y), s_state)
        return params, opt_state, s_state

    curves = {"step": [], "acc": [], "loss": []}
    for i, idx in enumerate(batches):
        params, opt_state, s_state = step(params, opt_state, s_state, xtr[idx], ytr[idx])
        if (i + 1) % EVAL_EVERY == 0:
            acc, loss = evaluate(params["model"])
            curves["step"].append(i + 1)
            curves["acc"].append(acc)
            curves["loss"].append(loss)
    curves["state"] = s_state
    return curves


# %% [markdown]
# An aggregator's step: the Jacobian of the three losses, then the optax chain. GradNorm and
# DB-MTL read the losses (`.needs_losses`); the others ignore `losses=`, so one step serves all.


# %%
def train_aggregator(aggregator, seed=0):
    params = demo.init_params(jax.random.key(seed))
    tx = optax.chain(jd.jd_aggregate(aggregator, num_objectives=3), optax.adam(LR))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        losses, J = jd.value_and_jacobian(demo.losses_fn)(params, x, y)
        updates, opt_state = tx.update(J, opt_state, params, losses=losses)
        return optax.apply_updates(params, updates), opt_state

    curves = {"step": [], "acc": [], "loss": []}
    for i, idx in enumerate(batches):
        params, opt_state = step(params, opt_state, xtr[idx], ytr[idx])
        if (i + 1) % EVAL_EVERY == 0:
            acc, loss = evaluate(params)
            curves["step"].append(i + 1)
            curves["acc"].append(acc)
            curves["loss"].append(loss)
    return curves


scalarizers = {
    "mean": sc.Mean(),
    "uw": sc.UW(),
    "stch": sc.STCH(mu=0.5),
    "famo": sc.FAMO(lr=0.025),
}
aggregators = {
    "upgrad": jd.upgrad(),
    "gradnorm": jd.gradnorm(alpha=1.5, lr=0.025),
    "db_mtl": jd.db_mtl(),
}
results = {name: train_scalarizer(s) for name, s in scalarizers.items()}
results |= {name: train_aggregator(a) for name, a in aggregators.items()}
for r in results.values():
    r["acc"], r["loss"] = np.array(r["acc"]), np.array(r["loss"])

print(f"{'method':<10}" + "".join(f"{t:>10}" for t in demo.TASKS) + "   mean test loss")
for name, r in results.items():
    accs = "".join(f"{a:10.3f}" for a in r["acc"][-1])
    print(f"{name:<10}{accs}   {r['loss'][-1].mean():15.3f}")

# %% [markdown]
# Every method learns every task on this easy problem; what differs is how the three losses are
# balanced on the way. DB-MTL lags at LibMTL's defaults here: its update follows a moving
# average of the log-loss gradients (beta = 0.9), each brought to the largest norm. FAMO's
# weights end away from uniform (FAMO raises the weight of a task whose loss fell less than the
# others' across a step).

# %%
famo_weights = scalarizers["famo"].weights(results["famo"]["state"])
print("FAMO's task weights after training:", np.round(np.asarray(famo_weights), 3))
assert abs(float(jnp.sum(famo_weights)) - 1.0) < 1e-5
assert float(jnp.max(famo_weights) - jnp.min(famo_weights)) > 0.01
for name, r in results.items():
    assert np.all(r["acc"][-1] > 0.7), name  # every method learns every task
    assert np.all(r["loss"][-1] < r["loss"][0]), name  # and every test loss fell

# %%
fig, axes = plt.subplots(2, 3, figsize=(15, 7), sharex=True)
for name, r in results.items():
    style = "-" if name in scalarizers else "--"
    for k in range(len(demo.TASKS)):
        axes[0, k].plot(r["step"], r["acc"][:, k], style, label=name)
        axes[1, k].plot(r["step"], r["loss"][:, k], style, label=name)
for k, task in enumerate(demo.TASKS):
    axes[0, k].set_title(f"test accuracy: {task}")
    axes[1, k].set_title(f"test loss: {task}")
    axes[1, k].set_xlabel("step")
    axes[1, k].set_yscale("log")
axes[0, 0].legend(fontsize=8, title="solid: scalarizer, dashed: aggregator")
plt.tight_layout()
plt.show()

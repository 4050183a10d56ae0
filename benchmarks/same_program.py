"""Do two versions of jaxjd compile the training steps to the same XLA program?

A refactor that should not move the benchmarks (a new protocol, a new layout) can be checked
without timing noise: dump the optimised HLO of the benchmark steps under each version and compare
them op by op (instruction names, numbering and source locations dropped; operands kept).

    PYTHONPATH=<old checkout> python benchmarks/same_program.py --dump /tmp/old
    PYTHONPATH=<new checkout> python benchmarks/same_program.py --dump /tmp/new
    python benchmarks/same_program.py --compare /tmp/old /tmp/new

The steps: MTL 32-128-128 with 3 tasks (UPGrad, layerwise and Jacobian engines), IWRM on an MLP
784-64-10 and the benchmark's CNN with B = 32 (UPGrad weighting, per-sample engine; Jacobian
engine for the MLP), and ``upgrad(J)`` on
an 8 x 1000 matrix, float32, on the default backend.
"""

from __future__ import annotations

import argparse
import collections
import os
import re


def _ops(text: str) -> collections.Counter:
    """The multiset of instructions with names, numbering and locations removed."""
    text = text[text.find("\n%") :]
    text = re.sub(r",?\s*metadata=\{[^}]*\}", "", text)
    text = re.sub(r",?\s*stack_frame_id=\d+", "", text)
    text = re.sub(r"\bbackend_config=\S+", "", text)
    text = re.sub(r"%[\w\-.]+", "%v", text)  # every value name: wiring is compared by shape/op
    return collections.Counter(line.strip() for line in text.splitlines() if " = " in line)


def dump(directory: str) -> None:
    import jax
    import jax.numpy as jnp
    from bench_training import dense_init, mlp

    import jaxjd as jd

    os.makedirs(directory, exist_ok=True)
    key = jax.random.key(0)
    tp = dense_init(key, [32, 128, 128])
    hp = {"w": jnp.ones((3, 128)), "b": jnp.zeros(3)}
    x, y = jnp.ones((64, 32)), jnp.ones((64, 3))

    def trunk(p, x, y):
        return mlp(p, x)

    def heads(h, f, x, y):
        return jnp.mean((f @ h["w"].T + h["b"] - y) ** 2, axis=0)

    programs = {}
    for method in ("layerwise", "jacobian"):
        step = jd.mtl_value_and_grad(trunk, heads, jd.upgrad(), method=method)
        programs[f"mtl-{method}"] = jax.jit(step).lower(tp, hp, x, y)
    params = dense_init(key, [784, 64, 10])
    xs, ys = jnp.ones((32, 784)), jnp.zeros((32,), jnp.int32)

    def losses(p, x, y):
        logp = jax.nn.log_softmax(mlp(p, x, last_relu=False))
        return -jnp.take_along_axis(logp, y[:, None], 1)[:, 0]

    for method in ("per_sample", "jacobian"):
        step = jd.value_and_weighted_grad(losses, jd.upgrad_weighting(), method=method)
        programs[f"iwrm-{method}"] = jax.jit(step).lower(params, xs, ys)
    k = jax.random.split(key, 3)
    cnn = {
        "c1": jax.random.normal(k[0], (8, 1, 3, 3)),
        "c2": jax.random.normal(k[1], (16, 8, 3, 3)),
        "out": dense_init(k[2], [16 * 24 * 24, 10])[0],
    }
    images = jnp.ones((32, 1, 28, 28))

    def cnn_losses(p, x, y):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["c1"], (1, 1), "VALID"))
        h = jax.nn.relu(jax.lax.conv_general_dilated(h, p["c2"], (1, 1), "VALID"))
        logp = jax.nn.log_softmax(h.reshape(x.shape[0], -1) @ p["out"]["w"] + p["out"]["b"])
        return -jnp.take_along_axis(logp, y[:, None], 1)[:, 0]

    step = jd.value_and_weighted_grad(cnn_losses, jd.upgrad_weighting(), method="per_sample")
    programs["iwrm-cnn-per_sample"] = jax.jit(step).lower(cnn, images, ys)
    J = jnp.ones((8, 1000)) * jnp.arange(8.0)[:, None]
    programs["upgrad-8x1000"] = jax.jit(jd.upgrad()).lower(J)
    for name, lowered in programs.items():
        with open(os.path.join(directory, f"{name}.hlo"), "w") as f:
            f.write(lowered.compile().as_text())
        print("dumped", name)


def compare(a: str, b: str) -> bool:
    same = True
    for name in sorted(os.listdir(a)):
        with open(os.path.join(a, name)) as fa, open(os.path.join(b, name)) as fb:
            ops_a, ops_b = _ops(fa.read()), _ops(fb.read())
        extra_a, extra_b = ops_a - ops_b, ops_b - ops_a
        n_a, n_b = sum(ops_a.values()), sum(ops_b.values())
        verdict = "same ops" if not extra_a and not extra_b else "DIFFERENT"
        same &= not extra_a and not extra_b
        print(f"| {name[:-4]} | {n_a} | {n_b} | {verdict} |")
        for line in list(extra_a)[:3]:
            print("   -", line[:160])
        for line in list(extra_b)[:3]:
            print("   +", line[:160])
    return same


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", metavar="DIR")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    args = parser.parse_args()
    if args.dump:
        dump(args.dump)
    if args.compare:
        print("| step | ops (old) | ops (new) | |\n|---|---|---|---|")
        raise SystemExit(0 if compare(*args.compare) else 1)

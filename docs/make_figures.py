"""Writes the site's figures (``python docs/make_figures.py``; committed, so that building the
site needs no matplotlib): the dual cone of two conflicting gradients, with the mean and UPGrad
directions."""

from pathlib import Path

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import jaxjd as jd


def dual_cone(path: Path) -> None:
    J = jnp.array([[-1.0, 2.0], [4.0, -1.0]])  # rows g1, g2: they conflict, g2 is larger
    mean, upgrad = np.asarray(jd.mean(J)), np.asarray(jd.upgrad(J, reg_eps=0.0))
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    t = np.linspace(0, 2 * np.pi, 1441)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    angles = t[np.all(circle @ np.asarray(J).T >= 0, axis=1)]
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
        (mean, "mean (raises loss 1)", "tab:red"),
        (upgrad, "UPGrad (in the cone)", "tab:blue"),
    ]:
        ax.quiver(0, 0, *np.asarray(vec), color=color, label=name, **style)
    ax.set_xlim(-2.5, 4.5)
    ax.set_ylim(-2.0, 3.0)
    ax.set_aspect("equal")
    ax.axhline(0, lw=0.5, color="k")
    ax.axvline(0, lw=0.5, color="k")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    dual_cone(Path(__file__).parent / "_static" / "dual_cone.png")

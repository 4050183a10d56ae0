"""The README's main job runs end to end (fewer steps) and reports real numbers."""

import numpy as np

from jaxjd._demo import main


def test_demo_trains_both_methods(capsys):
    results = main(["--steps", "60", "--batch", "64"])
    out = capsys.readouterr().out
    assert "| upgrad |" in out and "| mean |" in out
    for name in ("mean", "upgrad"):
        acc, hist = results[name]
        assert acc.shape == (3,) and np.all(acc > 0.6)  # well above chance after 60 steps
        assert len(hist["conflict"]) == 60
    # UPGrad's updates never increase a task loss to first order.
    assert all(results["upgrad"][1]["nc"])

"""The README's main job runs end to end (fewer steps) and reports real numbers."""

import numpy as np

from jaxjd._demo import main


def test_demo_trains_both_methods(capsys, tmp_path):
    plot = tmp_path / "losses.png"
    results = main(["--steps", "60", "--batch", "64", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "| upgrad |" in out and "| mean |" in out and "compiling ..." in out
    assert f"per-task training losses: {plot}" in out and plot.stat().st_size > 10_000
    for name in ("mean", "upgrad"):
        acc, hist = results[name]
        assert acc.shape == (3,) and np.all(acc[:2] > 0.6)  # well above chance after 60 steps
        assert 0 < acc[2] < 2.5  # the value's RMSE (a constant guess: 2.9)
        assert len(hist["conflict"]) == 60 and np.stack(hist["losses"]).shape == (60, 3)
    # UPGrad's updates never increase a task loss to first order; the mean's do, on this mix.
    assert all(results["upgrad"][1]["nc"])
    assert not all(results["mean"][1]["nc"])

"""The README's Python example runs and takes a real step."""

import re
from pathlib import Path

import numpy as np


def test_readme_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    scope: dict = {}
    exec(code, scope)
    jnp = scope["jnp"]
    x = jnp.ones((8, 5))
    y = jnp.stack([jnp.ones(8), -jnp.ones(8)], axis=1)
    params, _state, values = scope["step"](scope["params"], scope["state"], x, y)
    np.testing.assert_allclose(values, [1.0, 1.0])  # the losses at the zero initialisation
    assert float(jnp.abs(params["b"]).sum()) > 0  # the step moved the parameters

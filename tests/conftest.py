import os

# The suite is bound by XLA compilation (one compile per method, configuration and shape): LLVM's
# -O0 cuts it by about a third. It changes how fast the compiled code runs, not what it computes
# (XLA's CPU fast-math stays off); benchmarks/ never sets it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest

# Float64 runs inside ``jax.enable_x64(True)``; float32 runs with x64 off, as most users have it.
# So both modes are exercised in one session, per test.


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    if request.param == "float64":
        with jax.enable_x64(True):
            yield request.param
    else:
        with jax.enable_x64(False):
            yield request.param


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run only where JAX's default backend is an accelerator."""
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs an accelerator (JAX's default backend is the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

import os

# The suite is bound by XLA compilation (one compile per method, configuration and shape): LLVM's
# -O0 cuts it by about a third. It changes how fast the compiled code runs, not what it computes
# (XLA's CPU fast-math stays off); benchmarks/ never sets it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest

# JAXJD_STRICT=1 (a job of .ci/run) runs under strict dtype promotion and rank promotion raising,
# as equinox runs its own tests: no implicit float32/float64 mixing, no implicit broadcasting of
# ranks anywhere in the library.
if os.environ.get("JAXJD_STRICT") == "1":
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")

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


_MAPS = "/proc/self/maps"
_RUN = {"tests": 0}


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Each compiled XLA CPU program holds about three memory maps until JAX's caches drop it: a
    worker that had compiled ~15,000 programs reached the kernel's limit (vm.max_map_count,
    65,530) and segfaulted. Past 50,000 maps (checked every 25 tests) the caches are cleared
    once; programs compile again on demand."""
    yield
    _RUN["tests"] += 1
    if _RUN["tests"] % 25 == 0 and os.path.exists(_MAPS):
        with open(_MAPS) as f:
            if sum(1 for _ in f) > 50_000:
                jax.clear_caches()


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run only where JAX's default backend is an accelerator."""
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs an accelerator (JAX's default backend is the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

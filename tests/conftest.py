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

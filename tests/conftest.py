import os

# The suite is bound by XLA compilation (one compile per method, configuration and shape): LLVM's
# -O0 cuts it by about a third. It changes how fast the compiled code runs, not what it computes
# (XLA's CPU fast-math stays off); benchmarks/ never sets it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest

# The same for the passes before LLVM (JAX's switch: XLA's expensive HLO passes off as well):
# about 7% less wall time measured on the transformation, hardening and value-policy tests.
jax.config.update("jax_disable_most_optimizations", True)

# Scripts that write the test data (they need torch and torchjd, which the tests never do).
collect_ignore = ["data/make_scalarization_goldens.py", "data/make_libmtl_goldens.py"]

# The xdist workers of one run share XLA's persistent compilation cache (a temporary directory
# made by the controlling process, see pytest_configure): a program compiled on one worker (or
# by another test's fresh closure: the key is the program, not the function) is read back
# instead of compiled again. It changes when a program is compiled, not what runs.
# JAXJD_TEST_SHARED_CACHE=0 turns it off.
if os.environ.get("JAXJD_TEST_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.environ["JAXJD_TEST_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_configure(config):
    distributed = getattr(config.option, "numprocesses", None) and not hasattr(
        config, "workerinput"
    )
    if distributed and os.environ.get("JAXJD_TEST_SHARED_CACHE", "1") == "1":
        import tempfile

        config._jaxjd_cache = tempfile.mkdtemp(prefix="jaxjd-xla-")
        os.environ["JAXJD_TEST_CACHE_DIR"] = config._jaxjd_cache  # inherited by the workers


def pytest_sessionstart(session):
    """The first lines of a run say what runs (also under -q)."""
    config = session.config
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or hasattr(config, "workerinput"):
        return
    for line in _what_runs(config):
        reporter.write_line(line)


def _what_runs(config):
    markexpr = config.getoption("markexpr", "").strip("'\"")
    if markexpr == "not slow":
        what = (
            "jaxjd default suite: every method through the protocol (jit, vmap, pytrees, dtypes, "
            "the value policy), TorchJD's and LibMTL's outputs, the paper's properties, solvers, "
            "engines, optax, scalarizers and notebooks, one case of each kind. Every sweep: "
            "-m slow."
        )
    else:
        what = f"jaxjd tests selected by -m {markexpr!r}" if markexpr else "jaxjd: every test"
    return [what, f"jax {jax.__version__} on {jax.default_backend()}"]


def pytest_unconfigure(config):
    cache = getattr(config, "_jaxjd_cache", None)
    if cache:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("JAXJD_TEST_CACHE_DIR", None)


# On GPUs JAX's default float32 matrix products are TF32 (10-bit mantissa, ~1e-3 relative): the
# tests' own models, references and per-sample losses then differ from their reorganised
# counterparts (microbatches against the whole batch, engines against jacrev) by ~1e-4, while the
# tests compare float32 at 1e-5 (measured on an H100: 3 such failures). The library runs its own
# products at full precision; the tests' products run at full precision too on accelerators.
if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")

# JAXJD_STRICT=1 (a job of .ci/run) runs under strict dtype promotion and rank promotion raising,
# as equinox runs its own tests: no implicit float32/float64 mixing, no implicit broadcasting of
# ranks anywhere in the library.
_STRICT = os.environ.get("JAXJD_STRICT") == "1"
if _STRICT:
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _third_party_promotion(request):
    """Tests marked ``standard_dtype_promotion`` run third-party code that needs JAX's standard
    dtype rules (optax's Adam raises ``count ** decay``-style int/float mixes under strict
    promotion): in the strict job they keep rank_promotion="raise" and standard dtype rules."""
    if _STRICT and request.node.get_closest_marker("standard_dtype_promotion"):
        with jax.numpy_dtype_promotion("standard"):
            yield
    else:
        yield


# Float64 runs inside ``jax.enable_x64(True)``; float32 runs with x64 off, as most users have it.
# So both modes are exercised in one pytest run, per test.


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


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """The fast suite's budget (``budget.py``): those tests and cases get the ``slow`` mark.
    ``@pytest.mark.gpu`` tests are skipped on the CPU."""
    import budget

    _skip_gpu_tests(items)
    seen, modules = set(), {}
    for item in items:
        name = getattr(item, "originalname", None) or item.name
        key = f"{item.path.name}::{name}"
        if isinstance(item, pytest.Function):
            modules[item.path.name] = item.module
        if key in budget.SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        elif key in budget.ONE_CASE and item.get_closest_marker("slow") is None:
            if key in seen:
                item.add_marker(pytest.mark.slow)
            seen.add(key)
    stale = [
        key
        for key in sorted(budget.SLOW_TESTS | budget.ONE_CASE)
        if key.split("::")[0] in modules
        and not hasattr(modules[key.split("::")[0]], key.split("::")[1])
    ]
    if stale:
        raise pytest.UsageError(f"tests/budget.py names tests that do not exist: {stale}")


def _skip_gpu_tests(items):
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs an accelerator (JAX's default backend is the CPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

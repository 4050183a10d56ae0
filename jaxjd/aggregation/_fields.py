"""Hyper-parameter fields (declared once per method, validated on construction) and the
snake_case spelling generated from each class."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from .._typing import Gramian, Jacobian, Key, Update, Weights

__all__ = [
    "as_dtype",
    "choice",
    "number",
    "sized",
    "spelling",
    "static_int",
    "static_tol",
    "vector",
]


def _is_traced(value) -> bool:
    return isinstance(value, Tracer)


def _number(name: str, check: Callable[[float], bool] | None, what: str, optional: bool = False):
    def convert(value):
        if value is None and optional:
            return None
        if _is_traced(value):  # built inside a transformation: checked by the caller's maths
            return value
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim != 0:
            raise ValueError(f"{name} must be a number; got shape {arr.shape}.")
        if not np.isfinite(arr) or (check is not None and not check(float(arr))):
            raise ValueError(f"{name} must be {what}; got {value}.")
        return arr

    return convert


_CHECKS: dict[str, tuple[Callable[[float], bool] | None, str]] = {
    "any": (None, "finite"),
    "positive": (lambda x: x > 0, "> 0"),
    "nonnegative": (lambda x: x >= 0, ">= 0"),
    "unit": (lambda x: 0 <= x <= 1, "in [0, 1]"),
    "fraction": (lambda x: 0 <= x < 1, "in [0, 1)"),
}


def number(name: str, default: Any = None, *, check: str = "any", optional: bool = False) -> Any:
    """A float hyper-parameter stored as a 0-d array: a pytree leaf, so that a jitted step
    traces it (a new value does not recompile). Validated when concrete. ``optional``: ``None``
    is a value too (the default unless another is given), kept as ``None``."""
    test, what = _CHECKS[check]
    kwargs: dict[str, Any] = {} if default is None and not optional else {"default": default}
    return eqx.field(converter=_number(name, test, what, optional), **kwargs)


def _vector(name: str, optional: bool, any_shape: bool = False):
    def convert(value):
        if value is None:
            if optional:
                return None
            what = (
                "an array with the shape of the losses" if any_shape else "a 1-D vector of length m"
            )
            raise ValueError(f"{name} is required: {what}.")
        if _is_traced(value):
            return value
        if isinstance(value, jax.Array):
            value = np.asarray(value)
        arr = np.asarray(value, dtype=np.float64)
        if not any_shape and arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D vector; got shape {arr.shape}.")
        if arr.size == 0:
            raise ValueError(f"{name} must not be empty.")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite; got {arr}.")
        return arr

    return convert


def vector(name: str, *, optional: bool = True, any_shape: bool = False) -> Any:
    """A 1-D float vector hyper-parameter (preference, fixed weights, leaks), stored as an
    array leaf; its length is checked against m at trace time. ``any_shape``: an array of any
    shape instead (the scalarizers' weights, shaped like the losses)."""
    convert = _vector(name, optional, any_shape)
    if optional:
        return eqx.field(converter=convert, default=None)
    return eqx.field(converter=convert)


def _int(name: str, minimum: int, allow_none: bool):
    def convert(value: Any):
        if value is None:
            if allow_none:
                return None
            raise ValueError(f"{name} is required (an integer).")
        if isinstance(value, bool) or int(value) != value or value < minimum:
            bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ValueError(f"{name} must be {bound}; got {value}.")
        return int(value)

    return convert


def static_int(name: str, default: Any = None, *, minimum: int = 1, allow_none=False) -> Any:
    """An integer that sets shapes or loop bounds: static (part of the compiled program)."""
    kwargs = {} if default is None and not allow_none else {"default": default}
    return eqx.field(static=True, converter=_int(name, minimum, allow_none), **kwargs)


def _tolerance(name: str):
    def convert(value: Any):
        if value is None:
            return None
        if isinstance(value, bool) or not np.isfinite(value) or value <= 0:
            raise ValueError(
                f"{name} must be a finite number > 0 (or None for the default); got {value}."
            )
        return float(value)

    return convert


def static_tol(name: str) -> Any:
    """A stopping tolerance: static, ``None`` (the dtype's default) or a finite number > 0."""
    return eqx.field(static=True, default=None, converter=_tolerance(name))


def choice(name: str, default: str, options: tuple[str, ...]) -> Any:
    """A static string among ``options``."""

    def convert(value):
        if value not in options:
            raise ValueError(f"Invalid {name}={value!r}; expected one of {options}.")
        return value

    return eqx.field(static=True, default=default, converter=convert)


def _looks_like_hyper(x) -> bool:
    if isinstance(x, (list, tuple)):
        return all(isinstance(v, (int, float)) for v in x)
    return hasattr(x, "ndim") and getattr(x, "ndim", None) in (0, 1)


def _first_annotation(fn) -> Any:
    try:
        first = next(iter(inspect.signature(fn).parameters.values()), None)
    except (TypeError, ValueError):
        return None
    if first is None or first.annotation in (inspect.Parameter.empty, "Any", Any):
        return None
    return first.annotation


def declared_signature(cls: type) -> inspect.Signature:
    """``cls``'s constructor signature with each hyper-parameter annotated as declared (equinox
    writes ``Any`` for fields with a converter). An aggregator built on a weighting
    (``weighting_class``) takes the weighting's hyper-parameters."""
    source = getattr(cls, "weighting_class", None) or cls
    declared: dict = {}
    for klass in reversed(source.__mro__):
        declared.update(getattr(klass, "__annotations__", {}))
    for field in dataclasses.fields(source):  # a converter's own input type, where it has one
        converter = field.metadata.get("converter")
        accepts = _first_annotation(converter) if converter is not None else None
        if accepts is not None:
            declared[field.name] = accepts
    params = [
        p.replace(annotation=declared.get(p.name, p.annotation))
        for p in inspect.signature(source).parameters.values()
        if p.name != "self"
    ]
    return inspect.Signature(params)


M = TypeVar("M", covariant=True)


class AggregatorSpelling(Protocol, Generic[M]):
    """``name(**hyper) -> method``; ``name(jacobian, **hyper, key=None) -> update``."""

    @overload
    def __call__(self, jacobian: None = None, /, **hyper: Any) -> M: ...
    @overload
    def __call__(
        self, jacobian: Jacobian, /, *, key: Key | None = None, **hyper: Any
    ) -> Update: ...


class WeightingSpelling(Protocol, Generic[M]):
    """``name(**hyper) -> weighting``; ``name(gramian, **hyper, key=None) -> weights``."""

    @overload
    def __call__(self, gramian: None = None, /, **hyper: Any) -> M: ...
    @overload
    def __call__(self, gramian: Gramian, /, *, key: Key | None = None, **hyper: Any) -> Weights: ...


C = TypeVar("C")


@overload
def spelling(cls: type[C], name: str, *, reads: Literal["jacobian"]) -> AggregatorSpelling[C]: ...
@overload
def spelling(cls: type[C], name: str, *, reads: Literal["gramian"]) -> WeightingSpelling[C]: ...
def spelling(cls: type, name: str, *, reads: str) -> Any:
    """``name(**hyper)`` builds ``cls(**hyper)``; ``name(x, **hyper)`` applies it to ``x`` (a
    Jacobian when ``reads == "jacobian"``, a Gramian for a weighting), with ``key=`` passed to
    the call. Hyper-parameters are keywords only: a 1-D array or a list of numbers in first
    position is refused (it is no Jacobian or Gramian), and ``key=`` without ``x`` too (it
    would be dropped). A wrapper (a ``weighting`` field) takes its inner method in first
    position: ``crmogm_weighting(jd.upgrad_weighting(), alpha=0.9)``."""
    params = list(declared_signature(cls).parameters.values())
    if "weighting_class" not in vars(cls):  # help(cls) shows the declared types too
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        cls.__init__.__signature__ = inspect.Signature([self_param, *params])  # type: ignore[attr-defined]
    vector_fields = [p.name for p in params if p.name in ("pref_vector", "weights", "leak")]
    wraps = next((p.name for p in params if p.name in ("weighting", "aggregator")), None)

    @functools.wraps(cls, assigned=("__module__",), updated=())
    def factory(x=None, /, *, key=None, **hyper):
        if wraps is not None and x is not None and wraps not in hyper:
            # A wrapper takes its inner method in first position: crmogm_weighting(inner).
            return cls(**{wraps: x}, **hyper)
        if isinstance(x, eqx.Module) and hasattr(x, "needs_key"):
            raise TypeError(
                f"{name}'s first argument is the {reads} to apply it to; got a {type(x).__name__}."
            )
        obj = cls(**hyper)
        if x is None:
            if key is not None:
                raise TypeError(
                    f"{name}(key=...) without an input would drop the key: build with {name}() "
                    f"and pass the key when applying it, e.g. {name}()(x, key=key), or "
                    f"{name}(x, key=key)."
                )
            return obj
        if obj.stateful:
            raise TypeError(
                f"{cls.__name__} is stateful: build it with {name}(...), then state = "
                "method.init(...) and method.update(x, state)."
            )
        if _looks_like_hyper(x):
            hint = f" Did you mean {vector_fields[0]}=...?" if vector_fields else ""
            raise TypeError(
                f"{name}'s first argument is the {reads} to apply it to (a 2-D matrix or a "
                f"pytree of arrays with a leading axis m); got a 1-D vector or numbers.{hint} "
                "Hyper-parameters are keywords."
            )
        return obj(x, key=key) if key is not None else obj(x)

    kw = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    key_param = inspect.Parameter(
        "key", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Key | None"
    )
    x_type, out_type = ("Jacobian", "Update") if reads == "jacobian" else ("Gramian", "Weights")
    first = inspect.Parameter(
        reads, inspect.Parameter.POSITIONAL_ONLY, default=None, annotation=f"{x_type} | None"
    )
    factory.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [first, *kw, key_param], return_annotation=f"{cls.__name__} | {out_type}"
    )
    factory.__name__ = factory.__qualname__ = name
    kind = "update" if reads == "jacobian" else "weights"
    factory.__doc__ = (
        f":class:`{cls.__name__}`: ``{name}(**hyper)`` builds it, ``{name}({reads}, **hyper)`` "
        f"returns its {kind} (stateless methods; ``key=`` goes to the call).\n\n"
        + (inspect.getdoc(cls) or "")
    )
    return factory


def sized(values, m: int, dtype, name: str):
    """A vector hyper-parameter as an array of length m (checked at trace time)."""
    if jnp.shape(values) != (m,):
        raise ValueError(
            f"{name} has length {jnp.shape(values)[0]} but the input has m = {m} objectives."
        )
    return jnp.asarray(values, dtype)


def as_dtype(value, dtype):
    """A number-valued hyper-parameter cast to the computation's dtype (strict-promotion safe)."""
    return jnp.asarray(value).astype(dtype)

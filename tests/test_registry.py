"""The registry covers every public method, and the public face is what it claims."""

import dataclasses
import inspect
import warnings

import pytest
from methods import BY_NAME, PROTOCOL, REGISTRY, unwrapped

import jaxjd as jd
from jaxjd import aggregation


def test_registry_covers_every_public_method():
    covered = set()
    for spec in REGISTRY:
        for item in spec.covers:
            covered.add(item if isinstance(item, str) else item.__name__)
    missing = set(aggregation.__all__) - covered - PROTOCOL
    assert not missing, f"Add these to tests/methods.py: {sorted(missing)}"
    assert len(BY_NAME) == len(REGISTRY)


def test_every_snake_case_spelling_is_at_the_top_level():
    for name in aggregation.__all__:
        obj = getattr(aggregation, name)
        if inspect.isfunction(obj) and name != "solve_priority_qp":
            assert getattr(jd, name) is obj, name
    assert set(jd.__all__) <= set(dir(jd))


def test_method_classes_live_in_aggregation_and_old_names_warn():
    assert "UPGrad" not in jd.__all__
    with pytest.warns(DeprecationWarning, match="jaxjd.aggregation.UPGrad"):
        assert jd.UPGrad is aggregation.UPGrad
    with pytest.warns(DeprecationWarning, match="jaxjd.sum_rows"):
        assert jd.sum is jd.sum_rows
    with pytest.warns(DeprecationWarning, match="jaxjd.rlw"):
        assert jd.random is jd.rlw
    with pytest.warns(DeprecationWarning, match="AbstractAggregator"):
        assert jd.Aggregator is aggregation.AbstractAggregator
    for old, new in [
        ("StatefulWeighting", "AbstractWeighting"),
        ("StatefulGramianAggregator", "GramianWeightedAggregator"),
        ("ShapeWeighting", "reads_gramian"),
        ("excess_mtl_weighting", "excess_mtl"),
    ]:
        with pytest.raises(AttributeError, match=new):
            getattr(jd, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in jd.__all__:
            getattr(jd, name)


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.name)
def test_every_method_follows_the_protocol(spec):
    method = spec.build()
    assert isinstance(method, aggregation.AbstractAggregator)
    assert hash(method) == hash(spec.build()) and method == spec.build()
    if spec.weighting is not None:
        weighting = spec.weighting()
        assert isinstance(weighting, aggregation.AbstractWeighting)
        assert weighting.stateful == method.stateful
        assert weighting.needs_key == method.needs_key


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda s: s.name)
def test_every_method_has_a_documented_class(spec):
    """The class that holds the maths documents it: Args (for its hyper-parameters), a reference
    and a doctest; the aggregator that wraps it has a docstring too."""
    method = spec.weighting() if spec.weighting is not None else unwrapped(spec.build())
    if isinstance(method, aggregation.GramianWeightedAggregator):
        method = method.weighting
    holder = type(method)
    doc = inspect.getdoc(holder) or ""
    assert ">>>" in doc, holder.__name__
    if dataclasses.fields(holder):
        assert "Args:" in doc, holder.__name__
    if holder.__name__ not in ("MeanWeighting", "SumWeighting", "ConstantWeighting"):
        assert "Reference" in doc, holder.__name__
    assert inspect.getdoc(type(unwrapped(spec.build())))


def _public_callables():
    """Every public function and every public method of a public class, once."""
    modules = [jd, jd.aggregation, jd.engines, jd.solvers, jd.monitoring]
    seen, out = set(), []
    for mod in modules:
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            if not inspect.isclass(obj):
                if callable(obj):
                    out.append((name, obj))
                continue
            fields = (
                {f.name for f in dataclasses.fields(obj)}
                if dataclasses.is_dataclass(obj)
                else set()
            )
            for klass in obj.__mro__:
                if not klass.__module__.startswith("jaxjd"):
                    continue
                for attr, f in vars(klass).items():
                    public = not attr.startswith("_") or attr in ("__init__", "__call__")
                    if public and attr not in fields and inspect.isfunction(f):
                        out.append((f"{name}.{attr}", f))
    return out


# The shape-carrying arguments and what their annotation must name.
_SHAPED = {"jacobian": "Jacobian", "gramian": "m m", "G": "m m", "weights": " m"}


def test_every_public_callable_is_annotated():
    """Every parameter and return of the public API is annotated; Jacobians, Gramians and
    weights carry their jaxtyping shapes."""
    callables = _public_callables()
    assert len(callables) > 150
    missing, unshaped = [], []
    for name, f in callables:
        sig = inspect.signature(f)
        for p in sig.parameters.values():
            if p.name in ("self", "cls"):
                continue
            if p.annotation is inspect.Parameter.empty:
                missing.append(f"{name}({p.name})")
            elif p.name in _SHAPED and _SHAPED[p.name] not in str(p.annotation):
                aliases = {"Jacobian", "Gramian", "Weights", "PyTree", "VectorLike"}
                if not any(a in str(p.annotation) for a in aliases):
                    unshaped.append(f"{name}({p.name}: {p.annotation})")
        if sig.return_annotation is inspect.Signature.empty and not name.endswith("__init__"):
            missing.append(f"{name} -> ?")
    assert not missing, missing
    assert not unshaped, unshaped


def test_spellings_show_their_types():
    sig = inspect.signature(jd.upgrad)
    assert str(sig.parameters["jacobian"].annotation) == "Jacobian | None"
    assert str(sig.parameters["key"].annotation) == "Key | None"
    assert sig.return_annotation == "UPGrad | Update"
    w = inspect.signature(jd.upgrad_weighting)
    assert w.parameters["gramian"].annotation == "Gramian | None"
    assert w.return_annotation == "UPGradWeighting | Weights"
    assert w.parameters["reg_eps"].annotation == "Scalar"
    assert inspect.signature(jd.constant).parameters["weights"].annotation == "VectorLike"

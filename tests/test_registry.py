"""The registry covers every public method, and the public face is what it claims."""

import dataclasses
import inspect
import warnings

import pytest
from methods import BY_NAME, PROTOCOL, REGISTRY

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
    holder = type(spec.weighting() if spec.weighting is not None else spec.build())
    doc = inspect.getdoc(holder) or ""
    assert ">>>" in doc, holder.__name__
    if dataclasses.fields(holder):
        assert "Args:" in doc, holder.__name__
    if holder.__name__ not in ("MeanWeighting", "SumWeighting", "ConstantWeighting"):
        assert "Reference" in doc, holder.__name__
    assert inspect.getdoc(type(spec.build()))

"""THE registry of methods: every public weighting and aggregator, once.

A new method = its module in ``jaxjd/aggregation/`` and one ``Spec`` line here;
``test_registry.py`` fails when a public class or spelling is missing, and the transformation
tests run over every entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax.numpy as jnp

import jaxjd as jd
from jaxjd import aggregation as agg


@dataclass(frozen=True)
class Spec:
    """One configured method.

    Attributes:
        name: the test id.
        build: returns the aggregator (a fresh one, so that tests cannot share state).
        weighting: returns the same method's weighting, or ``None`` when it reads coordinates.
        covers: the public classes and spellings this entry exercises.
        loose: tolerances of the transformation tests, when the method's own solver stops
            short of rounding (``{"float32": ..., "float64": ...}``).
        eager: False for the iterative solvers (FISTA, damped Newton, interior point) whose
            thousands of iterations take minutes op by op: they are compared under jit only.
    """

    name: str
    build: Callable
    weighting: Callable | None
    covers: tuple = ()
    loose: dict = field(default_factory=dict)
    eager: bool = True


_CONST = [1.0, -0.5, 2.0, 0.25]  # the transformation tests use m = 4


class LossesFromJ(agg.AbstractAggregator):
    """Test adapter: runs a method that reads the losses (``needs_losses``) through its public
    ``aggregate`` with losses made from J itself (``0.5 + |g_i|^2``: finite where J is,
    positive), so that every registry test (jit, vmap, pytrees, dtypes, the value policy)
    drives it unchanged."""

    inner: agg.AbstractAggregator

    @property
    def needs_losses(self) -> bool:
        return False

    def _init(self, jacobian):
        return self.inner.init(jacobian)

    def _aggregate(self, jacobian, state, key):
        losses = 0.5 + jnp.diagonal(jd.gramian(jacobian))
        return self.inner.aggregate(jacobian, state, key=key, losses=losses)


def unwrapped(method):
    """The method under test (the adapter's inner one)."""
    return method.inner if isinstance(method, LossesFromJ) else method


REGISTRY = [
    Spec("upgrad", jd.upgrad, jd.upgrad_weighting,
         (agg.UPGrad, agg.UPGradWeighting, "upgrad", "upgrad_weighting")),
    Spec("upgrad_pgd", lambda: jd.upgrad(solver="nesterov_pgd"),
         lambda: jd.upgrad_weighting(solver="nesterov_pgd"), eager=False),
    Spec("dualproj", jd.dualproj, jd.dualproj_weighting,
         (agg.DualProj, agg.DualProjWeighting, "dualproj", "dualproj_weighting")),
    Spec("mgda", jd.mgda, jd.mgda_weighting,
         (agg.MGDA, agg.MGDAWeighting, "mgda", "mgda_weighting")),
    Spec("mgda_exact", lambda: jd.mgda(method="exact"),
         lambda: jd.mgda_weighting(method="exact")),
    Spec("mean", jd.mean, jd.mean_weighting,
         (agg.Mean, agg.MeanWeighting, "mean", "mean_weighting")),
    Spec("sum", jd.sum_rows, jd.sum_weighting,
         (agg.Sum, agg.SumWeighting, "sum_rows", "sum_weighting")),
    Spec("constant", lambda: jd.constant(weights=_CONST),
         lambda: jd.constant_weighting(weights=_CONST),
         (agg.Constant, agg.ConstantWeighting, "constant", "constant_weighting")),
    Spec("random", jd.rlw, jd.random_weighting,
         (agg.Random, agg.RandomWeighting, "rlw", "random_weighting")),
    Spec("imtl_g", jd.imtl_g, jd.imtl_g_weighting,
         (agg.IMTLG, agg.IMTLGWeighting, "imtl_g", "imtl_g_weighting")),
    Spec("aligned_mtl", lambda: jd.aligned_mtl(scale_mode="median"),
         lambda: jd.aligned_mtl_weighting(scale_mode="median"),
         (agg.AlignedMTL, agg.AlignedMTLWeighting, "aligned_mtl", "aligned_mtl_weighting")),
    Spec("config", jd.config, None, (agg.ConFIG, "config")),
    Spec("config_gramian", lambda: jd.config(factor="gramian"), None),
    Spec("krum", lambda: jd.krum(n_byzantine=1, n_selected=2),
         lambda: jd.krum_weighting(n_byzantine=1, n_selected=2),
         (agg.Krum, agg.KrumWeighting, "krum", "krum_weighting")),
    Spec("trimmed_mean", lambda: jd.trimmed_mean(trim_number=1), None,
         (agg.TrimmedMean, "trimmed_mean")),
    Spec("pcgrad", jd.pcgrad, jd.pcgrad_weighting,
         (agg.PCGrad, agg.PCGradWeighting, "pcgrad", "pcgrad_weighting")),
    Spec("graddrop", lambda: jd.graddrop(leak=[0.1, 0.2, 0.3, 0.4]), None,
         (agg.GradDrop, "graddrop")),
    Spec("fairgrad", lambda: jd.fairgrad(alpha=1.0), lambda: jd.fairgrad_weighting(alpha=1.0),
         (agg.FairGrad, agg.FairGradWeighting, "fairgrad", "fairgrad_weighting"), eager=False),
    # CAGrad's solve is exact on a face of the simplex when its pivoting settles; otherwise its
    # first-order fallback stops on the gradient mapping: weights accurate to ~1e-7 (float64)
    # and ~1e-3 (float32, 3e-4 absolute seen on a vmapped batch before the exact solve).
    Spec("cagrad", lambda: jd.cagrad(c=0.5), lambda: jd.cagrad_weighting(c=0.5),
         (agg.CAGrad, agg.CAGradWeighting, "cagrad", "cagrad_weighting"),
         loose={"float64": 1e-7, "float32": 1e-3}, eager=False),
    Spec("gradvac", jd.gradvac, jd.gradvac_weighting,
         (agg.GradVac, agg.GradVacWeighting, agg.GradVacState, "gradvac", "gradvac_weighting"),),
    Spec("pcd", jd.pcd, jd.pcd_weighting,
         (agg.PCD, agg.PCDWeighting, agg.PCDState, "pcd", "pcd_weighting", "solve_priority_qp"),),
    Spec("nash_mtl", jd.nash_mtl, jd.nash_mtl_weighting,
         (agg.NashMTL, agg.NashMTLWeighting, agg.NashMTLState, "nash_mtl", "nash_mtl_weighting"),
         loose={"float64": 1e-9, "float32": 1e-4}, eager=False),
    Spec("excess_mtl", lambda: jd.excess_mtl(n_warmup_steps=0), None,
         (agg.ExcessMTL, agg.ExcessMTLState, "excess_mtl")),
    Spec("moco", lambda: LossesFromJ(jd.moco()), None, (agg.MoCo, agg.MoCoState, "moco")),
    Spec("db_mtl", lambda: LossesFromJ(jd.db_mtl(beta_sigma=0.5)), None,
         (agg.DBMTL, agg.DBMTLState, "db_mtl")),
    Spec("gradnorm", lambda: LossesFromJ(jd.gradnorm(lr=0.1)), None,
         (agg.GradNorm, agg.GradNormWeighting, agg.GradNormState, "gradnorm",
          "gradnorm_weighting")),
    Spec("mgda_loss", lambda: LossesFromJ(jd.mgda(normalizer="loss+")), None),
    Spec("mgda_l2", lambda: jd.mgda(normalizer="l2"),
         lambda: jd.mgda_weighting(normalizer="l2")),
    Spec("cagrad_rescale", lambda: jd.cagrad(c=0.7, rescale=1),
         lambda: jd.cagrad_weighting(c=0.7, rescale=1),
         loose={"float64": 1e-7, "float32": 1e-3}, eager=False),
    Spec("crmogm_upgrad", lambda: jd.crmogm(jd.upgrad_weighting(), alpha=0.5),
         lambda: jd.crmogm_weighting(jd.upgrad_weighting(), alpha=0.5),
         (agg.CRMOGM, agg.CRMOGMWeighting, agg.CRMOGMState, "crmogm", "crmogm_weighting"),),
    Spec("crmogm_gradvac", lambda: jd.crmogm(jd.gradvac_weighting(), alpha=0.5),
         lambda: jd.crmogm_weighting(jd.gradvac_weighting(), alpha=0.5)),
    Spec("modo", lambda: agg.GramianWeightedAggregator(jd.modo_weighting()), jd.modo_weighting,
         (agg.MoDoWeighting, agg.SimplexWeightsState, "modo_weighting",
          agg.GramianWeightedAggregator)),
    Spec("sdmgrad", lambda: agg.GramianWeightedAggregator(jd.sdmgrad_weighting()),
         jd.sdmgrad_weighting, (agg.SDMGradWeighting, "sdmgrad_weighting")),
]  # fmt: skip

BY_NAME = {spec.name: spec for spec in REGISTRY}

#: What the registry need not cover: the protocol itself.
PROTOCOL = {"AbstractAggregator", "AbstractWeighting", "Aggregation", "EmptyState"}


#: The fast suite's registry sweeps (each whole in the slow sweep): the dual-cone QP, MGDA's
#: interior point, a weighting from m alone, and Nash-MTL's stateful sequence of programs.
FAST = frozenset({"upgrad", "mgda", "mean", "nash_mtl"})


def default_or_slow(names=FAST):
    """The registry as pytest params: the methods in ``names`` by default, the others in the
    slow sweep."""
    import pytest

    return [
        pytest.param(s, id=s.name, marks=() if s.name in names else pytest.mark.slow)
        for s in REGISTRY
    ]

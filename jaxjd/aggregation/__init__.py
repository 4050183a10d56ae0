"""Aggregators (Jacobian -> update) and weightings (Gramian -> weights): one module per method.

Every method follows one protocol (:class:`AbstractWeighting`, :class:`AbstractAggregator`):
``init`` builds the state (``EmptyState()`` when stateless) and ``update`` maps an input and a
state to ``(result, new_state)``; stateless methods can also be called. Each class has a
snake_case spelling: ``upgrad(**hyper)`` builds an :class:`UPGrad`, ``upgrad(J, **hyper)``
applies one.

Adding a method: one module here (its weighting and/or aggregator class, declared once, and the
spellings derived with ``spelling``), its names below, and one line in ``tests/methods.py``.
"""

from ._abstract import (
    AbstractAggregator,
    AbstractWeighting,
    Aggregation,
    EmptyState,
    GramianWeightedAggregator,
)
from ._aligned_mtl import AlignedMTL, AlignedMTLWeighting, aligned_mtl, aligned_mtl_weighting
from ._cagrad import CAGrad, CAGradWeighting, cagrad, cagrad_weighting
from ._config import ConFIG, config
from ._constant import Constant, ConstantWeighting, constant, constant_weighting
from ._crmogm import CRMOGM, CRMOGMState, CRMOGMWeighting, crmogm, crmogm_weighting
from ._dualproj import DualProj, DualProjWeighting, dualproj, dualproj_weighting
from ._excess_mtl import ExcessMTL, ExcessMTLState, excess_mtl
from ._fairgrad import FairGrad, FairGradWeighting, fairgrad, fairgrad_weighting
from ._graddrop import GradDrop, graddrop
from ._gradnorm import GradNorm, GradNormState, GradNormWeighting, gradnorm, gradnorm_weighting
from ._gradvac import GradVac, GradVacState, GradVacWeighting, gradvac, gradvac_weighting
from ._imtl_g import IMTLG, IMTLGWeighting, imtl_g, imtl_g_weighting
from ._krum import Krum, KrumWeighting, krum, krum_weighting
from ._mean import Mean, MeanWeighting, mean, mean_weighting
from ._mgda import MGDA, MGDAWeighting, mgda, mgda_weighting
from ._modo import MoDoWeighting, modo_weighting
from ._nash_mtl import NashMTL, NashMTLState, NashMTLWeighting, nash_mtl, nash_mtl_weighting
from ._pcd import PCD, PCDState, PCDWeighting, pcd, pcd_weighting, solve_priority_qp
from ._pcgrad import PCGrad, PCGradWeighting, pcgrad, pcgrad_weighting
from ._random import Random, RandomWeighting, random_weighting, rlw
from ._sdmgrad import SDMGradWeighting, sdmgrad_weighting
from ._simplex_state import SimplexWeightsState
from ._sum import Sum, SumWeighting, sum_rows, sum_weighting
from ._tracked import DBMTL, DBMTLState, MoCo, MoCoState, db_mtl, moco
from ._trimmed_mean import TrimmedMean, trimmed_mean
from ._upgrad import UPGrad, UPGradWeighting, upgrad, upgrad_weighting

#: The public classes and their spellings, method by method.
__all__ = [
    "CRMOGM",
    "IMTLG",
    "MGDA",
    "PCD",
    "AbstractAggregator",
    "AbstractWeighting",
    "Aggregation",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "CRMOGMState",
    "CRMOGMWeighting",
    "ConFIG",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "EmptyState",
    "ExcessMTL",
    "ExcessMTLState",
    "DBMTL",
    "GradNorm",
    "GradNormState",
    "GradNormWeighting",
    "DBMTLState",
    "MoCo",
    "MoCoState",
    "FairGrad",
    "FairGradWeighting",
    "GradDrop",
    "GradVac",
    "GradVacState",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoDoWeighting",
    "NashMTL",
    "NashMTLState",
    "NashMTLWeighting",
    "PCDState",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "SDMGradWeighting",
    "SimplexWeightsState",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "aligned_mtl",
    "aligned_mtl_weighting",
    "cagrad",
    "cagrad_weighting",
    "config",
    "constant",
    "constant_weighting",
    "crmogm",
    "crmogm_weighting",
    "dualproj",
    "dualproj_weighting",
    "excess_mtl",
    "db_mtl",
    "gradnorm",
    "gradnorm_weighting",
    "moco",
    "fairgrad",
    "fairgrad_weighting",
    "graddrop",
    "gradvac",
    "gradvac_weighting",
    "imtl_g",
    "imtl_g_weighting",
    "krum",
    "krum_weighting",
    "mean",
    "mean_weighting",
    "mgda",
    "mgda_weighting",
    "modo_weighting",
    "nash_mtl",
    "nash_mtl_weighting",
    "pcd",
    "pcd_weighting",
    "pcgrad",
    "pcgrad_weighting",
    "random_weighting",
    "rlw",
    "sdmgrad_weighting",
    "solve_priority_qp",
    "sum_rows",
    "sum_weighting",
    "trimmed_mean",
    "upgrad",
    "upgrad_weighting",
]

"""Aggregators (Jacobian -> update) and weightings (Gramian -> weights)."""

from ._aligned_mtl import AlignedMTL, AlignedMTLWeighting, aligned_mtl, aligned_mtl_weighting
from ._base import (
    Aggregator,
    GramianWeightedAggregator,
    ShapeWeighting,
    StatefulAggregator,
    StatefulGramianAggregator,
    StatefulWeighting,
    Weighting,
)
from ._basic import (
    Constant,
    ConstantWeighting,
    Mean,
    MeanWeighting,
    Random,
    RandomWeighting,
    Sum,
    SumWeighting,
    constant,
    constant_weighting,
    mean,
    mean_weighting,
    random,
    random_weighting,
    sum,
    sum_weighting,
)
from ._cagrad import CAGrad, CAGradWeighting, cagrad, cagrad_weighting
from ._config import ConFIG, config
from ._crmogm import CRMOGMState, CRMOGMWeighting, crmogm_weighting
from ._dual_cone import (
    DualProj,
    DualProjWeighting,
    UPGrad,
    UPGradWeighting,
    dualproj,
    dualproj_weighting,
    upgrad,
    upgrad_weighting,
)
from ._excess_mtl import (
    ExcessMTL,
    ExcessMTLState,
    ExcessMTLWeighting,
    excess_mtl,
    excess_mtl_weighting,
)
from ._fairgrad import FairGrad, FairGradWeighting, fairgrad, fairgrad_weighting
from ._graddrop import GradDrop, graddrop
from ._gradvac import GradVac, GradVacState, GradVacWeighting, gradvac, gradvac_weighting
from ._imtl_g import IMTLG, IMTLGWeighting, imtl_g, imtl_g_weighting
from ._krum import Krum, KrumWeighting, krum, krum_weighting
from ._mgda import MGDA, MGDAWeighting, mgda, mgda_weighting
from ._modo_sdmgrad import (
    MoDoWeighting,
    SDMGradWeighting,
    SimplexWeightsState,
    modo_weighting,
    sdmgrad_weighting,
)
from ._nash_mtl import NashMTL, NashMTLState, NashMTLWeighting, nash_mtl, nash_mtl_weighting
from ._pcd import PCD, PCDState, PCDWeighting, pcd, pcd_weighting, solve_priority_qp
from ._pcgrad import PCGrad, PCGradWeighting, pcgrad, pcgrad_weighting
from ._trimmed_mean import TrimmedMean, trimmed_mean

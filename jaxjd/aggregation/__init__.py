"""Aggregators (Jacobian -> update) and weightings (Gramian -> weights)."""

from ._aligned_mtl import AlignedMTL, AlignedMTLWeighting, aligned_mtl, aligned_mtl_weighting
from ._base import (
    Aggregator,
    GramianWeightedAggregator,
    ShapeWeighting,
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
from ._fairgrad import FairGrad, FairGradWeighting, fairgrad, fairgrad_weighting
from ._graddrop import GradDrop, graddrop
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
from ._pcgrad import PCGrad, PCGradWeighting, pcgrad, pcgrad_weighting
from ._trimmed_mean import TrimmedMean, trimmed_mean

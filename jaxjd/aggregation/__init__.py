"""Aggregators (Jacobian -> update) and weightings (Gramian -> weights)."""

from ._base import Aggregator, GramianWeightedAggregator, ShapeWeighting, Weighting
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
from ._mgda import MGDA, MGDAWeighting, mgda, mgda_weighting

"""jaxjd: Jacobian descent for multi-objective optimisation in JAX.

>>> import jax.numpy as jnp, jaxjd as jd
>>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
>>> import numpy as np
>>> np.round(np.asarray(jd.upgrad(J), float), 4)
array([0.2929, 1.9004, 1.9004])
"""

from . import monitoring
from ._jacobian import value_and_jacobian
from ._optax import JDAggregateState, jd_aggregate
from ._solvers import ProjectionInfo, kkt_residual, normalize_regularize, project_onto_dual_cone
from ._tree import combine, cross_gramian, gramian, matrix_view, num_objectives, unravel_row
from .aggregation import (
    IMTLG,
    MGDA,
    Aggregator,
    AlignedMTL,
    AlignedMTLWeighting,
    CAGrad,
    CAGradWeighting,
    ConFIG,
    Constant,
    ConstantWeighting,
    CRMOGMState,
    CRMOGMWeighting,
    DualProj,
    DualProjWeighting,
    FairGrad,
    FairGradWeighting,
    GradDrop,
    GramianWeightedAggregator,
    IMTLGWeighting,
    Krum,
    KrumWeighting,
    Mean,
    MeanWeighting,
    MGDAWeighting,
    MoDoWeighting,
    PCGrad,
    PCGradWeighting,
    Random,
    RandomWeighting,
    SDMGradWeighting,
    ShapeWeighting,
    SimplexWeightsState,
    StatefulWeighting,
    Sum,
    SumWeighting,
    TrimmedMean,
    UPGrad,
    UPGradWeighting,
    Weighting,
    aligned_mtl,
    aligned_mtl_weighting,
    cagrad,
    cagrad_weighting,
    config,
    constant,
    constant_weighting,
    crmogm_weighting,
    dualproj,
    dualproj_weighting,
    fairgrad,
    fairgrad_weighting,
    graddrop,
    imtl_g,
    imtl_g_weighting,
    krum,
    krum_weighting,
    mean,
    mean_weighting,
    mgda,
    mgda_weighting,
    modo_weighting,
    pcgrad,
    pcgrad_weighting,
    random,
    random_weighting,
    sdmgrad_weighting,
    sum,
    sum_weighting,
    trimmed_mean,
    upgrad,
    upgrad_weighting,
)

__version__ = "0.1.0"

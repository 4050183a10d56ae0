"""jaxjd: Jacobian descent for multi-objective optimisation in JAX.

The pipeline ``J -> G = J J^T -> w = f(G) -> J^T w``: engines give ``J`` or ``G`` of a loss
function, :mod:`jaxjd.aggregation` holds the methods (weightings ``G -> w``, aggregators
``J -> update``), :mod:`jaxjd.solvers` the exact dual-cone QP layer, and :func:`jd_aggregate`
puts a method at the head of an optax chain.

>>> import jax.numpy as jnp, jaxjd as jd
>>> J = jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
>>> import numpy as np
>>> np.round(np.asarray(jd.upgrad(J), float), 4)
array([0.2929, 1.9004, 1.9004])
"""

import warnings as _warnings

from . import aggregation, engines, monitoring, scalarization, solvers
from ._optax import JDAggregateState, jd_aggregate
from ._tree import (
    combine,
    cross_gramian,
    gramian,
    matrix_view,
    num_objectives,
    row_dots,
    unravel_row,
)
from .aggregation import (
    aligned_mtl,
    aligned_mtl_weighting,
    cagrad,
    cagrad_weighting,
    config,
    constant,
    constant_weighting,
    crmogm,
    crmogm_weighting,
    db_mtl,
    dualproj,
    dualproj_weighting,
    excess_mtl,
    fairgrad,
    fairgrad_weighting,
    graddrop,
    gradnorm,
    gradnorm_weighting,
    gradvac,
    gradvac_weighting,
    imtl_g,
    imtl_g_weighting,
    krum,
    krum_weighting,
    mean,
    mean_weighting,
    mgda,
    mgda_weighting,
    moco,
    modo_weighting,
    nash_mtl,
    nash_mtl_weighting,
    pcd,
    pcd_weighting,
    pcgrad,
    pcgrad_weighting,
    random_weighting,
    rlw,
    sdmgrad_weighting,
    sum_rows,
    sum_weighting,
    trimmed_mean,
    upgrad,
    upgrad_weighting,
)
from .engines import (
    mean_over_microbatches,
    mtl_value_and_grad,
    mtl_value_and_gramian,
    mtl_value_and_jacobian,
    value_and_gramian,
    value_and_jacobian,
    value_and_weighted_grad,
)
from .solvers import ProjectionInfo, kkt_residual, normalize_regularize, project_onto_dual_cone

__version__ = "0.2.0"

__all__ = [
    "JDAggregateState",
    "ProjectionInfo",
    "aggregation",
    "aligned_mtl",
    "aligned_mtl_weighting",
    "cagrad",
    "cagrad_weighting",
    "combine",
    "config",
    "constant",
    "constant_weighting",
    "crmogm",
    "crmogm_weighting",
    "cross_gramian",
    "dualproj",
    "dualproj_weighting",
    "engines",
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
    "gramian",
    "imtl_g",
    "imtl_g_weighting",
    "jd_aggregate",
    "kkt_residual",
    "krum",
    "krum_weighting",
    "matrix_view",
    "mean",
    "mean_over_microbatches",
    "mean_weighting",
    "mgda",
    "mgda_weighting",
    "modo_weighting",
    "monitoring",
    "scalarization",
    "mtl_value_and_grad",
    "mtl_value_and_gramian",
    "mtl_value_and_jacobian",
    "nash_mtl",
    "nash_mtl_weighting",
    "normalize_regularize",
    "num_objectives",
    "pcd",
    "pcd_weighting",
    "pcgrad",
    "pcgrad_weighting",
    "project_onto_dual_cone",
    "random_weighting",
    "rlw",
    "row_dots",
    "sdmgrad_weighting",
    "solvers",
    "sum_rows",
    "sum_weighting",
    "trimmed_mean",
    "unravel_row",
    "upgrad",
    "upgrad_weighting",
    "value_and_gramian",
    "value_and_jacobian",
    "value_and_weighted_grad",
]

# Names of the 0.1 API. Renamed ones still work, with a warning that names the new spelling;
# removed ones fail with a message that does.
_RENAMED = {
    "sum": ("sum_rows", "jaxjd.sum shadowed the builtin"),
    "random": ("rlw", "jaxjd.random shadowed a module name"),
    "Aggregator": ("aggregation.AbstractAggregator", "one protocol for every method"),
    "Weighting": ("aggregation.AbstractWeighting", "one protocol for every method"),
}
_REMOVED = {
    "StatefulWeighting": "every weighting is now a jaxjd.aggregation.AbstractWeighting, with "
    "init/update (stateless ones have an EmptyState and can also be called)",
    "StatefulAggregator": "every aggregator is now a jaxjd.aggregation.AbstractAggregator, with "
    "init/update",
    "StatefulGramianAggregator": "use jaxjd.aggregation.GramianWeightedAggregator(weighting), "
    "which takes stateful weightings too",
    "ShapeWeighting": "subclass jaxjd.aggregation.AbstractWeighting and set reads_gramian = False",
    "ExcessMTLWeighting": "use jaxjd.aggregation.ExcessMTL (aggregate(J, state).weights are its "
    "weights)",
    "excess_mtl_weighting": "use jaxjd.excess_mtl() (aggregate(J, state).weights are its weights)",
}


def __getattr__(name: str):
    if name in _RENAMED:
        new, why = _RENAMED[name]
        _warnings.warn(
            f"jaxjd.{name} is deprecated ({why}): use jaxjd.{new}.",
            DeprecationWarning,
            stacklevel=2,
        )
        obj = globals()
        for part in new.split("."):
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        return obj
    if name in _REMOVED:
        raise AttributeError(f"jaxjd.{name} was removed: {_REMOVED[name]}.")
    if name in aggregation.__all__:
        _warnings.warn(
            f"jaxjd.{name} moved: use jaxjd.aggregation.{name} (the top level keeps the "
            "snake_case spellings).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(aggregation, name)
    raise AttributeError(f"module 'jaxjd' has no attribute {name!r}")

"""Engines: from a loss function to its Jacobian ``J``, its Gramian ``G = J J^T``, or, fused with
a weighting, the aggregated gradient ``J^T w`` (the pipeline ``J -> G -> w -> J^T w``).

* :func:`value_and_jacobian` (and :func:`mean_over_microbatches`): ``J`` itself.
* :func:`value_and_gramian`: ``G`` by the Jacobian, by columns (never holding ``J``), per sample
  (the ghost Gramian of per-sample losses) or layer by layer.
* :func:`mtl_value_and_jacobian`, :func:`mtl_value_and_gramian`: a shared trunk and task heads.
* :func:`value_and_weighted_grad`, :func:`mtl_value_and_grad`: the fused step.
"""

from ._fused import mtl_value_and_grad, value_and_weighted_grad
from ._gramian import METHODS, value_and_gramian
from ._jacobian import mean_over_microbatches, value_and_jacobian
from ._layerwise import LayerwiseFactors, task_gramian_vjp, task_weighted_grad
from ._mtl import mtl_value_and_gramian, mtl_value_and_jacobian
from ._per_sample import PerSampleFactors, per_sample_gramian_parts, weighted_grad_from_factors

__all__ = [
    "METHODS",
    "LayerwiseFactors",
    "PerSampleFactors",
    "mean_over_microbatches",
    "mtl_value_and_grad",
    "mtl_value_and_gramian",
    "mtl_value_and_jacobian",
    "per_sample_gramian_parts",
    "task_gramian_vjp",
    "task_weighted_grad",
    "value_and_gramian",
    "value_and_jacobian",
    "value_and_weighted_grad",
    "weighted_grad_from_factors",
]

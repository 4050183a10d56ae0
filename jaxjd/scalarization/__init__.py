"""Scalarizers: losses -> one scalar (TorchJD's ``torchjd.scalarization``), through the same
protocol as the aggregators (``init`` / ``update`` with explicit state and keys; stateless ones
can be called). ``jax.grad`` of the scalar is the update.

>>> import jax, jax.numpy as jnp
>>> from jaxjd import scalarization as sc
>>> losses = jnp.array([0.5, 2.0])
>>> float(sc.Mean()(losses)), round(float(sc.STCH(mu=0.01, weights=jnp.ones(2))(losses)), 3)
(1.25, 2.0)
>>> jax.grad(sc.Constant(weights=[0.25, 0.75]))(losses)
Array([0.25, 0.75], dtype=float32)
"""

from ._abstract import AbstractScalarizer
from ._famo import FAMO, FAMOState
from ._learned import DWA, IMTLL, UW, DWAState
from ._nonlinear import COSMOS, PBI, STCH, GeometricMean
from ._simple import Constant, Mean, Random, Sum

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IMTLL",
    "PBI",
    "UW",
    "STCH",
    "AbstractScalarizer",
    "Constant",
    "DWAState",
    "FAMOState",
    "GeometricMean",
    "Mean",
    "Random",
    "Sum",
]

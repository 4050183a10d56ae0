"""SPMD helpers: how jaxjd's small m x m work stays whole when the arrays around it are sharded.

* Under ``jax.jit`` with sharded inputs (``NamedSharding``, Auto or Explicit mesh axes), XLA would
  otherwise partition the QP solvers' loops along the batch (all-reduces of loop predicates,
  all-to-alls of lanes): :func:`replicated` pins ``G`` and ``w`` whole on every device.
* Under ``shard_map`` (its varying-axes check on), JAX sums the derivative of device-varying
  losses with respect to replicated parameters over the devices: :func:`vary` (and
  :func:`vary_like`) make the parameters, perturbations and cotangent bases vary like the
  batch, so that per-sample rows stay local; :func:`whole_along` gathers what must be global;
  :func:`mean_over` averages what JAX may already have summed.
* jaxlib's CPU LAPACK kernels split a batch of matrices over the intra-op thread pool; with
  several CPU devices running at once that can deadlock (device threads wait in
  ``ParallelBatchMap`` for pool tasks that never run; jaxlib 0.10.2):
  :func:`one_matrix_at_a_time` (and :func:`cholesky`, :func:`cho_solve`, :func:`solve`,
  :func:`eigh`, :func:`eigvalsh`, :func:`svd`, :func:`qr`, :func:`qr_r`,
  :func:`solve_upper`) factor one matrix per call there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def _mesh_of(x):
    """The (abstract) mesh of ``x``'s type, else the context mesh; ``None`` on one device."""
    try:
        sharding = jax.typeof(x).sharding
        mesh = getattr(sharding, "mesh", None)
    except (AttributeError, TypeError):
        mesh = None
    if mesh is None or mesh.empty:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    return mesh


def replicated(tree: Any) -> Any:
    """``tree`` with every array leaf whole on every device of the mesh it lives on: a
    ``reshard`` over Explicit axes, a sharding constraint over Auto ones, nothing over Manual
    axes (inside ``shard_map``) or off a mesh."""

    def one(x):
        if not _is_array(x):
            return x
        mesh = _mesh_of(x)
        if mesh is None:
            return x
        types = set(mesh.axis_types)
        if AxisType.Manual in types:
            return x
        whole = NamedSharding(mesh, P())
        if AxisType.Explicit in types:
            x = jax.sharding.reshard(x, whole)
        if AxisType.Auto in types:
            x = jax.lax.with_sharding_constraint(x, whole)
        return x

    return jax.tree_util.tree_map(one, tree)


def whole_along(x: jax.Array, axis: int, axis_name: Any = None) -> jax.Array:
    """``x`` whole along its batch ``axis``: replicated under ``jit`` (sharded or not), or
    all-gathered over ``axis_name`` inside ``shard_map`` (device after device; invariant, so
    that the solvers downstream run as on one device)."""
    if axis_name is None:
        return replicated(x)
    return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True, to="invarying")


def varying_axes(*trees: Any) -> tuple:
    """The ``shard_map`` axes that any array leaf of ``trees`` varies over (sorted; empty
    outside ``shard_map``)."""
    axes: set = set()
    for leaf in jax.tree_util.tree_leaves(trees):
        kind = getattr(jax.typeof(leaf), "manual_axis_type", None) if _is_array(leaf) else None
        if kind is not None:
            axes |= set(kind.varying)
    return tuple(sorted(axes, key=str))


def vary(tree: Any, axes: tuple) -> Any:
    """``tree`` with every array leaf varying over ``axes`` (``jax.lax.pcast`` of the axes a
    leaf does not vary over yet): the initial carry of a loop over device-varying data."""
    if not axes:
        return tree

    def one(x):
        if not _is_array(x):
            return x
        missing = tuple(a for a in axes if a not in varying_axes(x))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(one, tree)


def vary_like(tree: Any, *like: Any) -> Any:
    """:func:`vary` over the axes that ``like`` varies over."""
    return vary(tree, varying_axes(*like))


def _is_array(x) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.ShapeDtypeStruct)


def _several_cpu_devices() -> bool:
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def one_matrix_at_a_time(fn):
    """``fn`` (a LAPACK-backed ``jnp.linalg``/``jax.scipy.linalg`` function of single matrices),
    except that with several CPU devices a ``vmap`` of it runs one matrix at a time
    (``jax.custom_batching.sequential_vmap``). jaxlib's CPU kernels hand a batch of matrices to
    the intra-op thread pool (``ParallelBatchMap``); when other devices' threads of that pool
    wait in a collective, the tasks never run and the program deadlocks (seen with Cholesky
    and triangular solves, jaxlib 0.10.2). One matrix per call runs inline."""
    sequential = jax.custom_batching.sequential_vmap(fn)

    def call(*args):
        return sequential(*args) if _several_cpu_devices() else fn(*args)

    return call


cholesky = one_matrix_at_a_time(jnp.linalg.cholesky)
"""``jnp.linalg.cholesky``, see :func:`one_matrix_at_a_time`."""
cholesky_lower = one_matrix_at_a_time(lambda a: jax.lax.linalg.cholesky(a, symmetrize_input=False))
"""The Cholesky factor from the lower triangle alone (no symmetrisation: for matrices that are
symmetric by construction, one pass less over them), see :func:`one_matrix_at_a_time`."""
lower_inverse = one_matrix_at_a_time(
    lambda chol: jax.lax.linalg.triangular_solve(
        chol, jnp.eye(chol.shape[-1], dtype=chol.dtype), left_side=True, lower=True
    )
)
"""``L^{-1}`` for a lower triangular ``L`` (one triangular solve against the identity), see
:func:`one_matrix_at_a_time`."""
cho_solve = one_matrix_at_a_time(lambda chol, b: jax.scipy.linalg.cho_solve((chol, True), b))
"""``jax.scipy.linalg.cho_solve((chol, True), b)``, see :func:`one_matrix_at_a_time`."""
solve = one_matrix_at_a_time(jnp.linalg.solve)
"""``jnp.linalg.solve``, see :func:`one_matrix_at_a_time`."""
eigh = one_matrix_at_a_time(jnp.linalg.eigh)
"""``jnp.linalg.eigh``, see :func:`one_matrix_at_a_time`."""
eigvalsh = one_matrix_at_a_time(jnp.linalg.eigvalsh)
"""``jnp.linalg.eigvalsh``, see :func:`one_matrix_at_a_time`."""
svd = one_matrix_at_a_time(lambda a: jnp.linalg.svd(a, full_matrices=False))
"""``jnp.linalg.svd(a, full_matrices=False)``, see :func:`one_matrix_at_a_time`."""
qr_r = one_matrix_at_a_time(lambda a: jnp.linalg.qr(a, mode="r"))
"""The triangular factor of ``jnp.linalg.qr``, see :func:`one_matrix_at_a_time`."""
qr = one_matrix_at_a_time(lambda a: jnp.linalg.qr(a))
"""``jnp.linalg.qr`` (reduced), see :func:`one_matrix_at_a_time`."""
solve_upper = one_matrix_at_a_time(
    lambda a, b: jax.scipy.linalg.solve_triangular(a, b, lower=False)
)
"""``jax.scipy.linalg.solve_triangular(a, b)`` for an upper triangular ``a``, see
:func:`one_matrix_at_a_time`."""


def whole(x: Any) -> NamedSharding | None:
    """The ``out_sharding`` for a product whose contraction may run over an Explicit mesh axis
    (JAX asks for one there): the result whole on every device; ``None`` elsewhere."""
    mesh = _mesh_of(x)
    if mesh is None or AxisType.Explicit not in set(mesh.axis_types):
        return None
    return NamedSharding(mesh, P())


def tracks_varying(axis_name: Any) -> bool:
    """Whether ``shard_map``'s varying-axes check is on (``check_vma=True``): a value cast to vary
    over ``axis_name`` then says so in its type."""
    probe = jax.lax.pcast(jnp.zeros(()), (axis_name,), to="varying")
    return axis_name in varying_axes(probe)


def mean_over(tree: Any, axis_name: Any) -> Any:
    """The mean over ``axis_name`` of each device's ``tree`` (derivatives of local losses): a
    leaf that varies is ``pmean``-ed; with the varying-axes check on, a leaf that does not was
    already summed over the devices by JAX (the derivative of device-varying losses with
    respect to replicated parameters) and is divided by the axis size."""
    if not tracks_varying(axis_name):
        return jax.lax.pmean(tree, axis_name)
    size = jax.lax.axis_size(axis_name)

    def one(x):
        if x is None:
            return x
        if axis_name in varying_axes(x):
            return jax.lax.pmean(x, axis_name)
        return x / jnp.asarray(size, x.dtype)

    return jax.tree_util.tree_map(one, tree)

"""optax integration: Jacobian aggregation as the first link of a gradient-transformation chain."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, PRNGKeyArray

from ._spmd import mean_over
from ._tree import gramian, row_dots
from ._tree import num_objectives as _num_rows
from .aggregation import AbstractAggregator, EmptyState
from .monitoring import ConflictStats, conflict_statistics


class JDAggregateState(NamedTuple):
    """State of :func:`jd_aggregate`.

    Attributes:
        key: PRNG key for random aggregators (split at every step), else ``None``.
        weights: the last weights (m,) when ``num_objectives`` was given, else ``None``.
        inner: the aggregator's own state (``EmptyState()`` for a stateless one; GradVac, PCD,
            NashMTL, ExcessMTL, ... keep theirs here).
        stats: with ``monitor=True``, this step's
            :class:`~jaxjd.monitoring.ConflictStats` (cosines, conflict fraction, directional
            derivatives of the update, ...), else ``None``.
    """

    key: PRNGKeyArray | None
    weights: Array | None
    inner: Any = EmptyState()
    stats: ConflictStats | None = None


class _OpaqueState:
    """Stands for an aggregator's state in ``optax.tree_map_params``'s placeholder state."""


def _check_jacobian_of(updates, params) -> None:
    """Trace-time check that ``updates`` is a Jacobian of ``params``: the same structure, every
    leaf shaped ``(m, *param.shape)``. A plain gradient (or ``jd_aggregate`` placed after a
    transformation that already reduced the Jacobian) would otherwise be read as a Jacobian of
    smaller parameters and aggregated into a wrong update."""
    u_leaves, u_def = jax.tree_util.tree_flatten(updates)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    hint = (
        "jd_aggregate takes the Jacobian (the params' structure with a leading axis m on every "
        "leaf, e.g. from jaxjd.value_and_jacobian) and must come first in an optax chain"
    )
    if u_def != p_def:
        raise ValueError(f"{hint}; got updates with structure {u_def} for params {p_def}.")
    for u, p in zip(u_leaves, p_leaves):
        if jnp.shape(u)[1:] != jnp.shape(p) or jnp.ndim(u) != jnp.ndim(p) + 1:
            raise ValueError(
                f"{hint}; got a leaf of shape {jnp.shape(u)} for a parameter of shape "
                f"{jnp.shape(p)} (a plain gradient is shaped like the params)."
            )


def jd_aggregate(
    aggregator: AbstractAggregator,
    *,
    num_objectives: int | None = None,
    seed: int = 0,
    monitor: bool = False,
    axis_name: Hashable | None = None,
) -> optax.GradientTransformationExtraArgs:
    """An optax transformation that turns a Jacobian pytree into a params-shaped update.

    ``update(jacobian, state, params=None, *, key=None, losses=None, **extra)`` takes the Jacobian
    (the params' structure with a leading axis m on every leaf) and returns ``aggregator``'s
    update. It must come **first** in a chain: wrappers that build params-shaped state or mix
    their input with their output (``optax.MultiSteps``, ``optax.apply_if_finite``, lookahead)
    may only wrap what comes after it, e.g. ``optax.chain(jd_aggregate(agg),
    optax.MultiSteps(optax.adam(1e-3), 4).gradient_transformation())``.
    Mask or label callables of ``optax.partition``/``optax.masked`` see Jacobian-shaped leaves:
    use static label trees.

    Stateful aggregators (``jaxjd.gradvac()``, ``jaxjd.pcd()``, ``jaxjd.nash_mtl()``,
    ``jaxjd.excess_mtl()``, ...) keep their state in ``JDAggregateState.inner``; they need
    ``num_objectives`` so that ``init(params)`` can size it.

    Args:
        aggregator: any jaxjd aggregator, e.g. ``jaxjd.upgrad()``.
        num_objectives: m; when given, the last weights are kept in the state for monitoring.
            Required for stateful aggregators and ``monitor``.
        seed: seeds the PRNG key kept in the state for random aggregators (``key=`` overrides).
        monitor: keep this step's conflict statistics in ``state.stats`` (one extra m x m
            Gramian, which XLA shares with the aggregator's own under ``jit``).
        axis_name: inside ``shard_map`` with the batch split over this mesh axis and the
            Jacobian (and ``losses``) those of the local batch's mean losses: aggregate their
            means over the axis, the Jacobian of the global mean losses (an all-reduce of J:
            m gradients; ``mtl_value_and_grad(method="layerwise", axis_name=)`` moves only the
            layers' activations and cotangents). With ``shard_map``'s varying-axes check on
            (its default), a Jacobian leaf that does not vary over the axis was already summed
            over the devices by JAX (derivatives of each device's losses with respect to
            replicated parameters) and is divided by the device count instead. Under
            ``jax.jit`` with the batch sharded no axis name is needed.

    ``optax.tree_map_params(tx, f, state)`` maps ``f`` over the params-shaped parts of the
    chain's state; the aggregator's own state (``inner``) counts as one non-params field.

    >>> import jax.numpy as jnp, optax, jaxjd as jd
    >>> tx = optax.chain(jd.jd_aggregate(jd.upgrad(), num_objectives=2), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> J = {"w": jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}
    >>> updates, state = tx.update(J, state, params)
    >>> [round(float(x), 4) for x in updates["w"]]
    [-0.2929, -1.9004, -1.9004]
    """
    if not isinstance(aggregator, AbstractAggregator):
        raise TypeError(
            f"jd_aggregate needs a jaxjd aggregator (an AbstractAggregator, e.g. jd.upgrad()); got "
            f"{type(aggregator).__name__}."
        )
    needs_key = aggregator.needs_key
    stateful = aggregator.stateful
    if num_objectives is not None and (int(num_objectives) != num_objectives or num_objectives < 1):
        raise ValueError(f"num_objectives must be a positive integer; got {num_objectives}.")
    if monitor and num_objectives is None:
        raise ValueError("monitor=True needs num_objectives=m to size the statistics.")
    if stateful and num_objectives is None:
        raise ValueError(
            f"{type(aggregator).__name__} is stateful: pass num_objectives=m to jd_aggregate so "
            "that init(params) can build its state."
        )

    def init(params: Any) -> JDAggregateState:
        # Only shapes matter: works on abstract params.
        key = jax.random.key(seed) if needs_key else None
        weights = None if num_objectives is None else jnp.zeros((num_objectives,), jnp.float32)
        inner = EmptyState()
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves or not all(hasattr(p, "shape") for p in leaves):
            # optax.tree_map_params initialises with a placeholder in place of the params: the
            # aggregator's state is then one opaque field (it is not shaped like the params).
            inner = _OpaqueState()
        elif num_objectives is not None:
            jacobian = jax.tree_util.tree_map(
                lambda p: jax.ShapeDtypeStruct((num_objectives, *jnp.shape(p)), jnp.result_type(p)),
                params,
            )
            inner = aggregator.init(jacobian)
        stats = None
        if monitor:
            stats = conflict_statistics(
                jnp.zeros((num_objectives, num_objectives)), jnp.zeros((num_objectives,))
            )
        return JDAggregateState(key, weights, inner, stats)

    def update(updates, state, params=None, *, key=None, losses=None, **extra_args):
        del extra_args
        if params is not None:
            _check_jacobian_of(updates, params)
        m = _num_rows(updates)
        if num_objectives is not None and m != num_objectives:
            raise ValueError(
                f"jd_aggregate was built for num_objectives={num_objectives} but the Jacobian "
                f"has m = {m} rows."
            )
        if axis_name is not None:  # the Jacobian of the global mean losses
            updates = mean_over(updates, axis_name)
            if losses is not None:
                losses = jax.lax.pmean(losses, axis_name)
        new_key = state.key
        step_key = key
        if needs_key and key is None:
            new_key, step_key = jax.random.split(state.key)
        out, w, inner = aggregator.aggregate(updates, state.inner, key=step_key, losses=losses)
        weights = state.weights
        if weights is not None and w is not None:
            weights = w.astype(weights.dtype)
        stats = state.stats
        if monitor:
            G = gramian(updates).astype(jnp.float32)
            if w is not None:
                stats = conflict_statistics(G, w)
            else:
                stats = conflict_statistics(G, directional_derivatives=row_dots(updates, out))
            stats = jax.tree_util.tree_map(
                lambda new, old: new.astype(old.dtype), stats, state.stats
            )
        return out, JDAggregateState(new_key, weights, inner, stats)

    return optax.GradientTransformationExtraArgs(init, update)  # pyright: ignore[reportArgumentType]

r"""The one protocol of every method, in the optax manner.

A **weighting** maps a Gramian :math:`G = J J^\top` (m x m) to weights :math:`w` (m,); an
**aggregator** maps a Jacobian pytree (leaves with a leading axis m) to an update shaped like
one row. Both have explicit state, empty for the stateless methods::

    state = method.init(m)                     # weighting: init(m, dtype); aggregator: init(J)
    w, state = weighting.update(G, state, key=key)
    update, state = aggregator.update(J, state, key=key)
    update, state = aggregator.update(J, state, losses=losses)  # methods that read the losses
    w = weighting(G)                           # the plain call: stateless methods only
    update = aggregator(J)

Three bases: :class:`AbstractWeighting`, :class:`AbstractAggregator` and
:class:`GramianWeightedAggregator` (``J^T w`` around any weighting). A method implements one
hook (``_weigh`` or ``_aggregate``) and, when it keeps state, ``_init``; the public methods are
never overridden.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from .._spmd import replicated, varying_axes
from .._tree import (
    accumulation_dtype,
    accumulation_dtype_of,
    check_gramian,
    combine,
    gramian,
    num_objectives,
    power_of_two_exponent,
)
from ._fields import declared_signature

__all__ = [
    "AbstractAggregator",
    "AbstractWeighting",
    "Aggregation",
    "EmptyState",
    "GramianWeightedAggregator",
]


class EmptyState(NamedTuple):
    """The state of a stateless method (optax's ``EmptyState``)."""


class Aggregation(NamedTuple):
    """What :meth:`AbstractAggregator.aggregate` returns.

    Attributes:
        update: the aggregated update, shaped like one row of the Jacobian.
        weights: ``w`` with ``update = J^T w`` (m,), or ``None`` for methods that are not a
            weighting of the rows (GradDrop, TrimmedMean).
        state: the new state.
    """

    update: PyTree[Array]
    weights: Float[Array, " m"] | None
    state: Any


def _hashable(leaf):
    if isinstance(leaf, np.ndarray):
        return (leaf.shape, leaf.dtype.str, leaf.tobytes())
    return leaf


def _parts(module: eqx.Module) -> list:
    """The weightings and aggregators a method is built from (its fields)."""
    out = []
    for value in vars(module).values():
        if isinstance(value, (AbstractWeighting, AbstractAggregator)):
            out.append(value)
    return out


class _Method(eqx.Module):
    """What weightings and aggregators share: the key and state flags (not a public base)."""

    draws_key: ClassVar[bool] = False
    """Whether the method itself draws random numbers from ``key=``."""
    has_state: ClassVar[bool] = False
    """Whether the method itself keeps state between steps (its ``_init`` builds it)."""
    reads_losses: ClassVar[bool] = False
    """Whether the method itself reads the loss values (``losses=``, shape (m,)): its hook then
    receives them as a last argument (a property where a hyper-parameter decides)."""

    def __hash__(self) -> int:
        # Number-valued hyper-parameters are numpy leaves (traced when the method is passed
        # to a jitted function); hash their values, so that a configured method can still be
        # jitted (jax.jit(jd.upgrad())) or passed as a static argument.
        leaves, treedef = jax.tree_util.tree_flatten(self)
        return hash((treedef, tuple(_hashable(leaf) for leaf in leaves)))

    @property
    def needs_key(self) -> bool:
        """Whether ``key=`` is used: the method or a part of it draws random numbers. Methods
        that draw none accept a key and ignore it (as equinox layers do), so that one loop can
        pass a key to every method."""
        return self.draws_key or any(part.needs_key for part in _parts(self))

    @property
    def needs_losses(self) -> bool:
        """Whether ``losses=`` is required: the method or a part of it reads the loss values
        (LibMTL's loss-based normalisers, MoCo, DB-MTL). Methods that read none accept
        ``losses=`` and ignore it, so that one loop can pass the losses to every method."""
        return self.reads_losses or any(part.needs_losses for part in _parts(self))

    @property
    def stateful(self) -> bool:
        """Whether the state is not empty: use ``init`` and ``update`` instead of calling."""
        return self.has_state or any(part.stateful for part in _parts(self))

    def _refuse_stateful(self, what: str) -> None:
        if self.stateful:
            raise TypeError(
                f"{type(self).__name__} is stateful: use state = method.init(...) and "
                f"{what}, state = method.update(..., state) instead of calling it."
            )


def _refuse_state_argument(method: _Method, call: str, extra: tuple, instead: str) -> None:
    """A clear error for a state passed where none is taken (the 0.1 API's ``weights(J, state)``)
    instead of Python's bare count of positional arguments."""
    if extra:
        raise TypeError(
            f"{type(method).__name__}.{call} takes one positional argument (got "
            f"{1 + len(extra)}): a state goes through {instead}."
        )


def _checked_losses(method: _Method, losses, m: int):
    """The losses a method reads, checked at trace time (``None`` when it reads none: then
    whatever was passed is ignored)."""
    if not method.needs_losses:
        return None
    name = type(method).__name__
    if losses is None:
        raise ValueError(
            f"{name} reads the loss values: pass losses= (the m = {m} losses of this step, "
            "e.g. from value_and_jacobian)."
        )
    losses = jnp.asarray(losses)
    if not jnp.issubdtype(losses.dtype, jnp.floating) or losses.shape != (m,):
        raise ValueError(
            f"{name}: losses= must be a floating vector of the m = {m} losses; got "
            f"{losses.dtype}{list(losses.shape)}."
        )
    return jax.lax.stop_gradient(losses)


def _hook_args(method: _Method, losses) -> tuple:
    """The hook's trailing arguments: the losses, for a method that reads them."""
    return (losses,) if method.needs_losses else ()


def _check_state(expected, state, method: str, how: str) -> None:
    """Raises when ``state`` is not shaped like the state ``init`` would build."""
    got = jax.tree_util.tree_structure(state)
    want = jax.tree_util.tree_structure(expected)
    shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(state)]
    want_shapes = [x.shape for x in jax.tree_util.tree_leaves(expected)]
    if got == want:
        for have, need in zip(shapes, want_shapes):
            square = len(have) == len(need) == 2 and have[0] == have[1] and need[0] == need[1]
            if (
                len(have) == len(need) >= 1
                and have[0] != need[0]
                and (have[1:] == need[1:] or square)
            ):
                raise ValueError(
                    f"The number of objectives changed: the state given to {method}.update was "
                    f"built for m = {have[0]}, and this input has m = {need[0]}. Build a new "
                    f"state with {how}."
                )
    if got != want or shapes != want_shapes:
        raise ValueError(
            f"The state given to {method}.update does not fit this input: build it with {how} "
            f"(expected {want} with shapes {want_shapes}; got {got} with shapes {shapes})."
        )


class AbstractWeighting(_Method):
    r"""Maps a Gramian :math:`G = J J^\top` (m x m) to weights :math:`w` (m,).

    Subclasses implement ``_weigh(G, state, key) -> (w, state)``, where ``G`` is already a
    float32/float64 constant (``stop_gradient``) and ``state`` fits the input; stateful ones
    set ``has_state = True`` and implement ``_init(m, dtype)``; ones that read the loss values
    set ``reads_losses`` and implement ``_weigh(G, state, key, losses)``. ``reads_gramian = False``
    marks a weighting that only reads m (an aggregator built on it never forms ``G``; ``_weigh``
    then receives a ``jax.ShapeDtypeStruct``). Number-valued hyper-parameters are array
    leaves, so a new value does not retrace a jitted step.
    """

    reads_gramian: ClassVar[bool] = True
    # The degree p with w(t G) = t^p w(G) for every t > 0 (0: scale-invariant), or None when the
    # weights have no such law. With a degree, an aggregator forms G from J scaled by a power of
    # two when J J^T overflows or underflows (see _gramian_in_range) and calls _weigh_at_scale.
    scale_degree: ClassVar[float | None] = None

    @property
    def scale_invariant(self) -> bool:
        """True when ``w(t G) = w(G)`` for every ``t > 0``."""
        return self.scale_degree == 0

    @property
    def rescalable(self) -> bool:
        """True when an aggregator may give it the Gramian of J scaled by a power of two
        (:meth:`_weigh_at_scale`): it has a :attr:`scale_degree`, or its own rule (a state
        kept at the true scale, a program with the true scale in it)."""
        own = type(self)._weigh_at_scale is not AbstractWeighting._weigh_at_scale
        return self.scale_degree is not None or own

    def init(self, num_objectives: int, dtype: Any = jnp.float32) -> Any:
        """The initial state for ``num_objectives`` objectives (``EmptyState()`` when
        stateless); ``dtype`` is the Gramians' dtype (state is kept in float32 or float64)."""
        if int(num_objectives) != num_objectives or num_objectives < 1:
            raise ValueError(f"num_objectives must be a positive integer; got {num_objectives}.")
        return self._init(int(num_objectives), accumulation_dtype(dtype))

    def update(
        self,
        gramian: Float[Array, "m m"] | jax.ShapeDtypeStruct,
        state: Any,
        /,
        *,
        key: PRNGKeyArray | None = None,
        losses: Float[Array, " m"] | None = None,
    ) -> tuple[Float[Array, " m"], Any]:
        """``(weights, new_state)`` for this step's Gramian (``losses``: the m loss values, for
        the methods that read them)."""
        m = check_gramian(gramian)
        losses = _checked_losses(self, losses, m)
        dtype = accumulation_dtype(gramian.dtype)
        if self.stateful or not isinstance(state, EmptyState):
            expected = jax.eval_shape(lambda: self._init(m, dtype))
            _check_state(expected, state, type(self).__name__, "init(m)")
        # The same precision context as an aggregator's call: it is part of jit's cache key,
        # so weighting(G) and aggregator(J) share one compiled program.
        with jax.default_matmul_precision("highest"):
            return _weigh_jit(self, gramian, state, key, losses)

    def __call__(
        self,
        gramian: Float[Array, "m m"],
        *state: Any,
        key: PRNGKeyArray | None = None,
        losses: Float[Array, " m"] | None = None,
    ) -> Float[Array, " m"]:
        """The weights of a stateless weighting."""
        _refuse_state_argument(self, "__call__", state, "w, state = method.update(G, state)")
        self._refuse_stateful("weights")
        return self.update(gramian, EmptyState(), key=key, losses=losses)[0]

    def _init(self, m: int, dtype: Any) -> Any:
        return EmptyState()

    @abc.abstractmethod
    def _weigh(self, gramian, state, key) -> tuple[Float[Array, " m"], Any]:
        """``(weights, new_state)`` (traced once per configuration and shape)."""

    def _weigh_at_scale(self, gramian, log2_t, state, key, *losses):
        """``(weights, new_state)`` for the Gramian ``gramian * 2^-log2_t``: an aggregator
        formed ``gramian`` from J scaled by a power of two because J J^T was out of range.
        By default ``2^(-p log2_t) w(gramian)`` (p: :attr:`scale_degree`) with the state as it
        is; a weighting whose state depends on the scale overrides this."""
        p = self.scale_degree
        if p is None:  # aggregators only call it when rescalable: a subclass's mistake
            raise TypeError(
                f"{type(self).__name__} was given a rescaled Gramian but declares no "
                "scale_degree: declare one or override _weigh_at_scale."
            )
        w, new_state = self._weigh(gramian, state, key, *losses)
        if p == 0:
            return w, new_state
        return w * jnp.exp2(-p * log2_t).astype(w.dtype), new_state


def _prepared(gramian):
    """The Gramian the hooks see: a constant in float32 or float64."""
    if isinstance(gramian, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(gramian.shape, accumulation_dtype(gramian.dtype))
    G = jnp.asarray(gramian)
    return jax.lax.stop_gradient(G.astype(accumulation_dtype(G.dtype)))


@eqx.filter_jit
def _weigh_jit(weighting, gramian, state, key, losses=None, log2_t=None, weigh=None):
    # Eager calls compile once per (structure, m, dtype) and then run fast; number-valued
    # hyper-parameters are traced. Inside a user's jit this inlines. Matrix products at full
    # precision: on GPUs the default float32 product is TF32 (a 10-bit mantissa), which breaks
    # exact solvers and the parity with TorchJD.
    G = _prepared(gramian)
    # Sharded inputs (jit with NamedSharding): the m x m problem is solved whole on every
    # device, never partitioned along the batch. Under shard_map, device-varying inputs (each
    # device its own G) go through _per_device, so that the hooks' loops stay legal.
    # log2_t: G is the Gramian of J scaled by a power of two (see _gramian_in_range).
    # weigh: replaces _hook (same arguments), e.g. to weigh from a factor of G given as G.
    weigh = _hook if weigh is None else weigh
    G, state, losses, log2_t = replicated((G, state, losses, log2_t))
    axes = varying_axes(G, state, key, losses, log2_t)
    with jax.default_matmul_precision("highest"):
        if axes:
            w, new_state = _per_device(weighting, axes, G, state, key, losses, log2_t, weigh)
        else:
            w, new_state = weigh(weighting, G, state, key, losses, log2_t)
    w, new_state = replicated((w, new_state))
    # The value policy, for every weighting: a Gramian with a NaN or Inf entry gives NaN
    # weights (never finite weights of garbage) and leaves the state as it was, so that one bad
    # step does not poison the next ones; so do non-finite losses, for a method that reads them.
    # Weights from m alone (``reads_gramian = False``: Mean, Sum, Constant, Random) ignore G,
    # its NaN entries too.
    read = (losses, G) if weighting.reads_gramian else (losses,)
    checked = [x for x in read if x is not None and not isinstance(x, jax.ShapeDtypeStruct)]
    if not checked:
        return w, new_state
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in checked]))
    return jnp.where(finite, w, jnp.nan), _keep_unless(finite, new_state, state)


def _hook(weighting, G, state, key, losses, log2_t):
    if log2_t is None:
        return weighting._weigh(G, state, key, *_hook_args(weighting, losses))
    return weighting._weigh_at_scale(G, log2_t, state, key, *_hook_args(weighting, losses))


def _per_device(weighting, axes, G, state, key, losses, log2_t=None, weigh=None):
    """The hook on device-varying inputs inside ``shard_map`` (each device its own G): the
    devices' inputs gathered, the hook vmapped over them as over invariant data (its loops
    start from plain carries), this device's result taken back. Each device solves all the
    devices' problems; a Gramian that is the same everywhere (from gathered or ``psum``-ed
    rows, as the engines' ``axis_name`` paths make it) takes the direct path. ``weigh``
    replaces :func:`_hook` (same arguments), e.g. to weigh from a factor of G."""
    weigh = _hook if weigh is None else weigh
    args = (G, state, key, losses, log2_t)
    keys = jax.tree_util.tree_map(_is_key, args)
    raw = jax.tree_util.tree_map(lambda x, k: jax.random.key_data(x) if k else x, args, keys)
    batched = jax.tree_util.tree_map(lambda x: bool(varying_axes(x)), raw)
    gathered = jax.tree_util.tree_map(
        lambda x, b: jax.lax.all_gather(x, axes, to="invarying") if b else x, raw, batched
    )

    def hook(G, state, key, losses, log2_t):
        G, state, key, losses, log2_t = jax.tree_util.tree_map(
            lambda x, k, ref: (
                jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if k else x
            ),
            (G, state, key, losses, log2_t),
            keys,
            args,
        )
        return weigh(weighting, G, state, key, losses, log2_t)

    in_axes = jax.tree_util.tree_map(lambda b: 0 if b else None, batched)
    everyone = jax.vmap(hook, in_axes=in_axes)(*gathered)
    me = jax.lax.axis_index(axes)
    return jax.tree_util.tree_map(lambda x: x[me], everyone)


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keep_unless(ok, new_state, old_state):
    """``new_state`` where ``ok``, else ``old_state`` (array leaves; PRNG keys included)."""

    def pick(new, old):
        if not isinstance(new, jax.Array | np.ndarray):
            return new
        if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
            data = jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
        return jnp.where(ok, new, old)

    return jax.tree_util.tree_map(pick, new_state, old_state)


def _as_jax(leaf):
    return jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf


def _abstract_rows(jacobian) -> tuple[int, Any]:
    """``(m, accumulation dtype)`` of a Jacobian pytree of arrays or shape structs."""
    m = num_objectives(jacobian)
    leaves = jax.tree_util.tree_leaves(jacobian)
    return m, accumulation_dtype_of(*leaves)


class AbstractAggregator(_Method):
    r"""Maps a Jacobian pytree (leaves with a leading axis m) to an update shaped like one row.

    Subclasses implement ``_aggregate(J, state, key) -> Aggregation``; stateful ones set
    ``has_state = True`` and implement ``_init(J)`` (``J`` may hold ``jax.ShapeDtypeStruct``
    leaves); ones that read the loss values set ``reads_losses`` and implement
    ``_aggregate(J, state, key, losses)``.
    """

    def init(self, jacobian: PyTree, /) -> Any:
        """The initial state for Jacobians shaped like ``jacobian`` (arrays or
        ``jax.ShapeDtypeStruct`` leaves); ``EmptyState()`` when stateless."""
        num_objectives(jacobian)
        return self._init(jacobian)

    def aggregate(
        self,
        jacobian: PyTree,
        state: Any,
        /,
        *,
        key: PRNGKeyArray | None = None,
        losses: Float[Array, " m"] | None = None,
    ) -> Aggregation:
        """The update, the weights (``None`` if the method is not a weighting) and the new
        state: everything a step can report (``losses``: the m loss values, for the methods
        that read them)."""
        losses = _checked_losses(self, losses, num_objectives(jacobian))
        jacobian = jax.tree_util.tree_map(_as_jax, jacobian)  # NumPy leaves work like arrays
        if self.stateful or not isinstance(state, EmptyState):
            _check_state(
                jax.eval_shape(lambda: self._init(jax.tree_util.tree_map(_shape_struct, jacobian))),
                state,
                type(self).__name__,
                "init(jacobian)",
            )
        # Not jitted here: a Gramian-weighted aggregator's weighting is jitted per (m, dtype),
        # so that Jacobians of every width share one compiled solver; inside a user's jit it
        # all fuses anyway.
        with jax.default_matmul_precision("highest"):
            out = self._aggregate(jacobian, state, key, *_hook_args(self, losses))
        losses_ok = None if losses is None else jnp.all(jnp.isfinite(losses))
        if losses_ok is not None:  # the value policy: a non-finite loss read gives NaN out
            nan_unless = lambda x: jnp.where(losses_ok, x, jnp.nan).astype(x.dtype)  # noqa: E731
            out = out._replace(
                update=jax.tree_util.tree_map(nan_unless, out.update),
                weights=None if out.weights is None else nan_unless(out.weights),
            )
        if self.stateful and not isinstance(self, GramianWeightedAggregator):
            # (A Gramian-weighted one already keeps its weighting's state on a non-finite G.)
            leaves = jax.tree_util.tree_leaves(jacobian)
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
            if losses_ok is not None:
                finite = finite & losses_ok
            out = out._replace(state=_keep_unless(finite, out.state, state))
        return out

    def update(
        self,
        jacobian: PyTree,
        state: Any,
        /,
        *,
        key: PRNGKeyArray | None = None,
        losses: Float[Array, " m"] | None = None,
    ) -> tuple[PyTree, Any]:
        """``(update, new_state)``, optax style."""
        out = self.aggregate(jacobian, state, key=key, losses=losses)
        return out.update, out.state

    def __call__(
        self,
        jacobian: PyTree,
        *state: Any,
        key: PRNGKeyArray | None = None,
        losses: Float[Array, " m"] | None = None,
    ) -> PyTree:
        """The update of a stateless aggregator."""
        _refuse_state_argument(self, "__call__", state, "update, state = method.update(J, state)")
        self._refuse_stateful("update")
        return self.aggregate(jacobian, EmptyState(), key=key, losses=losses).update

    def weights(
        self,
        jacobian: PyTree,
        *state: Any,
        key: PRNGKeyArray | None = None,
        losses: Float[Array, " m"] | None = None,
    ) -> Float[Array, " m"]:
        """The weights ``w`` with ``self(J) == combine(w, J)``, for a stateless method that
        weighs the rows (for a stateful one read ``aggregate(J, state).weights``)."""
        _refuse_state_argument(self, "weights", state, "aggregate(J, state).weights")
        self._refuse_stateful("aggregate(J, state).weights")
        w = self.aggregate(jacobian, EmptyState(), key=key, losses=losses).weights
        if w is None:
            raise TypeError(f"{type(self).__name__} does not weigh the rows of J.")
        return w

    def _init(self, jacobian) -> Any:
        return EmptyState()

    @abc.abstractmethod
    def _aggregate(self, jacobian, state, key) -> Aggregation:
        """The update, weights and new state (traced once per configuration and shape)."""


def _out_of_range(G, n):
    """True when ``G`` overflowed (its largest diagonal entry is not finite) or lost precision
    to underflow (below ``n tiny / eps``: the products of entries of J are then subnormal)."""
    info = jnp.finfo(G.dtype)
    top = jnp.max(jnp.diagonal(G, axis1=-2, axis2=-1), axis=-1)
    return ~(top <= info.max) | (top < float(info.tiny) / float(info.eps) * max(n, 1))


def _scaled_gramian(jacobian):
    """``(gramian(2^-e J), -2 e)`` with ``2^e`` about ``max |J|``: exact scaling, no overflow
    or underflow in ``G`` (a non-finite J stays non-finite); ``G`` is ``2^(-2e)`` times the
    Gramian of J."""
    leaves = jax.tree_util.tree_leaves(jacobian)
    e = power_of_two_exponent(leaves, leaves[0].dtype)
    factor = jnp.ldexp(jnp.ones((), leaves[0].dtype), -e)
    G = gramian(jax.tree_util.tree_map(lambda x: x * factor.astype(x.dtype), jacobian))
    return G, (-2 * e).astype(G.dtype)


@jax.custom_batching.custom_vmap
def _gramian_in_range(jacobian, G):
    """``(G, 0)`` for ``G = gramian(J)``, or where it overflowed or underflowed,
    ``(G_s, log2_t)`` with ``G_s = 2^log2_t J J^T`` the Gramian of J scaled by a power of two:
    a weighting with a :attr:`~AbstractWeighting.scale_degree` turns weights of ``G_s`` into
    those of ``J J^T`` (``_weigh_at_scale``), and the update ``J^T w`` uses J unscaled. The
    rescaled Gramian is formed only when needed (a ``cond``; under vmap once for the whole
    batch if any member needs it: its batching rule)."""
    n = sum(int(np.prod(x.shape[1:])) for x in jax.tree_util.tree_leaves(jacobian))
    zero = jnp.zeros((), G.dtype)
    return jax.lax.cond(_out_of_range(G, n), _scaled_gramian, lambda _: (G, zero), jacobian)


@_gramian_in_range.def_vmap
def _gramian_in_range_batched(axis_size, in_batched, jacobian, G):
    J_batched, G_batched = in_batched
    if not any(jax.tree_util.tree_leaves(J_batched)) and not G_batched:
        return _gramian_in_range(jacobian, G), False
    jacobian = jax.tree_util.tree_map(
        lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *x.shape)), jacobian, J_batched
    )
    G = G if G_batched else jnp.broadcast_to(G, (axis_size, *G.shape))
    n = sum(int(np.prod(x.shape[2:])) for x in jax.tree_util.tree_leaves(jacobian))
    bad = _out_of_range(G, n)

    zero = jnp.zeros((axis_size,), G.dtype)

    def fix(G):
        new, log2_t = jax.vmap(_scaled_gramian)(jacobian)
        return jnp.where(bad[:, None, None], new, G), jnp.where(bad, log2_t, zero)

    return jax.lax.cond(jnp.any(bad), fix, lambda G: (G, zero), G), (True, True)


# Jitted so that eager calls hit a compile cache: an eager ``cond`` under ``custom_vmap``
# retraces both branches on every call (0.1 s a call measured for ConFIG at 20 x 100); inside a
# user's jit this inlines.
gramian_in_range = jax.jit(_gramian_in_range)


def _shape_struct(leaf):
    return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf))


class GramianWeightedAggregator(AbstractAggregator):
    r"""``A(J) = J^\top w`` with ``w = weighting(J J^\top)``: the Gramian pipeline.

    ``GramianWeightedAggregator(weighting)`` wraps any weighting, a user's own included. A
    method's aggregator class only names its weighting (``weighting_class = UPGradWeighting``)
    and takes the same arguments, e.g. ``UPGrad(pref_vector=p)``. Because the weights depend on
    ``J`` only through its Gramian, the same weighting can be fed a Gramian from any engine and
    the update formed as ``grad(w . losses)``.
    """

    weighting: AbstractWeighting
    weighting_class: ClassVar[type[AbstractWeighting] | None] = None

    def __init__(self, weighting: AbstractWeighting):
        if not isinstance(weighting, AbstractWeighting):
            raise TypeError(
                "GramianWeightedAggregator wraps a jaxjd weighting (an AbstractWeighting); got "
                f"{type(weighting).__name__}."
            )
        self.weighting = weighting

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        weighting_class = cls.__dict__.get("weighting_class")
        if weighting_class is None:
            return

        def __init__(self, *args, **hyper):
            self.weighting = weighting_class(*args, **hyper)

        params = list(declared_signature(weighting_class).parameters.values())
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        __init__.__signature__ = inspect.Signature([self_param, *params])  # type: ignore[attr-defined]
        __init__.__doc__ = f"Takes the arguments of :class:`{weighting_class.__name__}`."
        cls.__init__ = __init__  # type: ignore[method-assign]

    def _init(self, jacobian):
        m, dtype = _abstract_rows(jacobian)
        return self.weighting.init(m, dtype)

    def _aggregate(self, jacobian, state, key, losses=None):
        m, dtype = _abstract_rows(jacobian)
        log2_t = None
        if self.weighting.reads_gramian:
            G = gramian(jacobian)
            if self.weighting.rescalable:  # weights are constants: no derivative here
                G, log2_t = gramian_in_range(*jax.lax.stop_gradient((jacobian, G)))
        else:
            G = jax.ShapeDtypeStruct((m, m), dtype)
        # The state was checked by aggregate() (init delegates to the weighting): go straight
        # to the weighting's jitted step rather than through its update(), which checks again.
        w, state = _weigh_jit(self.weighting, G, state, key, losses, log2_t)
        return Aggregation(combine(w, jacobian), w, state)

"""Jacobian pytrees: validation, Gramian, combination and the matrix view.

A *Jacobian* is any pytree whose array leaves share a leading axis ``m`` (one row per objective),
which is what ``jax.jacrev`` of a vector-valued loss returns. A plain ``(m, n)`` matrix is the
one-leaf case. Nothing here concatenates the leaves unless a method asks for coordinates.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._spmd import qr_r, whole

PyTreeJacobian = PyTree[Float[Array, "m ..."]]


def _leaves(jacobian: PyTreeJacobian, what: str = "jacobian") -> list:
    leaves = jax.tree_util.tree_leaves(jacobian)
    if not leaves:
        raise ValueError(f"The {what} has no array leaves.")
    return leaves


def num_objectives(jacobian: PyTreeJacobian) -> int:
    """Checks a Jacobian pytree at trace time and returns its number of rows ``m``.

    Raises ``ValueError`` for leaves without a leading axis, leaves that disagree on ``m`` and
    ``m = 0``, and ``TypeError`` for non-floating leaves.
    """
    leaves = _leaves(jacobian)
    ms = set()
    for leaf in leaves:
        if isinstance(leaf, (int, float)):
            raise TypeError(
                "A Jacobian's leaves must be arrays; got a Python number (a nested list is read "
                "as a pytree of numbers): pass jnp.asarray(J)."
            )
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                "Every leaf of a Jacobian needs a leading axis m (one row per objective); got a "
                "scalar leaf."
            )
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"Jacobian leaves must be floating point arrays; got dtype {dtype}.")
        ms.add(shape[0])
    if len(ms) > 1:
        raise ValueError(
            f"The leaves of a Jacobian must share their leading axis m; got m in {sorted(ms)}."
        )
    m = ms.pop()
    if m == 0:
        raise ValueError("The Jacobian has m = 0 rows: there is no objective to aggregate.")
    return m


def accumulation_dtype_of(*arrays) -> jnp.dtype:
    """The accumulation dtype of several arrays (or dtypes): float64 if any is float64."""
    dtypes = [jnp.dtype(getattr(a, "dtype", a)) for a in arrays]
    return jnp.dtype(jnp.float64 if jnp.dtype(jnp.float64) in dtypes else jnp.float32)


def accumulation_dtype(dtype) -> jnp.dtype:
    """The dtype in which Gramians are accumulated: float64 for float64 input, else float32
    (without promotion rules, so that it holds under strict dtype promotion)."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _as_rows(leaf: Array) -> Array:
    return jnp.reshape(leaf, (leaf.shape[0], -1))


def gramian(jacobian: PyTreeJacobian, *, axis_name: Hashable | None = None) -> Float[Array, "m m"]:
    r"""The Gramian :math:`G = J J^\top` of a Jacobian pytree, summed leaf by leaf.

    Each leaf is viewed as an ``(m, -1)`` matrix and contributed with
    ``Precision.HIGHEST``, accumulated in at least float32; the leaves are never concatenated.
    Under ``shard_map``, pass ``axis_name`` to ``psum`` the local Gramians of a parameter-sharded
    Jacobian.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.gramian(jnp.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
    Array([[ 18., -22.],
           [-22.,  38.]], dtype=float32)
    """
    leaves = _leaves(jacobian)
    num_objectives(jacobian)
    acc = accumulation_dtype_of(*leaves)
    total = None
    for leaf in leaves:
        if math.prod(leaf.shape[1:]) == 0:
            continue
        g = _rows_gram(leaf, acc)
        total = g if total is None else total + g
    if total is None:
        m = leaves[0].shape[0]
        total = jnp.zeros((m, m), acc)
    if axis_name is not None:
        total = jax.lax.psum(total, axis_name)
    return total


# XLA:CPU computes a wide (m, n) x (n, m) product in one dot whose kernel streams the rows badly
# (float64 at (8, 1e6): 5x slower than BLAS). Accumulating column blocks that fit in cache is as
# fast as BLAS. Only on a single CPU device: on accelerators, or with the columns sharded over
# several devices, one dot lets XLA partition the contraction and all-reduce only m x m.
_BLOCK_COLUMNS = 4096
_MIN_BLOCKS = 8


def _dot_leaves(a: Array, b: Array, acc) -> Array:
    """``a b^T`` of two leaves ``(m1, ...)`` and ``(m2, ...)``, contracting every trailing axis
    in place: a leaf sharded on any of them gives local products and one m1 x m2 all-reduce
    (a reshape to ``(m, -1)`` would gather the leaf first)."""
    axes = tuple(range(1, a.ndim))
    return jax.lax.dot_general(
        a,
        b,
        ((axes, axes), ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=acc,
        out_sharding=whole(a),
    )


def _rows_gram(leaf: Array, acc) -> Array:
    m, n = leaf.shape[0], math.prod(leaf.shape[1:])
    blocked = (
        n >= _MIN_BLOCKS * _BLOCK_COLUMNS
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
    )
    if not blocked:
        return _dot_leaves(leaf, leaf, acc)
    rows = _as_rows(leaf)
    nb = n // _BLOCK_COLUMNS

    def body(k, total):
        block = jax.lax.dynamic_slice_in_dim(rows, k * _BLOCK_COLUMNS, _BLOCK_COLUMNS, axis=1)
        return total + _dot_leaves(block, block, acc)

    total = jax.lax.fori_loop(0, nb, body, jnp.zeros((m, m), acc))
    tail = rows[:, nb * _BLOCK_COLUMNS :]
    if tail.shape[1]:
        total = total + _dot_leaves(tail, tail, acc)
    return total


def cross_gramian(jacobian1: PyTreeJacobian, jacobian2: PyTreeJacobian) -> Float[Array, "m m"]:
    r"""The cross product :math:`J_1 J_2^\top` of two Jacobians with the same structure (e.g. the
    same losses on two mini-batches), leaf by leaf: the input of MoDo and SDMGrad."""
    m1, m2 = num_objectives(jacobian1), num_objectives(jacobian2)
    if jax.tree_util.tree_structure(jacobian1) != jax.tree_util.tree_structure(jacobian2):
        raise ValueError("The two Jacobians must have the same pytree structure.")
    total = None
    for a, b in zip(_leaves(jacobian1), _leaves(jacobian2)):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"Leaf shapes differ: {a.shape} vs {b.shape}.")
        acc = accumulation_dtype_of(a, b)
        g = _dot_leaves(a, b, acc)
        total = g if total is None else total + g
    assert total is not None and total.shape == (m1, m2)
    return total


def combine(weights: Float[Array, " m"], jacobian: PyTreeJacobian) -> PyTree[Array]:
    r"""The weighted row combination :math:`J^\top w`, leaf by leaf.

    Returns a pytree with the structure of one row of the Jacobian (the parameters' structure),
    each leaf in its own dtype.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.combine(jnp.array([0.5, 0.5]), {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])})
    {'w': Array([2., 3.], dtype=float32)}
    """
    m = num_objectives(jacobian)
    if jnp.shape(weights) != (m,):
        raise ValueError(f"Expected weights of shape ({m},); got {jnp.shape(weights)}.")

    def one(leaf):
        acc = accumulation_dtype(leaf.dtype)
        out = jnp.tensordot(
            weights.astype(acc),
            leaf,
            axes=1,
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=acc,
        )
        return out.astype(leaf.dtype)

    return jax.tree_util.tree_map(one, jacobian)


def row_dots(jacobian: PyTreeJacobian, vector: PyTree[Array]) -> Float[Array, " m"]:
    r"""``J d``: each objective's directional derivative along ``d`` (a pytree shaped like one
    row of the Jacobian), leaf by leaf.

    >>> import jax.numpy as jnp, jaxjd as jd
    >>> jd.row_dots({"w": jnp.array([[1.0, 2.0], [3.0, -4.0]])}, {"w": jnp.array([1.0, 1.0])})
    Array([ 3., -1.], dtype=float32)
    """
    m = num_objectives(jacobian)
    if jax.tree_util.tree_structure(vector) != jax.tree_util.tree_structure(jacobian):
        raise ValueError("The vector's pytree structure differs from the Jacobian's.")

    def one(leaf, v):
        if jnp.shape(v) != leaf.shape[1:]:
            raise ValueError(
                f"A leaf of shape {jnp.shape(v)} does not match rows {leaf.shape[1:]}."
            )
        acc = accumulation_dtype_of(leaf, v)
        axes = tuple(range(1, leaf.ndim))
        return jax.lax.dot_general(
            leaf.astype(acc),
            jnp.asarray(v).astype(acc),
            ((axes, tuple(range(jnp.ndim(v)))), ((), ())),
            precision=jax.lax.Precision.HIGHEST,
            out_sharding=whole(leaf),
        )

    parts = jax.tree_util.tree_leaves(jax.tree_util.tree_map(one, jacobian, vector))
    return functools.reduce(jnp.add, parts, jnp.zeros((m,), parts[0].dtype))


def matrix_view(jacobian: PyTreeJacobian) -> Float[Array, "m n"]:
    """The ``(m, n)`` matrix of a Jacobian pytree: every leaf flattened, leaves concatenated.

    Only for the few methods that need coordinates; see :func:`unravel_row` for the way back.
    """
    leaves = _leaves(jacobian)
    num_objectives(jacobian)
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([_as_rows(leaf).astype(dtype) for leaf in leaves], axis=1)


def unravel_row(vector: Float[Array, " n"], jacobian: PyTreeJacobian) -> PyTree[Array]:
    """Splits an ``(n,)`` vector back into the structure of one row of ``jacobian``."""
    leaves, treedef = jax.tree_util.tree_flatten(jacobian)
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    if vector.shape != (sum(sizes),):
        raise ValueError(f"Expected a vector of shape ({sum(sizes)},); got {vector.shape}.")
    out, start = [], 0
    for leaf, size in zip(leaves, sizes):
        out.append(jnp.reshape(vector[start : start + size], leaf.shape[1:]).astype(leaf.dtype))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def check_gramian(gramian_matrix: Array | jax.ShapeDtypeStruct) -> int:
    """Checks a Gramian at trace time (square, floating, m >= 1) and returns m."""
    shape = (
        tuple(gramian_matrix.shape)
        if hasattr(gramian_matrix, "shape")
        else jnp.shape(gramian_matrix)
    )
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"A Gramian must be a square (m, m) matrix; got shape {shape}.")
    if shape[0] == 0:
        raise ValueError("The Gramian is 0 x 0: there is no objective to weigh.")
    dtype = getattr(gramian_matrix, "dtype", None) or jnp.result_type(gramian_matrix)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"A Gramian must be floating point; got dtype {dtype}.")
    return shape[0]


def power_of_two_exponent(leaves, dtype):
    """``e`` with ``2^e`` about ``max |J|`` over the leaves (0 when J is zero or not finite)."""
    top = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in leaves]))
    usable = (top > 0) & (top <= jnp.finfo(dtype).max)
    _, e = jnp.frexp(jnp.where(usable, top, 1.0))
    return e


def triangular_factor(leaves, dtype):
    """``(R, e)``: ``R`` (m x m) with ``2^-e J^T = Q R``, leaf by leaf (a QR of each leaf's
    rows, then of the stacked factors), for ``2^e`` near ``max |J|``: ``R^T R`` is the Gramian
    of ``2^-e J``, but the condition number is J's, not its square (TorchJD's ConFIG takes the
    pseudo-inverse of the matrix; an eigendecomposition of ``J J^T`` loses twice the digits)."""
    e = power_of_two_exponent(leaves, dtype)
    factor = jnp.ldexp(jnp.ones((), dtype), -e)
    m = leaves[0].shape[0]
    blocks = []
    for leaf in leaves:
        rows = jnp.reshape(leaf, (m, -1)).astype(dtype) * factor
        blocks.append(qr_r(rows.T) if rows.shape[1] > m else rows.T)
    if len(blocks) == 1 and blocks[0].shape[0] == m:
        return blocks[0], e
    stacked = jnp.concatenate(blocks, axis=0)
    if stacked.shape[0] < m:  # fewer coordinates than objectives: pad with zero rows
        stacked = jnp.concatenate([stacked, jnp.zeros((m - stacked.shape[0], m), dtype)])
    return qr_r(stacked), e

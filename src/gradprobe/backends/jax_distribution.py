"""`keras.distribution` on JAX: where gradprobe's compiled gradient step puts its
inputs and gradients, and statistics of sharded gradients computed where they lie.

Under `keras.distribution.set_distribution(DataParallel(...))` or
`ModelParallel(layout_map=...)` (or its `scope()`), Keras places each variable
with its layout when it is created, and its JAX trainer shards every batch
along the distribution's batch axis (`distribution.get_data_layout(shape)`)
before the jitted step. gradprobe does the same for its own step
(`gradprobe.core._functional`):

* `place_inputs`: the inputs, and the target's arguments that have the batch as
  their leading axis (labels, sample weights, class indices), get the data
  layout: arrays already laid out so are kept, others are put there
  (`jax.device_put`: a copy between devices, never through the host for JAX
  arrays). A batch that the batch axis does not divide (a single example for a
  saliency map on 4 devices) is replicated on the mesh instead: every device
  then computes the whole batch, with the same result.
* `constrain_gradients`: inside the compiled step, each weight gradient is
  constrained to its variable's sharding (`jax.lax.with_sharding_constraint`),
  so a sharded kernel's gradient stays sharded like the kernel and a
  replicated variable's gradient is the all-reduced one, on every device
  (per-example weight gradients: the batch axis first, then the variable's).
  Activation and input gradients keep the sharding XLA propagates from the
  forward pass (the batch axis for inputs and activations of a batch-sharded
  pass; a `LayoutMap`'s `".../output"` layouts apply to activations as in
  Keras' own calls).
* `replicated`: the batch of the single-example passes that `per_example=True`
  maps over (`jax.vmap`) is replicated first: with a batch-sharded mapped batch,
  XLA's SPMD partitioner returns wrong per-example Conv kernel gradients (JAX
  0.10.2; the batched gradients are right). So those passes are not split
  over the batch axis.
* `reduced_stats` and `unit_activity`: `Gradients.stats()`, `diagnose()` and
  `summary()` reduce a sharded gradient on its devices (one compiled reduction
  per shape and sharding) and bring back scalars and one flag per unit, rather
  than the whole array.

One process with several devices (GPUs, TPU cores, or host CPU devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`); the multi-process
(multi-host) case, where each process holds a part of the batch, is not
handled. Without a distribution every function here returns its argument
unchanged, at the cost of one lookup.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_LAYOUTS: dict[tuple, Any] = {}  # (id(distribution), shape) -> (distribution, sharding)
_LAYOUTS_KEPT = 64


def current() -> Any:
    """The Keras distribution in effect (`set_distribution` or a `scope()`), or `None`."""
    return keras.distribution.distribution()


# ------------------------------------------------------------------ inputs
def place_inputs(x: Any, args: dict) -> tuple[Any, dict]:
    """`(x, args)`, the inputs and a target's arguments, with every leaf whose
    leading axis is the batch laid out as Keras lays out a batch under the
    current distribution (see the module docstring). Unchanged without a
    distribution (one lookup), and for traced values (a call under the caller's
    own `jax.grad`)."""
    dist = current()
    if dist is None:
        return x, args
    leaves = keras.tree.flatten(x)
    shape = tuple(getattr(leaves[0], "shape", ())) if leaves else ()
    if not shape:
        return x, args
    batch = shape[0]
    x = keras.tree.map_structure(lambda leaf: _place(dist, leaf, batch), x)
    if args:
        args = keras.tree.map_structure(lambda leaf: _place(dist, leaf, batch), args)
    return x, args


def _place(dist: Any, leaf: Any, batch: int) -> Any:
    if isinstance(leaf, jax.core.Tracer) or not hasattr(leaf, "shape"):
        return leaf
    shape = tuple(leaf.shape)
    if not shape or shape[0] != batch:
        return leaf
    sharding = data_sharding(dist, shape)
    if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, len(shape)):
        return leaf
    return jax.device_put(leaf, sharding)


def data_sharding(dist: Any, shape: tuple) -> NamedSharding:
    """The sharding of a batch of `shape` under `dist`: its data layout
    (`get_data_layout`), or replicated on the mesh when the batch axis does not
    divide the batch. Cached per distribution and shape."""
    key = (id(dist), shape)
    kept = _LAYOUTS.get(key)
    if kept is not None and kept[0] is dist:
        return kept[1]
    sharding = dist.get_data_layout(shape).backend_layout
    if shape[0] % _shards(sharding, 0):
        sharding = NamedSharding(sharding.mesh, PartitionSpec())
    if len(_LAYOUTS) >= _LAYOUTS_KEPT:
        _LAYOUTS.pop(next(iter(_LAYOUTS)))
    _LAYOUTS[key] = (dist, sharding)
    return sharding


def _shards(sharding: NamedSharding, axis: int) -> int:
    """Into how many parts `sharding` splits array axis `axis`."""
    spec = tuple(sharding.spec)
    names = spec[axis] if axis < len(spec) else None
    if names is None:
        return 1
    names = names if isinstance(names, tuple) else (names,)
    return int(np.prod([sharding.mesh.shape[n] for n in names]))


def replicated(tree: Any) -> Any:
    """Inside a compiled step: every array leaf of `tree` constrained to be
    replicated on the current distribution's mesh (unchanged without one)."""
    dist = current()
    if dist is None:
        return tree
    sharding = NamedSharding(dist.device_mesh.backend_mesh, PartitionSpec())
    return keras.tree.map_structure(
        lambda leaf: jax.lax.with_sharding_constraint(leaf, sharding)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else leaf, tree)


# --------------------------------------------------------------- gradients
def variable_sharding(variable: Any) -> NamedSharding | None:
    """The sharding of a Keras variable's value when it spans several devices
    (a variable created under a distribution), else `None`."""
    value = getattr(variable, "value", None)
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
        return sharding
    return None


def constrain_gradients(grads: dict, owners: dict) -> dict:
    """Inside a compiled step: each weight gradient (key -> array) constrained to
    the sharding of its variable (`owners`: key -> variable), read when the step
    is traced (a variable placed anew gives new input shardings, hence a new
    trace). A gradient with one more leading axis than its variable (per
    example) is sharded along the batch axis first when the batch allows it.
    Gradients of variables on one device are returned as they are."""
    out = {}
    for key, g in grads.items():
        variable = owners.get(key)
        sharding = None if variable is None else variable_sharding(variable)
        if sharding is not None:
            rank = len(variable.shape)
            if g.ndim == rank:
                g = jax.lax.with_sharding_constraint(g, sharding)
            elif g.ndim == rank + 1:
                g = jax.lax.with_sharding_constraint(g, _per_example(sharding, g.shape, rank))
        out[key] = g
    return out


def _per_example(sharding: NamedSharding, shape: tuple, rank: int) -> NamedSharding:
    """The variable's sharding with a leading batch axis (sharded along the
    distribution's batch axis when it divides the batch and the variable does
    not use that mesh axis already)."""
    spec = tuple(sharding.spec) + (None,) * (rank - len(tuple(sharding.spec)))
    dist = current()
    first = None
    if dist is not None and dist.batch_dim_name in sharding.mesh.axis_names:
        used = {n for s in spec if s is not None for n in (s if isinstance(s, tuple) else (s,))}
        name = dist.batch_dim_name
        if name not in used and shape[0] % sharding.mesh.shape[name] == 0:
            first = name
    return NamedSharding(sharding.mesh, PartitionSpec(first, *spec))


# -------------------------------------------------------------- statistics
def is_sharded(x: Any) -> bool:
    """A concrete JAX array split over several devices (not a replicated copy,
    which any one device holds whole)."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    sharding = x.sharding
    return len(sharding.device_set) > 1 and not sharding.is_fully_replicated


@jax.jit
def device_stats(g: Any) -> dict:
    """The statistics of `gradprobe.core.stats.tensor_stats` as scalars computed
    where `g` lies (XLA reduces each shard, then combines the partial results):
    `norm`, `mean_abs`, `max_abs`, `std` over the finite entries, `zeros` (exact
    zeros) and `finite` (finite entries), the counts as int32. Jitted: callable
    inside another compiled step too (a training step's own gradients), where it
    is inlined. float16/bfloat16 are read as float32 (exactly); float32 and
    float64 are summed in their own precision."""
    if not jnp.issubdtype(g.dtype, jnp.floating) or jnp.finfo(g.dtype).bits < 32:
        g = g.astype(jnp.float32)
    finite = jnp.isfinite(g)
    count = jnp.sum(finite)
    a = jnp.where(finite, jnp.abs(g), 0)
    top = jnp.max(a) if g.size else jnp.zeros((), g.dtype)
    # Sums of entries scaled by the largest, so that squares neither overflow nor
    # underflow in float32 (as NumPy's float64 sums in `tensor_stats` do not).
    scale = jnp.where(top > 0, top, 1)
    s = jnp.where(finite, g, 0) / scale
    n = jnp.maximum(count, 1).astype(g.dtype)
    mean = jnp.sum(s) / n
    dev = jnp.where(finite, s - mean, 0)
    return {"norm": scale * jnp.sqrt(jnp.sum(s * s)),
            "mean_abs": scale * jnp.sum(jnp.abs(s)) / n,
            "max_abs": top,
            "std": scale * jnp.sqrt(jnp.sum(dev * dev) / n),
            "zeros": jnp.sum(g == 0),
            "finite": count}


def reduced_stats(x: Any) -> dict | None:
    """`gradprobe.core.stats.tensor_stats` of a sharded array, computed on its
    devices in its dtype (float32 at least) and read back as scalars; `None` for
    any other array (the caller computes the exact float64 statistics on the
    host then). Equal to `tensor_stats` within float32 rounding."""
    if not is_sharded(x):
        return None
    r = jax.device_get(device_stats(x))
    size = int(np.prod(x.shape, dtype=np.int64))
    finite = int(r["finite"])
    empty = finite == 0
    return {
        "shape": tuple(int(d) for d in x.shape),
        "norm": 0.0 if empty else float(r["norm"]),
        "mean_abs": 0.0 if empty else float(r["mean_abs"]),
        "max_abs": 0.0 if empty else float(r["max_abs"]),
        "std": 0.0 if empty else float(r["std"]),
        "zero_fraction": float(int(r["zeros"]) / size) if size else 0.0,
        "nonfinite": size - finite,
    }


@jax.jit
def _active(g: Any) -> Any:
    return jnp.any(g != 0, axis=tuple(range(g.ndim - 1)), keepdims=True)


def unit_activity(x: Any, always: bool = False) -> np.ndarray | None:
    """For a sharded array (any concrete JAX array with `always`): float32 ones
    where some entry of the unit (last axis) is non-zero, zeros where all are,
    shaped `(1, ..., 1, units)` (the same rank); computed on its devices. What
    `gradprobe.core.stats.diagnose` reads of a gradient or activation to find
    dead units, without the whole array. `None` for any other array."""
    if not (is_sharded(x) or always and isinstance(x, jax.Array)
            and not isinstance(x, jax.core.Tracer)) or x.ndim == 0:
        return None
    return np.asarray(jax.device_get(_active(x)), np.float32)

"""Device mesh, shardings of train states and batches, and multi-host set-up.

The mesh has three named axes: `data` (pure data parallelism), `fsdp` (data parallelism
whose parameters and optimiser states are sharded too) and `tensor` (model parallelism
inside a layer). The batch is split over data x fsdp.

Parameter placement comes from a rule table over parameter *paths* (regular expressions
matched against "module/submodule/param" names) mapping each dimension to a mesh axis,
followed by a generic FSDP rule: any remaining large array is sharded along its largest
dimension that the fsdp axis divides. Because a rule is a regular expression searched in the
path, optimiser states (whose paths end with the parameter's path, e.g.
"trainer/opt_state/0/mu/blocks_0/attn/query/kernel") are placed like their parameters.

Rule tables:
  GPT_RULES    Megatron-style tensor parallelism of the stage-2 GPT (see below)
  VQGAN_RULES  the stage-1 codebook split over `tensor` by codes (the layout that
               `sharded_nearest_code` searches one slice of per tensor device)

Explicit SPMD with `jax.shard_map`:
  sharded_code_counts   per-code hit counts of a batch-sharded index array: local
                        bincount, then one psum over the batch axes (stage-1 train step)
  sharded_nearest_code  nearest codebook entry with the codebook split over one axis:
                        local argmin per slice, then a cross-slice min (ties -> lowest
                        index, exactly `jnp.argmin`'s answer)

Multi-process helpers: `maybe_initialize_distributed`, `global_batch` (per-process numpy
batches -> one global array), `host_array` (a global array's whole value on every
process, for images), `data_state_restorable` (whether a checkpoint's per-process data
iterator states fit the current process count).
"""

import os
import re
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under FSDP: sharding them saves little memory
# and costs a collective each.
FSDP_MIN_SIZE = 2 ** 14

# Stage-2 GPT, Megatron style over the `tensor` axis (then generic FSDP on another dim):
#  - column parallel: q/k/v and mlp/fc kernels split their OUTPUT dim (heads / hidden
#    units), and so do their biases; attention and GELU then run on local heads/units;
#  - row parallel: attn/proj and mlp/proj kernels split their INPUT dim, so each block
#    needs one all-reduce after attention and one after the MLP;
#  - vocab parallel: the token embedding and the head split the vocabulary.
# Position embedding, LayerNorms and the row-parallel biases stay tensor-replicated.
GPT_RULES = (
    (r"attn/(query|key|value)/kernel$", (None, "tensor")),
    (r"attn/(query|key|value)/bias$", ("tensor",)),
    (r"attn/proj/kernel$", ("tensor", None)),
    (r"mlp/fc/kernel$", (None, "tensor")),
    (r"mlp/fc/bias$", ("tensor",)),
    (r"mlp/proj/kernel$", ("tensor", None)),
    (r"wte/embedding$", ("tensor", None)),
    (r"head/kernel$", (None, "tensor")),
)

# Stage-1 VQGAN: convolutions get generic FSDP only; the codebook (n_embed, dim) is split
# over `tensor` by codes.
VQGAN_RULES = (
    (r"quantize/embedding$", ("tensor", None)),
)


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> None:
  """Starts multi-process JAX when flags or the environment ask for it.

  On Cloud TPU VMs `jax.distributed.initialize()` discovers everything itself
  (set VQGAN_DISTRIBUTED=1 or pass flags); on CPU/GPU pass the coordinator address,
  process count and id, or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if jax.distributed.is_initialized():
    return
  if coordinator_address or os.environ.get("VQGAN_DISTRIBUTED") == "1":
    # Cross-process collectives of the CPU backend need gloo (ignored by TPU/GPU); it
    # must be chosen before the backend starts.
    try:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pylint: disable=broad-except
      pass
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif os.environ.get("VQGAN_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def mesh_shape(mesh_config, num_devices: int) -> Tuple[int, int, int]:
  """Resolves the config's (data, fsdp, tensor) sizes; one -1 takes the remaining devices."""
  sizes = [int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor)]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]} "
                     f"tensor={sizes[2]}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices cannot be split with the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh: data x fsdp x tensor = {int(np.prod(sizes))} but there are "
                     f"{num_devices} devices (mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}, "
                     f"mesh.tensor={sizes[2]})")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Optional[Sequence[Any]] = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    # Forced host devices or odd topologies: plain order is fine there.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_name(path) -> str:
  parts = []
  for entry in path:
    key = getattr(entry, "key", None)
    if key is None:
      key = getattr(entry, "name", None)
    if key is None:
      key = getattr(entry, "idx", entry)
    parts.append(str(key))
  return "/".join(parts)


def spec_for(name: str, shape: Tuple[int, ...], mesh: Mesh,
             rules: Sequence[Tuple[str, Tuple[Optional[str], ...]]] = ()) -> P:
  """PartitionSpec of one array: the first matching rule, then generic FSDP.

  A rule's axis is used where it divides the dimension and has more than one device (a
  size-1 axis splits nothing, and leaving the dimension free lets FSDP pick it).
  """
  spec = [None] * len(shape)
  for pattern, axes in rules:
    if re.search(pattern, name) and len(axes) == len(shape):
      for dim, axis in enumerate(axes):
        if axis is not None and mesh.shape[axis] > 1 and shape[dim] % mesh.shape[axis] == 0:
          spec[dim] = axis
      break
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and "fsdp" not in spec and int(np.prod(shape or (1,))) >= FSDP_MIN_SIZE:
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if spec[dim] is None and shape[dim] % fsdp == 0:
        spec[dim] = "fsdp"
        break
  return P(*spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules=()) -> Any:
  """NamedShardings for every leaf of a pytree of arrays or ShapeDtypeStructs."""
  def leaf_sharding(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    return NamedSharding(mesh, spec_for(_path_name(path), shape, mesh, rules))
  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles per-process numpy batches into global arrays sharded over data x fsdp."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def host_array(x: jax.Array) -> np.ndarray:
  """The whole value of a (global) array as numpy on every process.

  With several processes a batch-sharded array is not addressable from one process, so
  this is a collective then (every process must call it, in the same order).
  """
  if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
  """Largest per-device footprint (bytes) of a pytree under the given shardings."""
  leaves = jax.tree_util.tree_leaves(abstract_tree)
  specs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  total = 0
  for leaf, sharding in zip(leaves, specs):
    shard_shape = sharding.shard_shape(tuple(leaf.shape))
    total += int(np.prod(shard_shape or (1,))) * np.dtype(leaf.dtype).itemsize
  return total


def batch_devices(mesh) -> int:
  """Number of batch shards (data x fsdp)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def nearest_valid_batch(batch_size: int, multiple: int) -> int:
  """The multiple of `multiple` nearest to batch_size (ties go up; at least `multiple`)."""
  below = (batch_size // multiple) * multiple
  above = below + multiple
  if below <= 0:
    return multiple
  return below if batch_size - below < above - batch_size else above


def check_batch_size(batch_size: int, mesh, what: str, accum_steps: int = 1,
                     fix: str = "") -> None:
  """Raises ValueError unless `batch_size` splits evenly over accumulation steps, the batch
  shards (data x fsdp) of `mesh` and the processes.

  The message names the setting (`what`, e.g. "config.eval_batch_size"), both numbers and
  the nearest valid choice, so a pod config fails before anything compiles. `fix` names
  another way out (e.g. the flag that sets grad accumulation).
  """
  shards = batch_devices(mesh)
  processes = jax.process_count()
  accum_steps = max(int(accum_steps), 1)
  multiple = int(np.lcm(shards, processes)) * accum_steps
  if batch_size > 0 and batch_size % multiple == 0:
    return
  parts = [f"{shards} batch shards (mesh data x fsdp = {mesh.shape['data']} x "
           f"{mesh.shape['fsdp']})"]
  if processes > 1:
    parts.append(f"{processes} processes")
  if accum_steps > 1:
    parts.append(f"{accum_steps} accumulation steps")
  raise ValueError(
      f"{what}={batch_size} does not split over " + " and ".join(parts)
      + f": it must be a positive multiple of {multiple}; nearest valid: "
      f"{nearest_valid_batch(batch_size, multiple)}" + (f" ({fix})" if fix else ""))


def _batch_spec(mesh, rows: int):
  """Rows split over data x fsdp when they divide evenly; else replicated."""
  return BATCH_AXES if rows % batch_devices(mesh) == 0 else None


def sharded_code_counts(indices: jax.Array, n_embed: int, mesh: Optional[Mesh],
                        weights: Optional[jax.Array] = None) -> jax.Array:
  """Per-code hit counts (n_embed,) of `indices` (leading dim = batch), replicated.

  With a batch split over more than one device, each device counts its own rows and one
  psum over (data, fsdp) adds the counts up: one n_embed-sized all-reduce instead of
  gathering every index. Equals `jnp.bincount(indices.ravel(), weights, length=n_embed)`:
  exactly for the int32 counts; with float `weights` (same shape as indices) up to the
  order of the float additions.
  """
  def count(idx, w):
    flat_w = None if w is None else w.reshape(-1)
    return jnp.bincount(idx.reshape(-1), flat_w, length=n_embed)

  if (mesh is None or batch_devices(mesh) == 1
      or _batch_spec(mesh, indices.shape[0]) is None):
    return count(indices, weights)

  def local(idx, *w):
    return lax.psum(count(idx, w[0] if w else None), BATCH_AXES)

  spec = P(BATCH_AXES)
  args = (indices,) if weights is None else (indices, weights)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(args), out_specs=P())(*args)


def sharded_nearest_code(z: jax.Array, codebook: jax.Array, mesh: Optional[Mesh],
                         axis: str = "tensor") -> jax.Array:
  """Index (int32) of the nearest code for each row of z (N, D); codebook (K, D).

  The codebook is split over mesh axis `axis` by codes (K / n per device) and the rows
  of z over (data, fsdp) when N divides evenly. Each device computes the distances of its
  rows to its slice of codes only, takes the local argmin and minimum, and then two pmin
  over `axis` give the global answer: the smallest distance, and among the slices that
  reach it the lowest code index -- `jnp.argmin(squared_distances(z, codebook))`'s answer,
  exact ties included (NaN distances count as smallest, as in jnp.argmin). The one
  caveat: a slice's distances come from a smaller matmul, which may round differently in
  the last bit, so two codes equidistant to within float rounding may resolve either way.
  Without a mesh, or with `axis` of size 1, this is plain `quantizer.nearest_code`.

  Communication: two pmin of N/(data x fsdp) values over `axis`, instead of every device
  computing all N x K distances of its rows. Hook it into the quantizer's lookup to use
  it in a model (see the tests: tests/mp_worker.py `_quantizer_with_sharded_lookup_equal`).

  The index is not differentiable; inputs are stop-gradient'ed so that the function can
  sit inside a differentiated forward pass.
  """
  from vqgan_jax.models import quantizer  # pylint: disable=g-import-not-at-top
  z, codebook = lax.stop_gradient(z), lax.stop_gradient(codebook)
  if mesh is None or mesh.shape[axis] == 1 or codebook.shape[0] % mesh.shape[axis]:
    # quantizer.nearest_code, spelled out: this function may be installed in its place.
    return jnp.argmin(quantizer.squared_distances(z, codebook), axis=-1).astype(jnp.int32)
  rows = _batch_spec(mesh, z.shape[0])
  if rows is not None and axis in rows:
    rows = tuple(a for a in rows if a != axis) or None

  def local(z_local, codes_local):
    d = quantizer.squared_distances(z_local, codes_local)
    d = jnp.where(jnp.isnan(d), -jnp.inf, d)  # jnp.argmin picks the first NaN
    local_min = jnp.min(d, axis=-1)
    local_idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
    global_idx = local_idx + lax.axis_index(axis).astype(jnp.int32) * codes_local.shape[0]
    best = lax.pmin(local_min, axis)
    candidate = jnp.where(local_min == best, global_idx, jnp.iinfo(jnp.int32).max)
    return lax.pmin(candidate, axis)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(rows, None), P(axis, None)),
                       out_specs=P(rows))(z, codebook)


def data_state_restorable(manager, step: int) -> bool:
  """Whether checkpoint `step` holds a data-iterator state for this process topology.

  Grain saves one state per process (data/process_{i}-of-{n}.json). Arrays restore onto
  any mesh, but after a change in the number of processes there is no state for this
  process: the trainer then starts a fresh (reseeded) data stream instead of failing.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  folder = epath.Path(manager.directory) / str(step) / "data"
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return (folder / name).exists()

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

# Over 500 lines on purpose: the mesh, the rule tables and the batch and multi-host helpers
# are one concept (where every array lives); split, each part would import the others.

import importlib.util
import logging
import os
import re
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqgan_jax.models import quantizer

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

# Parameters stacked over layers (GPT with scan_layers): "blocks/..." (unrolled ones are
# "blocks_{i}/...").
STACKED_PATTERN = r"(^|/)blocks/"

# Stage-1 VQGAN: convolutions get generic FSDP only; the codebook (n_embed, dim) is split
# over `tensor` by codes, and so is the per-code quantizer state kept under "vq_stats"
# (vq_ema's EMA codebook -- its `embedding` matches the first rule -- sums and counts,
# simvq's frozen basis); fsq and lfq have no codebook array.
VQGAN_RULES = (
    (r"quantize/embedding$", ("tensor", None)),
    (r"vq_stats/quantize/(embed_avg|basis)$", ("tensor", None)),
    (r"vq_stats/quantize/cluster_size$", ("tensor",)),
)


# Logical activation axes -> mesh axes (MaxText's rule table, in small). Model code names
# what each activation dimension is; `constrain` maps the names onto the mesh that the
# step is traced under, so the same model runs unsharded on one device.
ACTIVATION_RULES = {
    "batch": BATCH_AXES,   # examples: split over data x fsdp
    "heads": "tensor",     # attention heads (column-parallel q/k/v)
    "mlp": "tensor",       # MLP hidden units
    "vocab": "tensor",     # logits over the vocabulary (vocab-parallel head)
}


def _axis_size(mesh, axes) -> int:
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def activation_spec(shape: Sequence[int], logical: Sequence[Optional[str]], mesh) -> P:
  """PartitionSpec of an activation whose dimensions are named by `logical` (None = not
  split); a mesh axis is used only where it divides the dimension and has > 1 device."""
  if len(logical) != len(shape):
    raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
  spec = []
  for size, name in zip(shape, logical):
    axes = ACTIVATION_RULES.get(name) if name else None
    if axes is None or any(a not in mesh.shape for a in (axes if isinstance(axes, tuple)
                                                          else (axes,))):
      spec.append(None)
      continue
    n = _axis_size(mesh, axes)
    spec.append(axes if n > 1 and size % n == 0 else None)
  return P(*spec)


def constrain(x: jax.Array, *logical: Optional[str]) -> jax.Array:
  """Pins activation `x` to the sharding its logical axes name, on the mesh the enclosing
  step is traced under (`under_mesh`); without one (plain CPU use, tests) it is x."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return lax.with_sharding_constraint(x, activation_spec(x.shape, logical, mesh))


def under_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` as the abstract mesh, so the models' `constrain` calls take
  effect; wrap a step before `jax.jit`."""
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  wrapped.__name__ = getattr(fn, "__name__", "step")
  return wrapped


def on_platform(platform: str) -> bool:
  """Whether the step being traced targets `platform` ("cpu", "tpu", "gpu"): the mesh it
  is traced under says so (ahead-of-time TPU compilation on a CPU host included), else
  the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh.abstract_device.platform == platform
  return jax.default_backend() == platform


def cloud_tpu_vm_evidence(env: "dict[str, str]", listdir, libtpu_installed: bool
                          ) -> Optional[str]:
  """Why this host looks like a Cloud TPU VM whose `jax.distributed.initialize()` can find
  its slice by itself (a short reason), or None. Pure: the caller passes the environment,
  a `listdir(path) -> names` (empty for a missing folder) and whether libtpu is installed,
  so nothing here touches the JAX backend.

  A TPU VM is a host with TPU chips attached: device files /dev/accel<N> (TPU v2-v4,
  v5e) or /dev/vfio/<N> (v5p, v6e). JAX's own TPU cluster detection also needs the chips
  (it counts them on the PCI bus) and libtpu, and asks the GCE metadata server for the
  worker list unless TPU_SKIP_MDS_QUERY is set (then only a worker list in
  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES, as on GKE, will do). Environment
  variables alone are never enough: TPU_ACCELERATOR_TYPE or TPU_WORKER_HOSTNAMES=localhost
  are also set on CPU machines that compile ahead of time for a TPU. A JAX_PLATFORMS
  without "tpu" (e.g. "cpu") means this run does not use the TPU, so no.
  """
  platforms = env.get("JAX_PLATFORMS", "").strip()
  if platforms and "tpu" not in [p.strip() for p in platforms.split(",")]:
    return None
  if not libtpu_installed:
    return None
  chips = ["/dev/" + n for n in listdir("/dev") if re.fullmatch(r"accel\d+", n)]
  chips += ["/dev/vfio/" + n for n in listdir("/dev/vfio") if re.fullmatch(r"\d+", n)]
  if not chips:
    return None
  if env.get("TPU_SKIP_MDS_QUERY") is not None:
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if not workers.strip():
      return None
  shown = ", ".join(sorted(chips)[:4]) + (", ..." if len(chips) > 4 else "")
  return f"TPU device files {shown} and libtpu present"


def _listdir_or_empty(path: str):
  try:
    return os.listdir(path)
  except OSError:
    return []


def _tpu_vm_evidence_here() -> Optional[str]:
  """cloud_tpu_vm_evidence for this process: its environment with the platforms JAX will
  use (jax_platforms, set in code or from JAX_PLATFORMS; reading it starts nothing), its
  /dev, and libtpu installed (found, not imported) or named by TPU_LIBRARY_PATH."""
  env = dict(os.environ)
  platforms = jax.config.jax_platforms
  if platforms:
    env["JAX_PLATFORMS"] = platforms
  libtpu = (importlib.util.find_spec("libtpu") is not None
            or os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")))
  return cloud_tpu_vm_evidence(env, _listdir_or_empty, libtpu)


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> None:
  """Starts multi-process JAX (`jax.distributed.initialize`) when this run is one.

  Call it before anything touches the JAX backend. In order:
    VQGAN_DISTRIBUTED=0         never (one process, whatever else is set);
    a coordinator address       the arguments, or JAX_COORDINATOR_ADDRESS with
                                JAX_NUM_PROCESSES and JAX_PROCESS_ID (CPU/GPU clusters);
    VQGAN_DISTRIBUTED=1         `jax.distributed.initialize()`, JAX detects the cluster;
    a Cloud TPU VM              the same, with nothing to set (see cloud_tpu_vm_evidence:
                                TPU device files + libtpu; a single-host VM becomes a
                                1-process distributed run, which is harmless).
  Otherwise one process. Before starting, the CPU backend's cross-process collectives are
  set to gloo (they must be chosen before the backend starts; TPU/GPU ignore it). An
  automatic start that fails says how to opt out; one that comes after the backend has
  started (the caller used JAX first) is skipped with a warning.
  """
  if jax.distributed.is_initialized():
    return
  choice = os.environ.get("VQGAN_DISTRIBUTED", "").strip()
  if choice not in ("", "0", "1"):
    raise ValueError(f"VQGAN_DISTRIBUTED must be 0, 1 or unset, got {choice!r}")
  if choice == "0":
    return
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  reason = None
  if not coordinator_address and choice != "1":
    reason = _tpu_vm_evidence_here()
    if reason is None:
      return
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except
    pass
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return
  if reason is None:  # VQGAN_DISTRIBUTED=1: the caller asked for it, errors go up as they are
    jax.distributed.initialize()
    return
  logging.info("Cloud TPU VM (%s): starting jax.distributed", reason)
  try:
    jax.distributed.initialize()
  except RuntimeError as e:
    if "before any JAX computations" not in str(e):
      raise RuntimeError(f"jax.distributed.initialize() failed on this Cloud TPU VM "
                         f"({reason}): {e}. Set VQGAN_DISTRIBUTED=0 to run as a single "
                         "process.") from e
    logging.warning("Cloud TPU VM, but the JAX backend already started before "
                    "jax.distributed.initialize(); running as a single process")
  except ValueError as e:
    raise RuntimeError(f"jax.distributed.initialize() could not find this TPU slice "
                       f"({reason}): {e}. Set VQGAN_DISTRIBUTED=0 to run as a single "
                       "process.") from e


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


def place(tree, sharding_, abstract: bool = False):
  """Puts a pytree on devices with `sharding_`, or (abstract=True, for ahead-of-time
  compilation) describes it as ShapeDtypeStructs carrying that sharding."""
  if abstract:
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding_), tree)
  return jax.device_put(tree, sharding_)


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
  # Layer-stacked parameters (the GPT's scan_layers tree, "blocks/...") carry a leading
  # layer axis: rules apply to the dimensions after it, and it is never split (the scan
  # walks it one layer at a time).
  stacked = 1 if re.search(STACKED_PATTERN, name) else 0
  for pattern, axes in rules:
    if re.search(pattern, name) and len(axes) + stacked == len(shape):
      for dim, axis in enumerate(axes, start=stacked):
        if axis is not None and mesh.shape[axis] > 1 and shape[dim] % mesh.shape[axis] == 0:
          spec[dim] = axis
      break
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and "fsdp" not in spec and int(np.prod(shape[stacked:] or (1,))) >= FSDP_MIN_SIZE:
    for dim in sorted(range(stacked, len(shape)), key=lambda d: -shape[d]):
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
                     fix: str = "", processes: Optional[int] = None) -> None:
  """Raises ValueError unless `batch_size` splits evenly over accumulation steps, the batch
  shards (data x fsdp) of `mesh` and the processes.

  The message names the setting (`what`, e.g. "config.eval_batch_size"), both numbers and
  the nearest valid choice, so a pod config fails before anything compiles. `fix` names
  another way out (e.g. the flag that sets grad accumulation); `processes` defaults to
  this run's (a dry run passes the target slice's host count).
  """
  shards = batch_devices(mesh)
  processes = jax.process_count() if processes is None else int(processes)
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
  folder = epath.Path(manager.directory) / str(step) / "data"
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return (folder / name).exists()

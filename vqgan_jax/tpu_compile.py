"""Ahead-of-time compilation of the real training steps for a TPU slice, on any host.

With libtpu installed (`make tpu-tools` puts it in `.venv-tpu`), JAX describes a TPU
slice that is not attached (`jax.experimental.topologies.get_topology_desc`), and
`jax.jit(step).lower(abstract args).compile()` runs the TPU compiler for it. What the
compiler made is then read back, as MaxText's `train_compile.py` does:

  memory_analysis()  bytes per chip: arguments, outputs, temporaries (aliased donations
                     counted once) -> `fits` against the chip's HBM
  cost_analysis()    FLOPs and bytes accessed per chip
  as_text()          the partitioned HLO: every all-gather / all-reduce / reduce-scatter /
                     all-to-all / collective-permute with its result bytes

The steps are the trainers' own (`Stage1Runner.jitted_train` / `jitted_eval`,
`Stage2Runner.jitted_train` / `jitted_eval`, and one KV-cache `GPT.decode_step` as the
sampler calls it), with the trainers' shardings, built with `abstract=True` so that no
weight file or device is touched.

Step time: libtpu 0.0.42's `optimal_seconds` comes back negative for these programs, so
the estimate is a roofline from the compiled program's own counts, max(FLOPs / peak,
bytes accessed / HBM bandwidth) per chip; it ignores collectives' latency and overlap,
so it is a lower bound on the step time, and the MFU from it an upper bound.
"""

import dataclasses
import importlib.util
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vqgan_jax import sharding
from vqgan_jax.models import transformer

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-device figures (Cloud TPU system architecture pages); a device is what
  libtpu's topology lists (a chip, or a TensorCore on v4)."""
  name: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_second: float
  chips_per_host: int


CHIPS = {
    # libtpu's v4 topologies have one device per TensorCore (no megacore): "v4:2x2x4" is
    # 32 devices, i.e. v4-32's 16 chips; figures per core (half a chip).
    "v4": Chip("TPU v4 core", 16 * GIB, 137.5e12, 0.6e12, 8),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 8.19e11, 4),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2.765e12, 4),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1.64e12, 4),
}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")


MAX_LISTED_SHAPES = 24  # distinct all-gather result shapes listed per step, largest first


class TpuCompileError(RuntimeError):
  """libtpu missing, an unknown topology, or a mesh that does not fit the slice."""


def chip_for(topology: str) -> Chip:
  kind = topology.split(":")[0].lower()
  if kind not in CHIPS:
    raise TpuCompileError(f"--topology {topology!r}: unknown chip {kind!r}; known: "
                          f"{', '.join(sorted(CHIPS))} (e.g. v5e:16x16, v4:2x2x4, v5p:4x4x4)")
  return CHIPS[kind]


def require_libtpu() -> None:
  if importlib.util.find_spec("libtpu") is None:
    raise TpuCompileError(
        "TPU compilation needs libtpu, which this Python does not have. Run `make tpu-tools` "
        "(it creates .venv-tpu: the project's environment plus libtpu) and use "
        ".venv-tpu/bin/python -m vqgan_jax.dry_run ...; or pip install "
        f"\"jax[tpu]=={jax.__version__}\" into an environment of its own (libtpu logs "
        "errors in every JAX program on a host without TPUs).")


def topology_mesh(topology: str, mesh_shape: Sequence[int]) -> Mesh:
  """A (data, fsdp, tensor) Mesh over the devices of a TPU slice described, not attached."""
  require_libtpu()
  # libtpu asks the VM metadata server for these when they are unset; on a host that is
  # not a TPU VM that only produces error lines.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Nothing runs on a chip here, so several dry runs (and the tests) may load libtpu at
  # once instead of waiting on its single-user lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import (  # pylint: disable=g-import-not-at-top  (loads libtpu)
      mesh_utils, topologies)
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # pylint: disable=broad-except
    raise TpuCompileError(f"--topology {topology!r}: libtpu cannot describe it ({e})") from e
  devices = list(desc.devices)
  shape = tuple(int(s) for s in mesh_shape)
  if int(np.prod(shape)) != len(devices):
    raise TpuCompileError(f"--mesh {','.join(map(str, shape))} has {int(np.prod(shape))} "
                          f"devices but {topology} has {len(devices)} chips")
  try:
    array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except
    array = np.asarray(devices).reshape(shape)
  return Mesh(array, sharding.MESH_AXES)


def num_hosts(mesh: Mesh) -> int:
  return len({d.process_index for d in mesh.devices.flat})


# ------------------------------------------------------------------------------- HLO


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(text: str) -> Tuple[int, List[str]]:
  total, shapes = 0, []
  for dtype, dims in _SHAPE.findall(text):
    n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    total += n * _BYTES[dtype]
    shapes.append(f"{dtype}[{dims}]")
  return total, shapes


def collectives(hlo_text: str) -> Dict[str, Any]:
  """Collective ops of a partitioned HLO module: per kind the count and the summed
  result bytes, the largest all-gather (bytes and shape) and the distinct all-gather
  result shapes (largest first), to tell gathered weights from gathered activations. Ops are counted as they
  appear in the program text: one inside a loop body (a scanned layer) runs once per
  iteration but is counted once."""
  kinds = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  largest = {"bytes": 0, "shape": ""}
  gathered = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES)
                     + r")(-start|-done)?\(", line)
    if not match or match.group(3) == "-start":
      # An async collective is counted at its -done, whose result is the output (a
      # -start's result tuple also holds the operands and sync flags).
      continue
    result_type, kind = match.group(1), match.group(2)
    size, shapes = _shape_bytes(result_type)
    kinds[kind]["count"] += 1
    kinds[kind]["bytes"] += size
    if kind == "all-gather":
      gathered[" ".join(shapes)] = size
      if size > largest["bytes"]:
        largest = {"bytes": size, "shape": " ".join(shapes)}
  biggest = sorted(gathered, key=lambda k: -gathered[k])[:MAX_LISTED_SHAPES]
  return {"ops": kinds, "largest_all_gather_bytes": largest["bytes"],
          "largest_all_gather_shape": largest["shape"], "all_gather_shapes": biggest}


# ------------------------------------------------------------------------------- report


def _cost(compiled) -> Dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def cost_counts(compiled) -> Tuple[float, float]:
  """(FLOPs, bytes accessed) per chip from XLA's cost analysis."""
  cost = _cost(compiled)
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def analyse(compiled, chip: Chip, num_chips: int, model_flops: Optional[float] = None,
            keep_hlo: Optional[str] = None,
            counts: Optional[Tuple[float, float]] = None) -> Dict[str, Any]:
  """The per-step figures the dry run reports, from one compiled executable. `counts`
  replaces the executable's own (FLOPs, bytes accessed) per chip (for a scanned model,
  whose loop body XLA counts once: see dry_run._stage2_counts)."""
  mem = compiled.memory_analysis()
  per_device = {
      "arguments": int(mem.argument_size_in_bytes),
      "outputs": int(mem.output_size_in_bytes),
      "aliased": int(mem.alias_size_in_bytes),
      "temp": int(mem.temp_size_in_bytes),
      "generated_code": int(mem.generated_code_size_in_bytes),
  }
  # Donated arguments alias their outputs: count those bytes once.
  per_device["total"] = (per_device["arguments"] + per_device["outputs"] - per_device["aliased"]
                         + per_device["temp"] + per_device["generated_code"])
  cost = _cost(compiled)
  flops, bytes_accessed = counts if counts is not None else cost_counts(compiled)
  compute_s = flops / chip.peak_bf16_flops
  memory_s = bytes_accessed / chip.hbm_bytes_per_second
  estimate = max(compute_s, memory_s)
  hlo = compiled.as_text()
  if keep_hlo:
    with open(keep_hlo, "w") as f:
      f.write(hlo)
  report = {
      "fits": per_device["total"] <= chip.hbm_bytes,
      "per_device_bytes": per_device,
      "device_memory_bytes": chip.hbm_bytes,
      "flops_per_step": flops * num_chips,
      "flops_per_device": flops,
      "bytes_accessed_per_device": bytes_accessed,
      "compiler_optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
      "estimated_step_seconds": estimate,
      "estimate_bound": "compute" if compute_s >= memory_s else "memory",
      "counts": ("every loop counted (unrolled layers / micro-batches)" if counts is not None
                 else "compiled program"),
  }
  if model_flops:
    report["model_flops_per_step"] = float(model_flops)
    report["estimated_mfu"] = (float(model_flops) / num_chips / estimate / chip.peak_bf16_flops
                               if estimate > 0 else float("nan"))
  report.update(collectives(hlo))
  return report


class DoesNotFit(Exception):
  """The TPU compiler refused the program: its temporaries exceed the chip's HBM."""

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message
    found = re.findall(r"\(([0-9.]+)([KMGT])\)", message)
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    self.required_bytes = int(float(found[0][0]) * units[found[0][1]]) if found else 0
    self.available_bytes = int(float(found[1][0]) * units[found[1][1]]) if len(found) > 1 else 0

  def report(self, chip: Chip) -> Dict[str, Any]:
    """The step's entry in the dry-run report: does not fit, with the compiler's figures."""
    return {"fits": False, "device_memory_bytes": chip.hbm_bytes,
            "per_device_bytes": {"temp": self.required_bytes, "total": self.required_bytes},
            "available_bytes": self.available_bytes,
            "compile_error": self.message.strip().splitlines()[-1][:500]}


def compile_step(jitted, args: Sequence[Any]):
  """Lowers and compiles for the topology; DoesNotFit when the compiler runs out of HBM."""
  try:
    return jitted.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text and "memory" in text.lower():
      raise DoesNotFit(text) from None
    raise


def sds(shape, dtype, sharding_) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding_)


def batch_struct(mesh: Mesh, entries: Dict[str, Tuple[Tuple[int, ...], Any]]):
  """Abstract global batch arrays split over the batch axes."""
  spec = sharding.batch_sharding(mesh)
  return {k: sds(shape, dtype, spec) for k, (shape, dtype) in entries.items()}


def cache_struct(cache, mesh: Mesh, scanned: bool):
  """A GPT KV cache as abstract arrays split over the batch axes: dimension 0 of each
  layer's arrays holds the batch (B or B * heads, batch-major), dimension 1 when the
  blocks are scanned (the layer axis leads)."""
  shards = sharding.batch_devices(mesh)
  dim = 1 if scanned else 0

  def place(x):
    spec = [None] * x.ndim
    if shards > 1 and x.shape[dim] % shards == 0:
      spec[dim] = sharding.BATCH_AXES
    return sds(x.shape, x.dtype, NamedSharding(mesh, P(*spec)))

  return {"index": sds((), jnp.int32, NamedSharding(mesh, P())),
          "layers": jax.tree_util.tree_map(place, cache["layers"])}


def decode_step_fn(gpt):
  """One KV-cache decoding step as the sampler runs it (params replicated, no mesh
  context: `vqgan_jax.sampling`)."""
  def step(params, tokens, position, cache):
    return gpt.apply({"params": params}, tokens, position, cache,
                     method=transformer.GPT.decode_step)
  return step


def abstract_param_bytes(tree) -> int:
  """Largest single array (bytes) of a pytree: what one weight all-gather can move."""
  leaves = jax.tree_util.tree_leaves(tree)
  return max((int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves), default=0)

"""Dry run of a config on a slice: what the compiler makes of it, and the formula.

Compile mode (`--topology`): the trainers' real jitted steps are compiled for a TPU slice
that is described, not attached (`vqgan_jax.tpu_compile`; needs libtpu: `make
tpu-tools`, then `.venv-tpu/bin/python`), and the compiler's memory, FLOPs and
collectives are reported per step (stage 1: train with the GAN and LPIPS, eval; stage 2:
train, eval, one KV-cache decoding step):

  .venv-tpu/bin/python -m vqgan_jax.dry_run --config configs/transformer_imagenet_cond.py \
      --topology v5e:16x16 --mesh 1,256,1 --batch_size 256 --json runs/dry/imagenet.json

Formula mode (no `--topology`): parameter and optimiser bytes per device on given meshes.

Nothing is allocated and no device is needed: the train state is built with
`jax.eval_shape`, placed with the same rules the trainers use (`sharding.VQGAN_RULES`
for stage 1, `sharding.GPT_RULES` for stage 2, generic FSDP on top) on an abstract mesh
of any size, and measured with `sharding.bytes_per_device`.

  python -m vqgan_jax.dry_run --config configs/vqgan_imagenet_f16_16384.py \
      --mesh 16,1,1 --mesh 1,16,1 --mesh 4,4,1 --mesh 2,4,2 --device_memory_gib 16
  python -m vqgan_jax.dry_run --config configs/transformer_imagenet_cond.py \
      --num_devices 32 --device_memory_gib 32        # the config's own mesh on 32 devices

Columns (per device, the largest shard of every array summed):
  params     trainable parameters (stage 1: generator + discriminator)
  grads      their gradients inside a step (placed like the parameters)
  optimizer  Adam(W) moments and counters
  frozen     replicated frozen networks (stage 1: LPIPS-VGG16 when perceptual_weight > 0;
             stage 2: the frozen VQGAN(s) if --stage1_config is given)
  static     params + grads + optimizer + frozen + other state (code-usage EMA, ...)
Activations are not included: `fits` says whether `static` fits the device memory and
how much is left for activations. The 1.4B GPT config rematerialises its blocks for that.
"""

# Over 500 lines on purpose: a command whose two modes (TPU compile, formula) share the
# abstract train states and the report tables.

import dataclasses
import importlib.util
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from vqgan_jax import (checkpointing, cli, config_lib, data, flops, handoff, sharding,
                       tpu_compile)
from vqgan_jax.models import lpips, vqgan
from vqgan_jax.training import optim
from vqgan_jax.training import stage1 as stage1_trainer
from vqgan_jax.training import stage2 as stage2_trainer

GIB = 1024 ** 3


def abstract_mesh(shape: Sequence[int]) -> AbstractMesh:
  return AbstractMesh(tuple(int(s) for s in shape), sharding.MESH_AXES)


def parse_mesh(text: str, num_devices: Optional[int] = None) -> Tuple[int, int, int]:
  """'data,fsdp,tensor' (one entry may be -1 with num_devices given) -> sizes."""
  parts = [int(p) for p in text.replace("x", ",").split(",")]
  if len(parts) != 3:
    raise ValueError(f"--mesh {text!r}: expected data,fsdp,tensor (e.g. 2,4,1)")
  if -1 in parts:
    if not num_devices:
      raise ValueError(f"--mesh {text!r} has -1: pass --num_devices")
    return sharding.mesh_shape(_mesh_cfg(parts), num_devices)
  return tuple(parts)


def _mesh_cfg(sizes):
  return ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, sizes)))


# ---------------------------------------------------------------------------- abstract state

@dataclasses.dataclass
class AbstractModel:
  """The abstract train state of one config, split into the groups that are reported."""
  stage: str
  state: Any                    # pytree of ShapeDtypeStruct (the trainer's state)
  groups: Dict[str, Any]        # name -> sub-pytree of `state` (params, optimizer, other)
  trainable: Any                # pytree whose gradients a step holds
  frozen: Any                   # replicated frozen parameters (may be empty)
  rules: Tuple
  notes: List[str]


def stage1_abstract(config) -> AbstractModel:
  setup = stage1_trainer.Stage1Setup(config)
  state = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
  t = state.trainer
  frozen = (lpips.abstract_params() if config.loss.perceptual_weight > 0
            else {})
  notes = []
  if frozen:
    notes.append("frozen = LPIPS VGG16 (replicated)")
  return AbstractModel(
      stage="vqgan", state=state,
      groups={"params": {"g_params": state.g_params, "d_params": t.d_params},
              "optimizer": {"g": t.g_opt_state, "d": t.d_opt_state},
              "other": {"step": t.step, "d_batch_stats": t.d_batch_stats,
                        "code_usage_ema": t.code_usage_ema,
                        "nonfinite_steps": t.nonfinite_steps}},
      # the quantizer state (vq_ema, simvq) has no gradient
      trainable={"g_params": vqgan.split_state(state.g_params)[0], "d_params": t.d_params},
      frozen=frozen, rules=sharding.VQGAN_RULES, notes=notes)


def stage2_abstract(config, stage1_config=None) -> AbstractModel:
  if config.first_stage.n_embed <= 0 or min(config.first_stage.latent_grid) <= 0:
    raise ValueError(
        "a stage-2 dry run needs the VQGAN's codebook size and token grid from the config: "
        "pass e.g. --config.first_stage.n_embed=16384 --config.first_stage.latent_grid=16,16")
  gpt, layout, prefix, n = handoff.stated_model(config)
  tx = optim.make_optimizer(config)

  def init(rng):
    params = gpt.init(rng, jnp.zeros((1, prefix + n - 1), jnp.int32))["params"]
    return stage2_trainer.Stage2State(params=params, trainer=stage2_trainer.TrainerState(
        step=jnp.zeros((), jnp.int32), opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32)))

  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  notes = [f"GPT vocab {gpt.vocab_size}, block {gpt.block_size}, {gpt.n_layer} layers, "
           f"width {gpt.n_embd}, {gpt.n_head} heads"]
  frozen = {}
  if stage1_config is not None:
    model = vqgan.vqmodel_from_config(stage1_config.model)
    frozen = checkpointing.abstract_vqgan_params(model, stage1_config.model.resolution)
    notes.append("frozen = the stage-1 VQGAN (replicated)")
  else:
    notes.append("frozen VQGAN not included (pass --stage1_config)")
  return AbstractModel(
      stage="transformer", state=state,
      groups={"params": state.params, "optimizer": state.trainer.opt_state,
              "other": {"step": state.trainer.step,
                        "nonfinite_steps": state.trainer.nonfinite_steps}},
      trainable=state.params, frozen=frozen, rules=sharding.GPT_RULES, notes=notes)


def abstract_model(config, stage1_config=None) -> AbstractModel:
  if config.get("stage", "vqgan") == "transformer":
    return stage2_abstract(config, stage1_config)
  return stage1_abstract(config)


def count_bytes(tree) -> int:
  """Unsharded bytes of a pytree of arrays / ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------- report

def mesh_report(model: AbstractModel, shape: Sequence[int], config=None,
                device_memory_gib: Optional[float] = None) -> Dict[str, Any]:
  """Bytes per device of each group on a mesh of the given (data, fsdp, tensor) sizes."""
  mesh = abstract_mesh(shape)
  row = {"mesh": tuple(int(s) for s in shape), "devices": int(np.prod(shape))}
  # Placed as one tree, so that the rules see the trainer's own paths.
  shardings = sharding.tree_shardings(model.state, mesh, model.rules)
  named = _named(model.state, shardings)
  for group, tree in model.groups.items():
    row[group] = sum(named[id_] for id_ in _leaf_ids(tree))
  row["grads"] = sum(named[id_] for id_ in _leaf_ids(model.trainable))
  row["frozen"] = count_bytes(model.frozen)  # the trainers replicate frozen networks
  row["static"] = row["params"] + row["grads"] + row["optimizer"] + row["other"] + row["frozen"]
  warnings = []
  if config is not None:
    batch = int(config.batch_size)
    if batch % (shape[0] * shape[1]):
      warnings.append(f"batch_size {batch} not divisible by data x fsdp = {shape[0] * shape[1]}")
    if model.stage == "transformer" and shape[2] > 1 and config.model.n_head % shape[2]:
      warnings.append(f"n_head {config.model.n_head} not divisible by tensor = {shape[2]}")
  row["warnings"] = warnings
  if device_memory_gib:
    row["fits"] = row["static"] <= device_memory_gib * GIB
    row["free_gib"] = device_memory_gib - row["static"] / GIB
  return row


def _leaf_ids(tree):
  return [id(x) for x in jax.tree_util.tree_leaves(tree)]


def _named(state, shardings) -> Dict[int, int]:
  """id(abstract leaf) -> its bytes per device under the matching sharding."""
  leaves = jax.tree_util.tree_leaves(state)
  specs = jax.tree_util.tree_leaves(
      shardings, is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))
  return {id(leaf): sharding.bytes_per_device([leaf], [s]) for leaf, s in zip(leaves, specs)}


def report(config, meshes: Sequence[Sequence[int]], device_memory_gib: Optional[float] = None,
           stage1_config=None) -> Tuple[AbstractModel, List[Dict[str, Any]]]:
  model = abstract_model(config, stage1_config)
  return model, [mesh_report(model, m, config, device_memory_gib) for m in meshes]


def _fmt(n: int) -> str:
  if n >= GIB:
    return f"{n / GIB:.2f} GiB"
  return f"{n / 1024 ** 2:.1f} MiB"


def format_table(model: AbstractModel, rows, device_memory_gib=None) -> str:
  totals = {g: count_bytes(t) for g, t in model.groups.items()}
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model.trainable))
  lines = [f"stage: {model.stage}; {n_params:,} trainable parameters; unsharded: "
           + ", ".join(f"{g} {_fmt(b)}" for g, b in totals.items())
           + (f", frozen {_fmt(count_bytes(model.frozen))}" if model.frozen else "")]
  lines += [f"note: {n}" for n in model.notes]
  header = ["mesh (data,fsdp,tensor)", "devices", "params", "grads", "optimizer", "frozen",
            "static"]
  if device_memory_gib:
    header.append(f"fits {device_memory_gib:g} GiB")
  table = [header]
  for r in rows:
    cells = [",".join(map(str, r["mesh"])), str(r["devices"]), _fmt(r["params"]),
             _fmt(r["grads"]), _fmt(r["optimizer"]), _fmt(r["frozen"]), _fmt(r["static"])]
    if device_memory_gib:
      cells.append(("yes" if r["fits"] else "no") + f" ({r['free_gib']:.1f} GiB left)")
    table.append(cells)
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  for row in table:
    lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
  for r in rows:
    for w in r["warnings"]:
      lines.append(f"warning: mesh {','.join(map(str, r['mesh']))}: {w}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- compile mode

def _frozen_stage(stage1_config, n_embed: int, image_size: int, segmentation: int = 0):
  """An abstract FrozenStage1 (parameter shapes only) for a stage-2 dry run.

  The VQGAN architecture comes from `stage1_config` (default: configs/vqgan_default.py,
  the reference f16 model) with the codebook size and resolution the stage-2 config states;
  `segmentation` > 0 makes it a conditioning VQGAN over that many one-hot classes.
  """
  if n_embed <= 0:
    raise config_lib.ConfigError(
        "a stage-2 dry run needs the VQGAN's codebook size: pass e.g. "
        "--config.first_stage.n_embed=16384 (and --config.cond.n_embed for spatial)")
  if stage1_config is None:
    from configs import \
        vqgan_default  # pylint: disable=g-import-not-at-top  (configs/ is a top-level package, only present in a checkout)
    stage1_config = vqgan_default.get_config()
  stage1_config = stage1_config.copy_and_resolve_references()
  m = stage1_config.model
  m.n_embed, m.resolution = int(n_embed), int(image_size)
  if segmentation:
    m.in_channels = m.out_ch = int(segmentation)
    stage1_config.data.input = "segmentation"
  model = vqgan.vqmodel_from_config(m)
  f = 2 ** (len(m.ch_mult) - 1)
  meta = {"n_embed": int(n_embed), "lookup_dim": int(m.codebook_dim or m.embed_dim),
          "downsample_factor": f, "latent_grid": [image_size // f, image_size // f]}
  return checkpointing.FrozenStage1(
      model=model, params=checkpointing.abstract_vqgan_params(model, image_size),
      config=stage1_config, metadata=meta, step=0)


def _image_batch(config, batch_size: int, data_input: str = "image", eval_mask=False):
  size = int(config.data.image_size)
  entries = {}
  if data_input == "segmentation":
    entries["segmentation"] = ((batch_size, size, size), jnp.int32)
  else:
    entries["image"] = ((batch_size, size, size, int(config.model.in_channels)), jnp.float32)
  if eval_mask:
    entries["mask"] = ((batch_size,), jnp.bool_)
  return entries


def compile_stage1(config, mesh, chip, steps, hlo_dir=None,
                   exact_costs: bool = True) -> Dict[str, Any]:
  runner = stage1_trainer.Stage1Runner(config, mesh, abstract=True)
  n = mesh.devices.size
  reports = {}
  if "train" in steps:
    batch = tpu_compile.batch_struct(mesh, _image_batch(config, config.batch_size,
                                                        config.data.input))
    try:
      compiled = tpu_compile.compile_step(runner.jitted_train[True],
                                          (runner.abstract_state, batch, runner.lpips_params))
    except tpu_compile.DoesNotFit as e:
      compiled, reports["train"] = None, e.report(chip)
    counts = None
    if compiled is not None and exact_costs and config.get("grad_accum_steps", 1) > 1:
      small, micro = _counting_config(config)
      small_runner = stage1_trainer.Stage1Runner(small, mesh, abstract=True)
      small_batch = tpu_compile.batch_struct(mesh, _image_batch(small, small.batch_size,
                                                                small.data.input))
      counts = tuple(micro * c for c in tpu_compile.cost_counts(tpu_compile.compile_step(
          small_runner.jitted_train[True], (small_runner.abstract_state, small_batch,
                                            small_runner.lpips_params))))
    if compiled is not None:
      reports["train"] = tpu_compile.analyse(
          compiled, chip, n, flops.stage1_step_flops_from_config(config, use_gan=True),
          _hlo_path(hlo_dir, "train"), counts)
    reports["train"]["largest_weight_bytes"] = tpu_compile.abstract_param_bytes(
        runner.abstract_state.g_params)  # (also on a step that does not fit)
  if "eval" in steps:
    batch = tpu_compile.batch_struct(mesh, _image_batch(config, config.eval_batch_size,
                                                        config.data.input, eval_mask=True))
    try:
      compiled = tpu_compile.compile_step(runner.jitted_eval, (runner.abstract_state.g_params,
                                                              batch, runner.lpips_params))
      reports["eval"] = tpu_compile.analyse(compiled, chip, n, None,
                                            _hlo_path(hlo_dir, "eval"))
    except tpu_compile.DoesNotFit as e:
      reports["eval"] = e.report(chip)
  return reports


def cond_channels(config) -> int:
  """One-hot channels of the conditioning VQGAN a spatial config implies (its maps' ids;
  the photos' num_segments for a config whose data carries no maps, e.g. tokens_dir)."""
  return data.segment_classes(config.data) or int(config.data.photos.num_segments)


def _stage2_compiled(config, mesh, steps, stage1_config=None):
  """{step: (compiled executable, analytic model FLOPs)} and the runner, for stage 2."""
  size = int(config.data.image_size)
  first = _frozen_stage(stage1_config, config.first_stage.n_embed, size)
  cond = None
  if config.cond.kind == "spatial":
    cond = _frozen_stage(None, config.cond.n_embed, size, cond_channels(config))
  runner = stage2_trainer.Stage2Runner(config, first, cond, mesh,
                                       handoff.resolve_num_classes(config),
                                       abstract=True)
  setup, gpt = runner.setup, runner.setup.gpt
  gpt_kwargs = dict(vocab_size=gpt.vocab_size, n_layer=gpt.n_layer, n_embd=gpt.n_embd,
                    n_head=gpt.n_head, attention=gpt.attention)

  def entries(batch_size, eval_mask=False):
    out = {}
    for key in setup.batch_keys(False):
      if key == "image":
        out[key] = ((batch_size, size, size, 3), jnp.float32)
      elif key == "label":
        out[key] = ((batch_size,), jnp.int32)
      elif key == "segmentation":
        out[key] = ((batch_size, size, size), jnp.int32)
    if eval_mask:
      out["mask"] = ((batch_size,), jnp.bool_)
    return tpu_compile.batch_struct(mesh, out)

  compiled = {}

  def attempt(jitted, args):
    try:
      return tpu_compile.compile_step(jitted, args)
    except tpu_compile.DoesNotFit as e:
      return e

  if "train" in steps:
    compiled["train"] = (
        attempt(runner.jitted_train, (
            runner.abstract_state, entries(config.batch_size), runner.frozen)),
        flops.gpt_train_step_flops(config.batch_size, setup.seq_len, **gpt_kwargs))
  if "eval" in steps:
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
    compiled["eval"] = (
        attempt(runner.jitted_eval, (
            runner.abstract_state.params, entries(config.eval_batch_size, True),
            runner.frozen, key)),
        flops.gpt_forward_flops(config.eval_batch_size, setup.seq_len, **gpt_kwargs))
  if "decode" in steps:
    batch = int(config.sampling.batch_size)
    sharding.check_batch_size(batch, mesh, "config.sampling.batch_size",
                              processes=tpu_compile.num_hosts(mesh))
    cache = jax.eval_shape(lambda: gpt.init_cache(batch))
    cache = tpu_compile.cache_struct(cache, mesh, gpt.scan_layers)
    batch_spec = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)
    # As vqgan_jax.sampling runs it: the GPT replicated, the batch and cache split.
    params = jax.tree_util.tree_map(lambda a: tpu_compile.sds(a.shape, a.dtype, repl),
                                    runner.abstract_state.params)
    step = jax.jit(tpu_compile.decode_step_fn(gpt),
                   in_shardings=(repl, batch_spec, repl,
                                 jax.tree_util.tree_map(lambda a: a.sharding, cache)),
                   donate_argnums=(3,))
    compiled["decode"] = (
        attempt(step, (
            params, tpu_compile.sds((batch, 1), jnp.int32, batch_spec),
            tpu_compile.sds((), jnp.int32, repl), cache)),
        flops.gpt_decode_step_flops(batch, gpt.block_size, **gpt_kwargs))
  return compiled, runner


def _counting_config(config):
  """(config, micro-batches) whose compiled cost analysis counts every op once: XLA
  counts a loop body once, so gradient accumulation (a scan over micro-batches) is
  compiled as one micro-batch without accumulation, its costs then multiplied."""
  small = config.copy_and_resolve_references()
  steps = int(config.get("grad_accum_steps", 1))
  if steps > 1:
    small.batch_size, small.grad_accum_steps = config.batch_size // steps, 1
  return small, steps


def _exact_costs(compiled: Dict[str, Any], scale: Dict[str, int]):
  return {k: tuple(scale.get(k, 1) * c for c in tpu_compile.cost_counts(exe))
          for k, (exe, _) in compiled.items() if not isinstance(exe, tpu_compile.DoesNotFit)}


def _stage2_counts(config, mesh, steps, stage1_config):
  """{step: (FLOPs, bytes accessed) per chip} of the config's steps with every loop
  counted: a scanned GPT's layers through 1- and 2-layer unrolled compiles (the cost of
  an unrolled GPT is exactly linear in its depth), accumulation as micro-batch x k."""
  base, micro = _counting_config(config)
  scale = {"train": micro}
  if not (config.model.get("scan_layers", False) and config.model.n_layer > 1):
    return _exact_costs(_stage2_compiled(base, mesh, steps, stage1_config)[0], scale)
  points = []
  for layers in (1, 2):
    small = base.copy_and_resolve_references()
    small.model.n_layer, small.model.scan_layers = layers, False
    points.append(_exact_costs(_stage2_compiled(small, mesh, steps, stage1_config)[0], scale))
  n = int(config.model.n_layer)
  return {k: tuple(one + (n - 1) * (two - one) for one, two in zip(points[0][k], points[1][k]))
          for k in points[0] if k in points[1]}


def compile_stage2(config, mesh, chip, steps, stage1_config=None, hlo_dir=None,
                   exact_costs: bool = True):
  compiled, runner = _stage2_compiled(config, mesh, steps, stage1_config)
  costs = {}
  fitted = [v for v, _ in compiled.values() if not isinstance(v, tpu_compile.DoesNotFit)]
  if fitted and exact_costs and ((config.model.get("scan_layers", False)
                                  and config.model.n_layer > 1)
                                 or config.get("grad_accum_steps", 1) > 1):
    costs = _stage2_counts(config, mesh, steps, stage1_config)
  n = mesh.devices.size
  reports = {}
  for name, (executable, model_flops) in compiled.items():
    if isinstance(executable, tpu_compile.DoesNotFit):
      reports[name] = executable.report(chip)
      continue
    reports[name] = tpu_compile.analyse(executable, chip, n, model_flops,
                                        _hlo_path(hlo_dir, name), costs.get(name))
  if "train" in reports and reports["train"]["fits"]:
    reports["train"]["largest_weight_bytes"] = tpu_compile.abstract_param_bytes(
        runner.abstract_state.params)
  if "decode" in reports:
    reports["decode"]["batch_size"] = int(config.sampling.batch_size)
  return reports


def _hlo_path(folder, step):
  if not folder:
    return None
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f"{step}.hlo.txt")


def compile_report(config, topology: str, mesh_shape: Sequence[int],
                   steps: Sequence[str] = ("train", "eval", "decode"), stage1_config=None,
                   hlo_dir: Optional[str] = None, exact_costs: bool = True) -> Dict[str, Any]:
  """Compiles the config's steps for `topology` on a (data, fsdp, tensor) mesh; returns
  the JSON-ready report (per step: memory, FLOPs, estimated time and MFU, collectives),
  with the formula figures of the same mesh beside it."""
  chip = tpu_compile.chip_for(topology)
  mesh = tpu_compile.topology_mesh(topology, mesh_shape)
  config_lib.validate_batch_sizes(config, mesh, processes=tpu_compile.num_hosts(mesh))
  stage = config.get("stage", "vqgan")
  if stage == "transformer":
    if config.cond.kind == "class" and config.cond.num_classes <= 0:
      config.cond.num_classes = handoff.resolve_num_classes(config)  # the dataset's
    if min(config.first_stage.latent_grid) <= 0:  # the grid the frozen VQGAN gives
      grid = _frozen_stage(stage1_config, config.first_stage.n_embed,
                           int(config.data.image_size)).metadata["latent_grid"]
      config.first_stage.latent_grid = tuple(grid)
    reports = compile_stage2(config, mesh, chip, steps, stage1_config, hlo_dir, exact_costs)
  else:
    reports = compile_stage1(config, mesh, chip, steps, hlo_dir, exact_costs)
  model, rows = report(config, [tuple(mesh_shape)], chip.hbm_bytes / GIB, stage1_config)
  formula = {k: v for k, v in rows[0].items() if k != "warnings"}
  return {
      "stage": model.stage, "topology": topology, "chip": chip.name,
      "num_chips": int(mesh.devices.size), "num_hosts": tpu_compile.num_hosts(mesh),
      "mesh": dict(zip(sharding.MESH_AXES, (int(s) for s in mesh_shape))),
      "global_batch": int(config.batch_size),
      "grad_accum_steps": int(config.get("grad_accum_steps", 1)),
      "device_memory_bytes": chip.hbm_bytes, "peak_bf16_flops": chip.peak_bf16_flops,
      "fits": all(r["fits"] for r in reports.values()),
      "steps": reports, "formula": formula,
  }


def format_compile_report(result: Dict[str, Any]) -> str:
  lines = [f"{result['stage']} on {result['topology']} ({result['num_chips']} x "
           f"{result['chip']}, {result['num_hosts']} hosts), mesh "
           + ",".join(f"{k}={v}" for k, v in result["mesh"].items())
           + f", global batch {result['global_batch']}"
           + (f" ({result['grad_accum_steps']} micro-batches)"
              if result["grad_accum_steps"] > 1 else "")]
  header = ["step", "fits", "per chip", "temp", "FLOPs/step", "est. step", "bound",
            "est. MFU", "largest all-gather", "collectives (all-gather/all-reduce/"
            "reduce-scatter)"]
  table = [header]
  hbm = result["device_memory_bytes"] / GIB
  for name, r in result["steps"].items():
    if "compile_error" in r:
      table.append([name, "NO", f"{r['per_device_bytes']['total'] / GIB:.2f}/{hbm:g} GiB",
                    "(the TPU compiler ran out of HBM)"] + [""] * (len(header) - 4))
      continue
    ops = r["ops"]
    mfu = r.get("estimated_mfu")
    table.append([
        name, "yes" if r["fits"] else "NO",
        f"{r['per_device_bytes']['total'] / GIB:.2f}/{hbm:g} GiB",
        f"{r['per_device_bytes']['temp'] / GIB:.2f} GiB", f"{r['flops_per_step']:.3g}",
        f"{r['estimated_step_seconds'] * 1e3:.1f} ms", r["estimate_bound"],
        "-" if mfu is None else f"{100 * mfu:.0f}%",
        f"{r['largest_all_gather_bytes'] / 2 ** 20:.1f} MiB",
        f"{ops['all-gather']['count']}/{ops['all-reduce']['count']}/"
        f"{ops['reduce-scatter']['count']}"])
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
  f = result["formula"]
  lines.append(f"formula (parameters, gradients, optimizer, frozen; no activations): "
               f"{f['static'] / GIB:.2f} GiB per chip")
  lines.append("step time: roofline max(FLOPs/peak, bytes/HBM bandwidth) of the compiled "
               "program per chip; collectives not included, so a lower bound")
  return "\n".join(lines)


def _load_config_file(path: str):
  spec = importlib.util.spec_from_file_location("stage1_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  config = FLAGS.config
  if FLAGS.batch_size:
    config.batch_size = FLAGS.batch_size
  stage1_config = _load_config_file(FLAGS.stage1_config) if FLAGS.stage1_config else None
  if FLAGS.topology:
    mesh_text = FLAGS.mesh[0] if FLAGS.mesh else "1,-1,1"
    try:
      num_chips = int(np.prod([int(p) for p in FLAGS.topology.split(":")[1].split("x")]))
    except (IndexError, ValueError):
      raise SystemExit(f"error: --topology {FLAGS.topology!r}: expected CHIP:SHAPE, e.g. "
                       "v5e:16x16, v4:2x2x4, v5p:4x4x4") from None
    shape = parse_mesh(mesh_text, num_chips)
    try:
      result = compile_report(config, FLAGS.topology, shape, FLAGS.steps, stage1_config,
                              FLAGS.keep_hlo or None, FLAGS.exact_costs)
    except (tpu_compile.TpuCompileError, config_lib.ConfigError, ValueError) as e:
      raise SystemExit(f"error: {e}") from None
    print(format_compile_report(result))
    if FLAGS.json:
      os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
      with open(FLAGS.json, "w") as f:
        json.dump(result, f, indent=1)
      print(f"wrote {FLAGS.json}")
    return
  meshes = [parse_mesh(m, FLAGS.num_devices)
            for value in FLAGS.mesh for m in value.replace(";", " ").split()]
  if not meshes:
    num = FLAGS.num_devices or jax.device_count()
    meshes = [sharding.mesh_shape(config.mesh, num)]
  model, rows = report(config, meshes, FLAGS.device_memory_gib, stage1_config)
  print(format_table(model, rows, FLAGS.device_memory_gib))


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Stage-1 or stage-2 config file.")
  flags.DEFINE_multi_string("mesh", [], "data,fsdp,tensor sizes (repeat the flag, or give "
                            "several separated by spaces); default: the config's mesh on "
                            "--num_devices devices")
  flags.DEFINE_integer("num_devices", 0, "devices for the config's mesh or a -1 entry")
  flags.DEFINE_float("device_memory_gib", 0.0, "memory per device (GiB) for the fits column")
  flags.DEFINE_string("stage1_config", "", "stage-2 only: the frozen VQGAN's config, to "
                      "count its replicated parameters")
  flags.DEFINE_string("topology", "", "compile mode: a TPU slice, e.g. v5e:16x16, v4:2x2x4, "
                      "v5p:4x4x4 (needs libtpu: make tpu-tools, then .venv-tpu/bin/python)")
  flags.DEFINE_list("steps", ["train", "eval", "decode"], "compile mode: steps to compile "
                    "(decode: stage 2 only)")
  flags.DEFINE_integer("batch_size", 0, "global batch size (0: the config's)")
  flags.DEFINE_string("json", "", "compile mode: write the report here")
  flags.DEFINE_bool("exact_costs", True, "compile mode: count every loop iteration of a "
                    "scanned GPT or of gradient accumulation (extra compiles: XLA counts a "
                    "loop body once); --noexact_costs reports the program's own counts")
  flags.DEFINE_string("keep_hlo", "", "compile mode: write each step's partitioned HLO here")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _define_flags()
  cli.run(main)

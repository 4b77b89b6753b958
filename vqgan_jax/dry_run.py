"""Memory dry run: parameter and optimiser bytes per device of a config on given meshes.

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

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from vqgan_jax import sharding

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
  import ml_collections  # pylint: disable=g-import-not-at-top
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


def _lpips_abstract():
  from vqgan_jax.models import lpips  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  return jax.eval_shape(lambda a, b: lpips.LPIPS().init(jax.random.PRNGKey(0), a, b), x, x)[
      "params"]


def stage1_abstract(config) -> AbstractModel:
  from vqgan_jax import stage1_trainer  # pylint: disable=g-import-not-at-top
  setup = stage1_trainer.Stage1Setup(config)
  state = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
  t = state.trainer
  frozen = _lpips_abstract() if config.loss.perceptual_weight > 0 else {}
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
      trainable={"g_params": state.g_params, "d_params": t.d_params},
      frozen=frozen, rules=sharding.VQGAN_RULES, notes=notes)


def stage2_abstract(config, stage1_config=None) -> AbstractModel:
  from vqgan_jax import stage2_trainer  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models import vqgan  # pylint: disable=g-import-not-at-top
  if config.first_stage.n_embed <= 0 or min(config.first_stage.latent_grid) <= 0:
    raise ValueError(
        "a stage-2 dry run needs the VQGAN's codebook size and token grid from the config: "
        "pass e.g. --config.first_stage.n_embed=16384 --config.first_stage.latent_grid=16,16")
  gpt, layout, prefix, n = stage2_trainer.stated_model(config)
  tx = stage2_trainer.make_optimizer(config)

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
    from vqgan_jax import checkpointing  # pylint: disable=g-import-not-at-top
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


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  meshes = [parse_mesh(m, FLAGS.num_devices)
             for value in FLAGS.mesh for m in value.replace(";", " ").split()]
  if not meshes:
    num = FLAGS.num_devices or jax.device_count()
    meshes = [sharding.mesh_shape(FLAGS.config.mesh, num)]
  stage1_config = None
  if FLAGS.stage1_config:
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.spec_from_file_location("stage1_config", FLAGS.stage1_config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stage1_config = module.get_config()
  model, rows = report(FLAGS.config, meshes, FLAGS.device_memory_gib, stage1_config)
  print(format_table(model, rows, FLAGS.device_memory_gib))
  del argv


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Stage-1 or stage-2 config file.")
  flags.DEFINE_multi_string("mesh", [], "data,fsdp,tensor sizes (repeat the flag, or give "
                            "several separated by spaces); default: the config's mesh on "
                            "--num_devices devices")
  flags.DEFINE_integer("num_devices", 0, "devices for the config's mesh or a -1 entry")
  flags.DEFINE_float("device_memory_gib", 0.0, "memory per device (GiB) for the fits column")
  flags.DEFINE_string("stage1_config", "", "stage-2 only: the frozen VQGAN's config, to "
                      "count its replicated parameters")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  import os  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)

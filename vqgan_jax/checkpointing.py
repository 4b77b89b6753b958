"""Orbax checkpoints for both stages, and the stage-1 -> stage-2 hand-off.

A checkpoint step holds these items:
  model      the parameters a later stage or evaluation needs (stage 1: the VQGAN
             generator, codebook included; stage 2: the GPT)
  trainer    everything else needed to resume exactly (step, optimiser states,
             discriminator, code-usage statistics)
  data       the grain iterator state of each process
  metadata   JSON: stage, step, full config, codebook size, code dimension, latent grid

`load_stage1(workdir)` is the one validated way for stage 2, evaluation and token
export to get a frozen VQGAN: it rebuilds the model from the checkpoint's own config and
restores only the `model` item, onto whatever devices this process has.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Dict, Optional

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from vqgan_jax.models import quantizer as quantizers
from vqgan_jax.models import vqgan

FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A workdir or checkpoint that cannot be used as asked."""


def checkpoint_dir(workdir: str) -> epath.Path:
  # Orbax wants absolute paths; gs:// and other URLs are absolute already.
  workdir = str(workdir)
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  return epath.Path(workdir) / "checkpoints"


def make_manager(workdir: str, max_to_keep: int = 3, async_checkpointing: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_checkpointing,
      # A write killed midway leaves a temporary folder; it is never a restore candidate
      # and is removed when the next manager starts.
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, model_params: Any, trainer_state: Any,
         metadata: Dict[str, Any], data_iterator=None, force: bool = False) -> bool:
  items = dict(model=ocp.args.StandardSave(model_params),
               trainer=ocp.args.StandardSave(trainer_state),
               metadata=ocp.args.JsonSave(metadata))
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def guarded_save(manager, workdir: str, step: int, *args, **kwargs) -> bool:
  """`save`, turning an I/O failure (e.g. a full disk) into an error that says what is safe.

  Orbax writes into a temporary folder and renames it only when complete, so a failed
  write never replaces the previous checkpoint.
  """
  try:
    return save(manager, step, *args, **kwargs)
  except OSError as e:
    raise CheckpointWriteError(_write_failure(manager, workdir, step, e)) from e


def guarded_wait(manager, workdir: str) -> None:
  """Waits for async writes; a failure in the background is reported like guarded_save's."""
  try:
    manager.wait_until_finished()
  except OSError as e:
    raise CheckpointWriteError(_write_failure(manager, workdir, None, e)) from e


def wait_quietly(manager) -> None:
  """Waits for pending writes while another error is already on its way up."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    logging.error("a pending checkpoint write failed too: %s", e)


def _write_failure(manager, workdir, step, error) -> str:
  finished = [s for s in manager.all_steps() if s != step]
  kept = f"the previous checkpoint (step {max(finished)}) is intact" if finished else \
      "no earlier checkpoint exists"
  what = f"step {step}" if step is not None else "an asynchronous checkpoint"
  return (f"writing {what} to {checkpoint_dir(workdir)} failed: {error}; {kept}. Free space "
          "or fix the path and rerun the same command to resume.")


class CheckpointWriteError(OSError):
  """A checkpoint could not be written; the message says which one is still good."""


def read_metadata(manager: ocp.CheckpointManager, step: int) -> Dict[str, Any]:
  restored = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  return restored["metadata"]


def restore(manager: ocp.CheckpointManager, step: int, abstract_model: Any,
            abstract_trainer: Any = None, data_iterator=None) -> Dict[str, Any]:
  """Restores the named items onto the shardings given in the abstract trees."""
  items = dict(model=ocp.args.StandardRestore(abstract_model),
               metadata=ocp.args.JsonRestore())
  if abstract_trainer is not None:
    items["trainer"] = ocp.args.StandardRestore(abstract_trainer)
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))


def config_to_dict(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def config_from_dict(values: Dict[str, Any]) -> ml_collections.ConfigDict:
  def convert(value):
    if isinstance(value, dict):
      return ml_collections.ConfigDict({k: convert(v) for k, v in value.items()})
    if isinstance(value, list):
      return tuple(convert(v) for v in value)
    return value
  return convert(values)


# Model keys that change how a step runs, not the parameters or the function: a run may
# resume with another value.
EXECUTION_ONLY_KEYS = ("remat",)
# Keys added after checkpoints were written, with the value an older checkpoint implies
# (a stage-1 checkpoint from before the quantizer keys holds the paper's VQ).
ABSENT_DEFAULTS = {"scan_layers": False, **quantizers.QUANTIZER_DEFAULTS}


def check_same_model(saved: Dict[str, Any], current: Dict[str, Any], workdir: str,
                     force: bool = False) -> None:
  """Refuses to resume a workdir whose model config differs from the current one."""
  differences = {k: (saved.get(k, ABSENT_DEFAULTS.get(k)), current.get(k, ABSENT_DEFAULTS.get(k)))
                 for k in sorted(set(saved) | set(current))
                 if k not in EXECUTION_ONLY_KEYS
                 and _normalise(saved.get(k, ABSENT_DEFAULTS.get(k)))
                 != _normalise(current.get(k, ABSENT_DEFAULTS.get(k)))}
  if differences and not force:
    listed = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}"
                       for k, (a, b) in differences.items())
    hint = ""
    if "scan_layers" in differences:
      hint = (f" The checkpoint's GPT blocks are {'stacked' if differences['scan_layers'][0] else 'unrolled'}:"
              f" resume with --config.model.scan_layers={bool(differences['scan_layers'][0])}.")
    raise CheckpointError(
        f"{workdir} holds a checkpoint of a different model ({listed}).{hint} Use a new "
        "workdir, or pass --config.force_resume=True to load it anyway.")
  if differences:
    logging.warning("Resuming %s despite model differences: %s", workdir, differences)


def _normalise(value):
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class FrozenStage1:
  """A restored VQGAN: the Flax module, its parameters and what the checkpoint says of it."""
  model: Any
  params: Any
  config: ml_collections.ConfigDict
  metadata: Dict[str, Any]
  step: int

  @property
  def n_embed(self) -> int:
    return int(self.metadata["n_embed"])

  @property
  def lookup_dim(self) -> int:
    return int(self.metadata["lookup_dim"])

  @property
  def downsample_factor(self) -> int:
    return int(self.metadata["downsample_factor"])


def latest_step(workdir: str) -> Optional[int]:
  if not checkpoint_dir(workdir).exists():
    return None
  return make_manager(workdir, read_only=True).latest_step()


def load_stage1(workdir: str, step: Optional[int] = None, sharding=None) -> FrozenStage1:
  """Restores the VQGAN generator of a stage-1 workdir (newest step unless `step`)."""
  if not workdir or not epath.Path(workdir).exists():
    raise CheckpointError(f"stage-1 workdir {workdir!r} does not exist")
  if not checkpoint_dir(workdir).exists():
    raise CheckpointError(f"stage-1 workdir {workdir} has no checkpoints/ folder")
  manager = make_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"stage-1 workdir {workdir} holds no finished checkpoint")
  if step is None or step < 0:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"stage-1 workdir {workdir} has no step {step}; it has {sorted(steps)}")
  metadata = read_metadata(manager, step)
  if metadata.get("stage") != "vqgan":
    raise CheckpointError(f"{workdir} step {step} is a {metadata.get('stage')!r} checkpoint, "
                          "not a stage-1 VQGAN")
  config = config_from_dict(metadata["config"])
  model = vqgan.vqmodel_from_config(config.model)
  abstract = abstract_vqgan_params(model, config.model.resolution)
  if sharding is not None:
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
  else:
    device = jax.local_devices()[0]
    single = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract)
  restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract)))
  return FrozenStage1(model=model, params=restored["model"], config=config,
                      metadata=metadata, step=int(step))


def abstract_vqgan_params(model, resolution: int):
  """Shapes of a VQGAN's stored parameter tree: its params, plus the quantizer's
  "vq_stats" collection under that key for vq_ema and simvq (vqgan.stored_params)."""
  x = jax.ShapeDtypeStruct((1, resolution, resolution, model.in_channels), jax.numpy.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros(x.shape)))
  return vqgan.stored_params(variables)


def stage1_metadata(config: ml_collections.ConfigDict, step: int) -> Dict[str, Any]:
  """n_embed is the codebook size (fsq: prod(fsq_levels), lfq: 2**lfq_bits, which the
  config checks equal model.n_embed) and lookup_dim the code dimension latents are
  quantized in (fsq: len(fsq_levels), lfq: lfq_bits)."""
  m = config.model
  f = 2 ** (len(m.ch_mult) - 1)
  opts = quantizers.quantizer_options(m)
  kind = opts["quantizer"]
  lookup_dim = {"fsq": len(opts["fsq_levels"]),
                "lfq": int(opts["lfq_bits"])}.get(kind, int(m.codebook_dim or m.embed_dim))
  return {
      "format_version": FORMAT_VERSION,
      "stage": "vqgan",
      "step": int(step),
      "quantizer": kind,
      "n_embed": quantizers.codebook_size_of(kind, m.n_embed, opts["fsq_levels"],
                                             opts["lfq_bits"]),
      "embed_dim": int(m.embed_dim),
      "lookup_dim": lookup_dim,
      "downsample_factor": f,
      "latent_grid": [m.resolution // f, m.resolution // f],
      "config": config_to_dict(config),
  }

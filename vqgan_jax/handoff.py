"""The hand-off from stage 1 to stage 2: loading frozen VQGANs, checking them against a
stage-2 config and its exported tokens, building the GPT a config describes, and loading
a trained stage-2 model with everything it needs to sample and decode.

Inference (sampling, evaluation, token export) and the stage-2 trainer both start here;
nothing in this module trains.

A stage-2 checkpoint records each frozen VQGAN by absolute path, by path relative to the
stage-2 workdir, by step and by a fingerprint of its codebook, so a run copied to
another machine finds its VQGAN when the two were moved together, and any other VQGAN
is refused unless named with `first_stage_workdir` (`--first_stage_workdir` on every
command).
"""

# Over 500 lines on purpose: every check between the two stages (codebook, grid, step,
# fingerprint, token exports) lives here, so that no other module repeats one.

import dataclasses
import hashlib
import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax import lax

from vqgan_jax import checkpointing, conditioning, config_lib, data, sharding
from vqgan_jax.data import tokens as tokens_lib
from vqgan_jax.models import transformer, vqgan

VocabLayout = conditioning.VocabLayout


def input_kind(config) -> str:
  """What a stage-1 config (a ConfigDict or a checkpoint's config dict) encodes:
  "image" or "segmentation" ("image" for configs from before the key existed)."""
  data_config = config.get("data", None) if hasattr(config, "get") else None
  return data_config.get("input", "image") if data_config is not None else "image"


def model_inputs_fn(config):
  """batch -> the array a stage-1 model of `config` encodes: RGB images, or condition maps.

  With `data.input = "segmentation"` (a conditioning VQGAN, as the paper's S-FLCKR
  models) the input is the one-hot segmentation map scaled to [-1, 1], with
  `model.in_channels = model.out_ch = data.segment_classes(config.data)`. Works on
  checkpoint configs that lack keys added later.
  """
  kind, channels = input_kind(config), int(config.model.in_channels)
  if kind not in ("image", "segmentation"):
    raise config_lib.ConfigError(
        f"config.data.input={kind!r}: must be 'image' or 'segmentation'")

  def inputs(batch):
    if kind == "image":
      return batch["image"]
    onehot = jax.nn.one_hot(batch["segmentation"], channels, dtype=jnp.float32)
    return 2.0 * onehot - 1.0

  return inputs


def model_inputs(batch: Dict[str, Any], config) -> jax.Array:
  """`model_inputs_fn(config)(batch)`."""
  return model_inputs_fn(config)(batch)


# ---------------------------------------------------------------------------------------
# The GPT a config describes
# ---------------------------------------------------------------------------------------


def build_gpt(config, layout: VocabLayout, prefix_len: int, num_image_tokens: int,
              dtype=None) -> transformer.GPT:
  """The GPT of `config.model`, with vocab/block size derived (0) or checked (> 0)."""
  m = config.model
  vocab = m.vocab_size or layout.vocab_size
  if vocab < layout.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={m.vocab_size} is smaller than the {layout.vocab_size} ids "
        f"the vocabulary needs ({layout.to_dict()['ranges']}); use 0 to derive it")
  needed = prefix_len + num_image_tokens - 1
  block = m.block_size or prefix_len + num_image_tokens
  if block < needed:
    raise config_lib.ConfigError(
        f"config.model.block_size={m.block_size} is smaller than the {needed} positions the "
        f"GPT reads ({prefix_len} condition + {num_image_tokens} image tokens - 1); use 0")
  return transformer.GPT(
      vocab_size=int(vocab), block_size=int(block), n_layer=m.n_layer, n_head=m.n_head,
      n_embd=m.n_embd, embd_pdrop=m.embd_pdrop, resid_pdrop=m.resid_pdrop,
      attn_pdrop=m.attn_pdrop, attention=m.attention, linear_chunk_size=m.linear_chunk_size,
      dtype=dtype if dtype is not None else config_lib.compute_dtype(config), remat=m.remat,
      scan_layers=bool(m.get("scan_layers", False)))


def stated_model(config, latent_grid: Optional[Tuple[int, int]] = None):
  """(GPT, layout, prefix_len, num_image_tokens) from the config's stated expectations
  alone (first_stage.n_embed, latent grid, cond.n_embed, cond.num_classes) — no
  checkpoints; for parameter counts of the paper configs."""
  grid = tuple(latent_grid or config.first_stage.latent_grid)
  if config.first_stage.n_embed <= 0 or min(grid) <= 0:
    raise config_lib.ConfigError("stated_model needs first_stage.n_embed and a latent grid")
  window = (config.crop_tokens,) * 2 if config.crop_tokens else grid
  n_cond = config.cond.n_embed if config.cond.kind == "spatial" else 0
  layout = conditioning.layout_for(config, config.first_stage.n_embed, n_cond)
  prefix = layout.prefix_len(window)
  n = window[0] * window[1]
  return build_gpt(config, layout, prefix, n), layout, prefix, n

# ---------------------------------------------------------------------------------------
# Loading and checking the frozen VQGANs
# ---------------------------------------------------------------------------------------




def _check_expectation(stated, actual, key: str, what: str, workdir: str, step: int):
  if stated and tuple(np.atleast_1d(stated)) != tuple(np.atleast_1d(actual)):
    raise config_lib.ConfigError(
        f"config.{key}={stated!r} but the {what} checkpoint {workdir} (step {step}) has "
        f"{actual!r}; fix config.{key} (0 = take it from the checkpoint) or point to "
        "another workdir")


def default_input(frozen):
  """Stage-1 checkpoints written before `data.input` existed encode RGB images."""
  if "input" not in frozen.config.data:
    with frozen.config.unlocked():
      frozen.config.data.input = "image"
  return frozen


def load_frozen_stages(config, mesh=None, first_step: Optional[int] = None,
                       cond_step: Optional[int] = None):
  """Loads and validates the frozen VQGAN(s) named by the config (nothing is compiled).

  Returns (first_stage, cond_stage or None), both `checkpointing.FrozenStage1` with
  parameters replicated over `mesh` (or on the first local device without a mesh).
  """
  repl = sharding.replicated(mesh) if mesh is not None else None
  fs = config.first_stage
  step = fs.step if first_step is None else first_step
  first = default_input(
      checkpointing.load_stage1(fs.workdir, None if step < 0 else step, sharding=repl))
  _check_expectation(fs.n_embed, first.n_embed, "first_stage.n_embed", "stage-1",
                     fs.workdir, first.step)
  _check_expectation(tuple(fs.latent_grid) if min(fs.latent_grid) > 0 else None,
                     tuple(first.metadata["latent_grid"]), "first_stage.latent_grid",
                     "stage-1", fs.workdir, first.step)
  if first.config.data.input != "image":
    raise config_lib.ConfigError(
        f"the stage-1 model in {fs.workdir} encodes {first.config.data.input!r} inputs, not "
        "RGB images; config.first_stage.workdir must be an image VQGAN")
  token_grid(config, first)
  cond = None
  if config.cond.kind == "spatial":
    c = config.cond
    step = c.cond_stage_step if cond_step is None else cond_step
    cond = default_input(checkpointing.load_stage1(
        c.cond_stage_workdir, None if step < 0 else step, sharding=repl))
    _check_expectation(c.n_embed, cond.n_embed, "cond.n_embed", "conditioning VQGAN",
                       c.cond_stage_workdir, cond.step)
    _check_expectation(tuple(c.latent_grid) if min(c.latent_grid) > 0 else None,
                       tuple(cond.metadata["latent_grid"]), "cond.latent_grid",
                       "conditioning VQGAN", c.cond_stage_workdir, cond.step)
    if cond.config.data.input != "segmentation":
      raise config_lib.ConfigError(
          f"the conditioning VQGAN in {c.cond_stage_workdir} was trained on "
          f"data.input={cond.config.data.input!r}; spatial conditioning needs "
          "one trained with data.input='segmentation'")
    segments = data.segment_classes(config.data)
    if segments and cond.config.model.in_channels != segments:
      source = ("config.data.photos.num_segments" if config.data.name == "photos" else
                "config.data.label_maps")
      raise config_lib.ConfigError(
          f"the conditioning VQGAN in {c.cond_stage_workdir} takes "
          f"{cond.config.model.in_channels} segment channels but {source} gives "
          f"{segments} ids; use the label_maps the VQGAN was trained with")
    cond_grid = token_grid(config, cond, "conditioning VQGAN")
    if cond_grid != token_grid(config, first):
      raise config_lib.ConfigError(
          f"the conditioning VQGAN ({c.cond_stage_workdir}, f={cond.downsample_factor}) gives "
          f"a {cond_grid} token grid but the stage-1 model ({fs.workdir}, "
          f"f={first.downsample_factor}) gives {token_grid(config, first)} at "
          f"data.image_size={config.data.image_size}; they must match")
  return first, cond


def token_grid(config, frozen, what: str = "stage-1") -> Tuple[int, int]:
  """Token grid (h, w) of one data.image_size crop under a frozen VQGAN."""
  f = frozen.downsample_factor
  size = int(config.data.image_size)
  if size % f:
    raise config_lib.ConfigError(
        f"config.data.image_size={size} is not divisible by the {what} model's downsampling "
        f"factor {f}")
  grid = (size // f, size // f)
  if config.crop_tokens and config.crop_tokens > min(grid):
    raise config_lib.ConfigError(
        f"config.crop_tokens={config.crop_tokens} exceeds the {grid[0]}x{grid[1]} token grid "
        f"of data.image_size={size}")
  return grid


def encode(frozen_model: vqgan.VQModel, params, x: jax.Array) -> jax.Array:
  """Token indices (B, h, w) int32 of inputs x under a frozen VQGAN."""
  idx = frozen_model.apply(vqgan.as_variables(params), x,
                           method=vqgan.VQModel.encode_to_indices)
  return lax.stop_gradient(idx).astype(jnp.int32)

def resolve_num_classes(config) -> int:
  if config.cond.kind != "class":
    return 0
  if config.cond.num_classes > 0:
    return int(config.cond.num_classes)
  return available_classes(config)


def available_classes(config) -> int:
  """Classes in the training data: the export's label count with tokens_dir, else the
  dataset's."""
  if config.tokens_dir:
    return int(exported_metadata(config, "train")["labels"]["num_classes"])
  return int(data.dataset_info(config.data)["num_classes"])



# ---------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------


class Stage2Sequences:
  """How a stage-2 model of one config turns batches into token sequences: the frozen
  VQGAN(s), token grid and window, vocabulary layout, the GPT, and the loss mask.
  Shared by the trainer (which adds the optimiser and steps) and by evaluation."""

  def __init__(self, config, first, cond=None, num_classes: Optional[int] = None):
    self.config = config
    first = default_input(first)
    self.first_model, self.first_config = first.model, first.config
    self.cond_model = cond.model if cond is not None else None
    self.cond_config = cond.config if cond is not None else None
    self.grid = token_grid(config, first)
    c = config.crop_tokens
    self.window = (c, c) if c else self.grid
    if num_classes is None:
      num_classes = resolve_num_classes(config)
    self.layout = conditioning.layout_for(config, first.n_embed, cond.n_embed if cond is not None else 0,
                             num_classes)
    self.prefix_len = self.layout.prefix_len(self.window)
    self.num_image_tokens = self.window[0] * self.window[1]
    self.gpt = build_gpt(config, self.layout, self.prefix_len, self.num_image_tokens)
    self.loss_mask = conditioning.loss_mask(self.prefix_len, self.num_image_tokens)

  @property
  def seq_len(self) -> int:
    """Length the GPT reads (condition + image tokens - 1)."""
    return self.prefix_len + self.num_image_tokens - 1

  def batch_keys(self, from_tokens: bool = False) -> Tuple[str, ...]:
    """Batch entries the steps read: images (encoded in the step) or exported tokens."""
    keys = ["tokens" if from_tokens else "image"]
    if self.layout.kind == "class":
      keys.append("label")
    if self.layout.kind == "spatial":
      keys.append("cond_tokens" if from_tokens else "segmentation")
    return tuple(keys)

  # ----------------------------------------------------------------- sequences
  def tokenize(self, frozen, batch) -> Tuple[jax.Array, Optional[jax.Array]]:
    """(image codes (B, h, w), condition codes (B, h, w) or None) of the full crop.

    A batch of exported tokens (key 'tokens', see vqgan_jax/tokens.py) is used as it is;
    a batch of images is encoded with the frozen VQGAN(s).
    """
    if "tokens" in batch:
      cond = batch["cond_tokens"].astype(jnp.int32) if self.layout.kind == "spatial" else None
      return batch["tokens"].astype(jnp.int32), cond
    image = encode(self.first_model, frozen["first"],
                   model_inputs(batch, self.first_config))
    cond = None
    if self.layout.kind == "spatial":
      cond = encode(self.cond_model, frozen["cond"],
                    model_inputs(batch, self.cond_config))
    return image, cond

  def sequence(self, frozen, batch, rng: jax.Array, train: bool) -> jax.Array:
    """Full token sequence (B, P + N): condition tokens then image tokens (clean)."""
    image, cond = self.tokenize(frozen, batch)
    b = image.shape[0]
    crop_key, drop_key = jax.random.split(rng)
    spans = (self.grid[0] - self.window[0], self.grid[1] - self.window[1])
    origins = (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
    if self.window != self.grid:
      ky, kx = jax.random.split(crop_key)
      origins = (jax.random.randint(ky, (b,), 0, spans[0] + 1),
                 jax.random.randint(kx, (b,), 0, spans[1] + 1))
      image, cond = conditioning.crop_grids([image, cond], origins, self.window)
    labels = None
    if self.layout.kind == "class":
      labels = batch["label"].astype(jnp.int32)
      if train and self.config.cond.cfg_dropout > 0:
        dropped = jax.random.bernoulli(drop_key, self.config.cond.cfg_dropout, (b,))
        labels = jnp.where(dropped, self.layout.null_id - self.layout.offset("class"), labels)
    prefix = conditioning.condition_tokens(self.layout, b, labels=labels, cond_codes=cond,
                              origins=origins, spans=spans)
    return jnp.concatenate([prefix, image.reshape(b, -1)], axis=1)


# ---------------------------------------------------------------------------------------
# Exported tokens (config.tokens_dir)
# ---------------------------------------------------------------------------------------




def exported_metadata(config, split: str) -> Optional[Dict[str, Any]]:
  """The metadata of `split` under config.tokens_dir; None for a validation split that was
  not exported (the train split must exist)."""
  try:
    return tokens_lib.read_metadata(config.tokens_dir, split)
  except tokens_lib.TokenFormatError as e:
    missing = not os.path.isfile(os.path.join(config.tokens_dir, split,
                                              tokens_lib.METADATA_FILE))
    if split == "validation" and missing:
      return None
    raise config_lib.ConfigError(f"config.tokens_dir={config.tokens_dir!r}: {e}") from e


def check_exported_tokens(config, first, cond=None) -> Dict[str, Optional[Dict[str, Any]]]:
  """Checks that the exported splits were made by the frozen checkpoints this config loads
  (step, codebook, grid, conditioning); returns {split: metadata or None}."""
  found = {}
  for split in ("train", "validation"):
    meta = exported_metadata(config, split)
    found[split] = meta
    if meta is None:
      continue
    where = os.path.join(config.tokens_dir, split, tokens_lib.METADATA_FILE)

    def mismatch(what, exported, expected, where=where):
      raise config_lib.ConfigError(
          f"{where}: the tokens were exported with {what} {exported!r}, but this config "
          f"uses {expected!r}; re-export them with the same checkpoint(s) and image size")

    record = meta.get("stage1") or {}
    if record.get("step") != first.step:
      mismatch(f"stage-1 step (from {record.get('workdir')})", record.get("step"), first.step)
    exported_from = record.get("workdir")
    if exported_from and os.path.abspath(config.first_stage.workdir) != exported_from:
      # Same step, codebook and grid but another folder: a moved workdir, or another run.
      logging.warning("%s was exported from %s, this config loads %s (same step %d)", where,
                      exported_from, os.path.abspath(config.first_stage.workdir), first.step)
    if meta["codebook_size"] != first.n_embed:
      mismatch("a codebook of size", meta["codebook_size"], first.n_embed)
    grid = list(token_grid(config, first))
    if meta["grid_shape"] != grid:
      mismatch("a token grid", meta["grid_shape"],
               f"{grid} (data.image_size={config.data.image_size})")
    if config.cond.kind == "spatial":
      exported_cond = meta.get("cond")
      if not exported_cond:
        raise config_lib.ConfigError(
            f"{where}: spatial conditioning needs condition tokens, but the export has none "
            "(export with --cond_workdir naming the conditioning VQGAN)")
      if exported_cond.get("step") != cond.step or exported_cond.get("codebook_size") != \
          cond.n_embed:
        mismatch("a conditioning VQGAN (step, codes)",
                 (exported_cond.get("step"), exported_cond.get("codebook_size")),
                 (cond.step, cond.n_embed))
  return found



# ---------------------------------------------------------------------------------------
# Trained stage-2 models
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage2Model:
  """A restored stage-2 model with the frozen VQGAN(s) it needs to sample and decode."""
  model: transformer.GPT
  params: Any
  config: ml_collections.ConfigDict
  metadata: Dict[str, Any]
  step: int
  layout: VocabLayout
  first_stage: checkpointing.FrozenStage1
  cond_stage: Optional[checkpointing.FrozenStage1]

  @property
  def window(self) -> Tuple[int, int]:
    return tuple(self.metadata["sequence"]["window"])

  @property
  def token_grid(self) -> Tuple[int, int]:
    return tuple(self.metadata["sequence"]["token_grid"])

  @property
  def prefix_len(self) -> int:
    return int(self.metadata["sequence"]["prefix_len"])


def read_stage2_metadata(workdir: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], int]:
  """(metadata, step) of a stage-2 workdir's checkpoint (newest unless `step`)."""
  if not workdir or not os.path.isdir(workdir):
    raise checkpointing.CheckpointError(f"stage-2 workdir {workdir!r} does not exist")
  manager = checkpointing.make_manager(workdir, read_only=True)
  steps = manager.all_steps() if checkpointing.checkpoint_dir(workdir).exists() else []
  if not steps:
    raise checkpointing.CheckpointError(f"stage-2 workdir {workdir} holds no finished checkpoint")
  if step is None or step < 0:
    step = max(steps)
  elif step not in steps:
    raise checkpointing.CheckpointError(
        f"stage-2 workdir {workdir} has no step {step}; it has {sorted(steps)}")
  metadata = checkpointing.read_metadata(manager, step)
  if metadata.get("stage") != "transformer":
    raise checkpointing.CheckpointError(
        f"{workdir} step {step} is a {metadata.get('stage')!r} checkpoint, not a stage-2 "
        "transformer")
  return metadata, int(step)


def load_stage2(workdir: str, step: Optional[int] = None, attention: Optional[str] = None,
                first_stage_workdir: Optional[str] = None,
                cond_stage_workdir: Optional[str] = None) -> Stage2Model:
  """Restores a stage-2 GPT (newest step unless `step`) and the frozen VQGAN(s) it was
  trained with (the workdirs/steps recorded in its metadata, unless overridden).

  `attention`: the attention type the caller expects; a checkpoint of another type fails.
  """
  metadata, step = read_stage2_metadata(workdir, step)
  if attention is not None and attention != metadata["attention"]:
    raise checkpointing.CheckpointError(
        f"{workdir} step {step} holds a GPT trained with {metadata['attention']!r} attention "
        f"but {attention!r} was asked for (config.model.attention); use the checkpoint's type")
  config = checkpointing.config_from_dict(metadata["config"])
  layout = VocabLayout.from_dict(metadata["vocab"])
  first = load_recorded_stage1(workdir, metadata["first_stage"], first_stage_workdir,
                               "--first_stage_workdir")
  cond = None
  if metadata.get("cond_stage"):
    cond = load_recorded_stage1(workdir, metadata["cond_stage"], cond_stage_workdir,
                                "--cond_stage_workdir")
  seq = metadata["sequence"]
  model_config = ml_collections.ConfigDict(config.to_dict())
  model_config.model.vocab_size = seq["vocab_size"]
  model_config.model.block_size = seq["block_size"]
  gpt = build_gpt(model_config, layout, seq["prefix_len"], seq["num_image_tokens"])
  abstract = jax.eval_shape(
      lambda: gpt.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
  single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract)
  manager = checkpointing.make_manager(workdir, read_only=True)
  restored = manager.restore(step, args=checkpointing.ocp.args.Composite(
      model=checkpointing.ocp.args.StandardRestore(abstract)))
  return Stage2Model(model=gpt, params=restored["model"], config=config, metadata=metadata,
                     step=step, layout=layout, first_stage=first, cond_stage=cond)


# ---------------------------------------------------------------------------------------
# Where a stage-2 run's VQGANs are: recorded, resolved, verified
# ---------------------------------------------------------------------------------------


def codebook_fingerprint(params) -> str:
  """sha256 (first 16 hex digits) of the quantizer's parameters (codebook and the
  convolutions around it): tells two VQGANs at the same step apart."""
  flat = traverse_util.flatten_dict(jax.device_get(params))
  digest = hashlib.sha256()
  for path in sorted(flat, key=lambda p: "/".join(map(str, p))):
    if any("quant" in str(part) for part in path):
      digest.update("/".join(map(str, path)).encode())
      digest.update(np.ascontiguousarray(np.asarray(flat[path], np.float32)).tobytes())
  return digest.hexdigest()[:16]


def frozen_record(stage2_workdir: str, stage1_workdir: str, frozen) -> Dict[str, Any]:
  """What a stage-2 checkpoint records of one frozen VQGAN: where it is (absolute, and
  relative to the stage-2 workdir so runs moved together still find it), its step and
  codebook fingerprint (to verify whatever is found there)."""
  absolute = os.path.abspath(stage1_workdir)
  return {"workdir": absolute,
          "relative_workdir": os.path.relpath(absolute, os.path.abspath(stage2_workdir)),
          "step": int(frozen.step), "n_embed": frozen.n_embed,
          "latent_grid": list(frozen.metadata["latent_grid"]),
          "downsample_factor": frozen.downsample_factor,
          "fingerprint": codebook_fingerprint(frozen.params)}


def recorded_stage1_candidates(stage2_workdir: str, record: Dict[str, Any],
                               override: Optional[str] = None):
  """Folders to try for a recorded VQGAN, in order: the override, the path relative to
  the stage-2 workdir, the recorded absolute path."""
  if override:
    return [override]
  found = []
  if record.get("relative_workdir"):
    found.append(os.path.normpath(os.path.join(os.path.abspath(stage2_workdir),
                                               record["relative_workdir"])))
  if record.get("workdir") and record["workdir"] not in found:
    found.append(record["workdir"])
  return found


def load_recorded_stage1(stage2_workdir: str, record: Dict[str, Any],
                         override: Optional[str], flag: str) -> checkpointing.FrozenStage1:
  """Loads the VQGAN a stage-2 checkpoint records (see `frozen_record`), verified by step,
  codebook size and fingerprint; errors name `flag`, the override every command takes."""
  candidates = recorded_stage1_candidates(stage2_workdir, record, override)
  existing = [c for c in candidates if os.path.isdir(c)]
  if not existing:
    raise checkpointing.CheckpointError(
        f"{stage2_workdir} was trained on the VQGAN at {record.get('workdir')} (step "
        f"{record['step']}), which is not there (looked in {candidates}); pass its folder "
        f"with {flag}=DIR")
  where = existing[0]
  frozen = default_input(checkpointing.load_stage1(where, record["step"]))
  if frozen.n_embed != record["n_embed"]:
    raise checkpointing.CheckpointError(
        f"{stage2_workdir} was trained on a stage-1 model with {record['n_embed']} codes but "
        f"{where} step {record['step']} has {frozen.n_embed}; pass the right one with {flag}")
  expected = record.get("fingerprint")
  if expected and codebook_fingerprint(frozen.params) != expected:
    raise checkpointing.CheckpointError(
        f"{where} step {record['step']} is not the VQGAN {stage2_workdir} was trained on "
        f"(its codebook differs); pass the right one with {flag}=DIR")
  return frozen

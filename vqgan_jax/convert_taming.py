"""Imports taming-transformers checkpoints (VQGAN and transformer) as vqgan_jax workdirs.

  python -m vqgan_jax.convert_taming --ckpt model.ckpt --config model.yaml --output DIR \\
      [--keep_discriminator] [--overwrite] [--step N] [--reader numpy|torch]

Reads a reference Lightning checkpoint and its yaml config and writes workdirs that
`eval`, `sample`, `export_tokens` and the trainers accept as they are:

  VQModel              DIR/                  stage-1 workdir (checkpoints/ + config.py)
  Net2NetTransformer   DIR/                  stage-2 workdir (checkpoints/ + config.py)
                       DIR/first_stage/      its VQGAN, a stage-1 workdir
                       DIR/cond_stage/       the conditioning VQGAN, when there is one

The converted model is written at the checkpoint's `global_step` (or --step), the VQGANs
inside a transformer checkpoint at step 0, each with all items a resumed run restores
(fresh optimiser states), and `config.py` is the equivalent ml_collections config
(`--config DIR/config.py` for the trainers, eval and export).

Weights: conv OIHW -> HWIO, 1x1 convs of attention and quant_conv -> Dense (in, out),
Linear (out, in) -> (in, out), GroupNorm/LayerNorm weight -> scale, the codebook as is.
Every state-dict key is either mapped or dropped by a named rule (`loss.*` unless
--keep_discriminator; the attention masks of the GPT, checked to be causal; a
segmentation VQGAN's colour table), and every parameter of our model must be filled with
the right shape; anything else is an error that lists the keys.

Vocabulary: the reference puts condition ids in the image vocabulary (the start token is
`sos_token`, usually 0; class c is id c; a conditioning VQGAN's code j is id j). Our
models keep them in separate ranges (conditioning.VocabLayout), so the converted
token embedding and head are gathered from the reference's rows: our id of image code i
reads row i, our start id reads row sos_token, our class c reads row c, our spatial code j
reads row j. For the same (condition, image) sequence the converted GPT gives exactly the
reference's logits over the image codes.

The PyTorch file is read with `vqgan_jax.torch_checkpoint` (numpy only, an allow-listed
unpickler: no code from the file runs); `--reader torch` uses
`torch.load(weights_only=True)` instead when torch is installed. The output is written
into a temporary folder next to --output and renamed at the end, so a failure leaves
nothing behind; a non-empty --output is refused unless --overwrite.
"""

# Over 500 lines on purpose: the rename tables of every supported reference model and
# their checks are one converter; the safe checkpoint reader is torch_checkpoint.py.

import importlib
import json
import os
import re
import shutil
import tempfile
import types
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import yaml
from absl import flags
from flax import traverse_util

from configs import transformer_default, vqgan_default
from vqgan_jax import (checkpointing, cli, conditioning, config_lib, handoff,
                       torch_checkpoint)
from vqgan_jax.models import discriminator, lpips, vqgan
from vqgan_jax.training import optim
from vqgan_jax.training import stage1 as stage1_trainer
from vqgan_jax.training import stage2 as stage2_trainer

VQMODEL = "taming.models.vqgan.VQModel"
NET2NET = "taming.models.cond_transformer.Net2NetTransformer"
MINGPT = "taming.modules.transformer.mingpt.GPT"
LABELATOR = "taming.modules.util.Labelator"
SOS_PROVIDER = "taming.modules.util.SOSProvider"
COORD_STAGE = "taming.modules.misc.coord.CoordStage"
IDENTITY_PERMUTER = "taming.modules.transformer.permuter.Identity"
VQ_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
# Losses that hold no parameters we would keep; the loss only matters for training.
PARAMETER_FREE_LOSSES = ("taming.modules.losses.vqperceptual.DummyLoss", "torch.nn.Identity",
                         "taming.modules.losses.segmentation.BCELossWithQuant",
                         "taming.modules.losses.segmentation.BCELoss")


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; the message names file and key."""


# ---------------------------------------------------------------------------------------
# yaml
# ---------------------------------------------------------------------------------------


def read_yaml(path: str) -> Dict[str, Any]:
  """The `model` section ({target, params, base_learning_rate}) of a reference yaml."""
  if not os.path.isfile(path):
    raise ConversionError(f"config {path} does not exist or is not a file")
  try:
    with open(path) as f:
      doc = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ConversionError(f"config {path} is not valid yaml: {e}") from e
  if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict) or \
      "target" not in doc["model"]:
    raise ConversionError(f"config {path} has no model.target: not a taming-transformers "
                          "model config")
  return doc["model"]


def _check_keys(params: Dict[str, Any], known, where: str, path: str) -> None:
  unknown = sorted(set(params) - set(known))
  if unknown:
    raise ConversionError(f"{path}: {where} has keys this converter does not know: {unknown}")


def _require(condition: bool, path: str, message: str) -> None:
  if not condition:
    raise ConversionError(f"{path}: {message}")


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

_DDCONFIG_KEYS = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                  "resamp_with_conv", "in_channels", "resolution", "z_channels", "double_z",
                  "give_pre_end")
_VQMODEL_KEYS = ("ddconfig", "lossconfig", "n_embed", "embed_dim", "ckpt_path", "ignore_keys",
                 "image_key", "colorize_nlabels", "monitor", "remap", "sane_index_shape")
_VQ_LOSS_KEYS = ("disc_start", "codebook_weight", "pixelloss_weight", "disc_num_layers",
                 "disc_in_channels", "disc_factor", "disc_weight", "perceptual_weight",
                 "use_actnorm", "disc_conditional", "disc_ndf", "disc_loss")


def vqgan_config(model: Dict[str, Any], path: str,
                 base_learning_rate: Optional[float] = None) -> ml_collections.ConfigDict:
  """Our stage-1 config for a reference VQModel entry {target, params}."""
  if model.get("target") != VQMODEL:
    raise ConversionError(f"{path}: first/conditioning stage target {model.get('target')!r} "
                          f"is not supported (only {VQMODEL})")
  p = model.get("params") or {}
  _check_keys(p, _VQMODEL_KEYS, f"{VQMODEL} params", path)
  _require(p.get("remap") is None, path, "VQModel remap (index remapping) is not supported")
  dd = p.get("ddconfig") or {}
  _check_keys(dd, _DDCONFIG_KEYS, "ddconfig", path)
  _require(not dd.get("double_z", False), path, "ddconfig.double_z=True is not a VQGAN")
  _require(dd.get("resamp_with_conv", True), path, "ddconfig.resamp_with_conv=False is not "
           "supported (our Downsample/Upsample have convolutions)")
  _require(not dd.get("give_pre_end", False), path, "ddconfig.give_pre_end is not supported")
  config = vqgan_default.get_config()
  m = config.model
  m.ch = int(dd["ch"])
  m.ch_mult = tuple(int(c) for c in dd["ch_mult"])
  m.num_res_blocks = int(dd["num_res_blocks"])
  m.attn_resolutions = tuple(int(r) for r in dd["attn_resolutions"])
  m.dropout = float(dd.get("dropout", 0.0))
  m.resolution = int(dd["resolution"])
  m.in_channels = int(dd["in_channels"])
  m.out_ch = int(dd["out_ch"])
  m.z_channels = int(dd["z_channels"])
  m.embed_dim = int(p["embed_dim"])
  m.n_embed = int(p["n_embed"])
  # VQModel builds VectorQuantizer2 with beta=0.25 and the legacy placement: our defaults.
  config.data.image_size = m.resolution
  if p.get("image_key") == "segmentation":
    config.data.input = "segmentation"
    config.data.photos.num_segments = m.in_channels
  if base_learning_rate is not None:
    config.base_learning_rate = float(base_learning_rate)
  loss = p.get("lossconfig") or {}
  target = loss.get("target")
  if target == VQ_LOSS:
    lp = loss.get("params") or {}
    _check_keys(lp, _VQ_LOSS_KEYS, f"{VQ_LOSS} params", path)
    _require(float(lp.get("pixelloss_weight", 1.0)) == 1.0, path,
             "lossconfig pixelloss_weight != 1 has no counterpart here")
    _require(not lp.get("use_actnorm", False), path, "an ActNorm discriminator is not supported")
    _require(not lp.get("disc_conditional", False), path,
             "a conditional discriminator is not supported")
    _require(int(lp.get("disc_in_channels", 3)) == m.in_channels, path,
             f"disc_in_channels={lp.get('disc_in_channels')} but in_channels={m.in_channels}")
    l = config.loss
    l.disc_start = int(lp["disc_start"])
    l.codebook_weight = float(lp.get("codebook_weight", 1.0))
    l.disc_num_layers = int(lp.get("disc_num_layers", 3))
    l.disc_factor = float(lp.get("disc_factor", 1.0))
    l.disc_weight = float(lp.get("disc_weight", 1.0))
    l.perceptual_weight = float(lp.get("perceptual_weight", 1.0))
    l.disc_ndf = int(lp.get("disc_ndf", 64))
    l.disc_loss = str(lp.get("disc_loss", "hinge"))
    l.disc_norm = "batch"
  elif target not in PARAMETER_FREE_LOSSES:
    raise ConversionError(f"{path}: lossconfig target {target!r} is not supported (known: "
                          f"{VQ_LOSS}, {', '.join(PARAMETER_FREE_LOSSES)})")
  try:
    config_lib.validate_vqgan_config(config)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{path}: the VQGAN config does not fit vqgan_jax: {e}") from e
  return config


_NET2NET_KEYS = ("transformer_config", "first_stage_config", "cond_stage_config",
                 "permuter_config", "ckpt_path", "ignore_keys", "first_stage_key",
                 "cond_stage_key", "downsample_cond_size", "pkeep", "sos_token", "unconditional")
_GPT_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "embd_pdrop",
             "resid_pdrop", "attn_pdrop", "n_unmasked")


class CondSpec(types.SimpleNamespace):
  """How a Net2NetTransformer is conditioned: kind ('none' | 'class' | 'spatial'),
  sos_token, num_classes, the conditioning VQGAN's config, cond_stage_key."""


def transformer_spec(model: Dict[str, Any], path: str):
  """(GPT params, first-stage entry, CondSpec, pkeep) of a Net2NetTransformer entry."""
  p = model.get("params") or {}
  _check_keys(p, _NET2NET_KEYS, f"{NET2NET} params", path)
  permuter = (p.get("permuter_config") or {}).get("target", IDENTITY_PERMUTER)
  _require(permuter == IDENTITY_PERMUTER, path,
           f"permuter {permuter!r} is not supported (only the identity, raster order)")
  _require(int(p.get("downsample_cond_size", -1)) == -1, path,
           "downsample_cond_size (resizing the condition before encoding) is not supported")
  t = p.get("transformer_config") or {}
  _require(t.get("target") == MINGPT, path,
           f"transformer target {t.get('target')!r} is not supported (only {MINGPT})")
  gpt = dict(t.get("params") or {})
  _check_keys(gpt, _GPT_KEYS, f"{MINGPT} params", path)
  _require(int(gpt.get("n_unmasked", 0)) == 0, path,
           "n_unmasked > 0 (a bidirectional prefix) is not supported")
  cond = p.get("cond_stage_config")
  sos = int(p.get("sos_token", 0))
  if cond == "__is_first_stage__":
    raise ConversionError(f"{path}: cond_stage_config '__is_first_stage__' is not supported")
  if cond == "__is_unconditional__" or p.get("unconditional", False):
    spec = CondSpec(kind="none", sos_token=sos, num_classes=0, vq=None, key=None)
  elif not isinstance(cond, dict):
    raise ConversionError(f"{path}: cond_stage_config {cond!r} is not supported")
  elif cond.get("target") == SOS_PROVIDER:
    spec = CondSpec(kind="none", sos_token=int((cond.get("params") or {})["sos_token"]),
                    num_classes=0, vq=None, key=None)
  elif cond.get("target") == LABELATOR:
    spec = CondSpec(kind="class", sos_token=None,
                    num_classes=int((cond.get("params") or {})["n_classes"]), vq=None,
                    key=p.get("cond_stage_key"))
  elif cond.get("target") == VQMODEL:
    spec = CondSpec(kind="spatial", sos_token=None, num_classes=0, vq=cond,
                    key=p.get("cond_stage_key", "depth"))
  elif cond.get("target") == COORD_STAGE:
    raise ConversionError(
        f"{path}: the coordinate conditioning of {COORD_STAGE} (one token per latent "
        "position, from a coordinate map) has no counterpart here: vqgan_jax's "
        "cond.kind='coord' conditions on the crop origin with two tokens")
  else:
    raise ConversionError(f"{path}: cond_stage_config target {cond.get('target')!r} is not "
                          f"supported (known: {LABELATOR}, {SOS_PROVIDER}, {VQMODEL}, "
                          "'__is_unconditional__')")
  first = p.get("first_stage_config")
  if not isinstance(first, dict):
    raise ConversionError(f"{path}: first_stage_config is missing")
  return gpt, first, spec, float(p.get("pkeep", 1.0))


def latent_grid(config) -> Tuple[int, int]:
  f = 2 ** (len(config.model.ch_mult) - 1)
  return (config.model.resolution // f, config.model.resolution // f)


def transformer_config(gpt: Dict[str, Any], first: ml_collections.ConfigDict, spec: CondSpec,
                       cond: Optional[ml_collections.ConfigDict], pkeep: float,
                       base_learning_rate: Optional[float], first_workdir: str,
                       cond_workdir: Optional[str]):
  """(our stage-2 config, VocabLayout, prefix_len, num_image_tokens) for the reference GPT."""
  config = transformer_default.get_config()
  grid = latent_grid(first)
  fs = config.first_stage
  fs.workdir = first_workdir
  fs.n_embed = int(first.model.n_embed)
  fs.latent_grid = grid
  m = config.model
  m.n_layer, m.n_head, m.n_embd = int(gpt["n_layer"]), int(gpt["n_head"]), int(gpt["n_embd"])
  for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
    m[key] = float(gpt.get(key, 0.0))
  c = config.cond
  c.kind = spec.kind
  if spec.kind == "class":
    c.num_classes = spec.num_classes
  if spec.kind == "spatial":
    c.cond_stage_workdir = cond_workdir
    c.n_embed = int(cond.model.n_embed)
    c.latent_grid = latent_grid(cond)
    config.data.photos.num_segments = int(cond.model.in_channels)
  config.pkeep = pkeep
  config.data.image_size = int(first.model.resolution)
  if base_learning_rate is not None:
    config.base_learning_rate = float(base_learning_rate)
  layout = conditioning.layout_for(config, fs.n_embed, c.n_embed if cond else 0,
                                     spec.num_classes)
  prefix = layout.prefix_len(grid)
  n = grid[0] * grid[1]
  m.vocab_size = layout.vocab_size
  m.block_size = int(gpt["block_size"])
  return config, layout, prefix, n


def reference_ids(layout, spec: CondSpec) -> np.ndarray:
  """For each of our ids, the reference id whose embedding/head row it takes."""
  ids = np.zeros((layout.vocab_size,), np.int64)
  a, b = layout.range("image")
  ids[a:b] = np.arange(b - a)
  if spec.kind == "none":
    ids[layout.start_id] = spec.sos_token
  elif spec.kind == "class":
    a, b = layout.range("class")
    ids[a:b] = np.arange(b - a)
  elif spec.kind == "spatial":
    a, b = layout.range("spatial")
    ids[a:b] = np.arange(b - a)
  return ids


# ---------------------------------------------------------------------------------------
# State-dict mapping
# ---------------------------------------------------------------------------------------


def _flat_shapes(tree) -> Dict[str, Tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _to_target(value: np.ndarray, target_path: str, target_shape) -> np.ndarray:
  """Torch layout -> ours, decided by the target leaf and the ranks."""
  leaf = target_path.rsplit("/", 1)[-1]
  if leaf == "kernel":
    if value.ndim == 4 and len(target_shape) == 4:
      value = value.transpose(2, 3, 1, 0)        # OIHW -> HWIO
    elif value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0].T                # 1x1 conv -> Dense (in, out)
    elif value.ndim == 2:
      value = value.T                            # Linear (out, in) -> (in, out)
  return value


class KeyMapper:
  """Maps state-dict keys onto a flat target tree; collects every problem, then fails."""

  def __init__(self, path: str, targets: Dict[str, Tuple[int, ...]], what: str):
    self.path, self.targets, self.what = path, targets, what
    self.filled: Dict[str, np.ndarray] = {}
    self.unmapped, self.bad_shapes, self.dropped = [], [], {}

  def assign(self, key: str, value: np.ndarray, target: str) -> None:
    if target not in self.targets:
      self.unmapped.append(f"{key} (-> {target}, which {self.what} does not have)")
      return
    value = _to_target(np.asarray(value), target, self.targets[target])
    if tuple(value.shape) != self.targets[target]:
      self.bad_shapes.append(f"{key}: checkpoint {tuple(value.shape)} (as {target}) vs "
                             f"model {self.targets[target]}")
      return
    self.filled[target] = value.astype(np.float32)

  def drop(self, key: str, reason: str) -> None:
    self.dropped[key] = reason

  def unknown(self, key: str) -> None:
    self.unmapped.append(key)

  def finish(self):
    missing = sorted(set(self.targets) - set(self.filled))
    problems = []
    if self.unmapped:
      problems.append(f"keys with no place in {self.what}: {sorted(self.unmapped)}")
    if self.bad_shapes:
      problems.append(f"shape mismatches: {self.bad_shapes}")
    if missing:
      problems.append(f"parameters of {self.what} that no key fills: {missing}")
    if problems:
      raise ConversionError(f"{self.path}: " + "; ".join(problems))
    return traverse_util.unflatten_dict(self.filled, sep="/")


_VQ_RENAMES = (
    (re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)\."), r"\1/\2_\3_\4_\5/"),
    (re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\."),
     r"\1/\2_\3_\4/conv/"),
    (re.compile(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\."), r"\1/mid_\2/"),
)


def vq_target(key: str, targets) -> str:
  """Our parameter path for a VQModel state-dict key (without the model prefix)."""
  if key == "quantize.embedding.weight":
    return "quantize/embedding"
  for pattern, repl in _VQ_RENAMES:
    key = pattern.sub(repl, key)
  path = key.replace(".", "/")
  if path.endswith("/weight"):
    base = path[:-len("/weight")]
    path = base + ("/scale" if base + "/scale" in targets else "/kernel")
  return path


def abstract_vqgan(config):
  model = vqgan.vqmodel_from_config(config.model)
  return model, checkpointing.abstract_vqgan_params(model, config.model.resolution)


def convert_vqgan(state: Dict[str, Any], prefix: str, config, path: str,
                  keep_discriminator: bool = False):
  """(generator params, discriminator variables or None, dropped keys) of the VQModel whose
  keys start with `prefix` in `state` (other keys are left to the caller)."""
  _, abstract = abstract_vqgan(config)
  mapper = KeyMapper(path, _flat_shapes(abstract), f"our VQModel ({prefix or 'top level'})")
  disc_state = {}
  for key in sorted(k for k in state if k.startswith(prefix)):
    local = key[len(prefix):]
    if local.startswith("loss."):
      if keep_discriminator and local.startswith("loss.discriminator."):
        disc_state[local[len("loss.discriminator."):]] = state[key]
      elif keep_discriminator and local.startswith("loss.perceptual_loss."):
        disc_state["__lpips__." + local[len("loss.perceptual_loss."):]] = state[key]
      else:
        mapper.drop(key, "training loss (LPIPS, discriminator): not needed by the model")
      continue
    if local == "colorize":
      mapper.drop(key, "colour table for logging segmentation maps")
      continue
    mapper.assign(key, torch_checkpoint.to_numpy(state[key]), vq_target(local, mapper.targets))
  params = mapper.finish()
  disc = None
  if keep_discriminator:
    disc = convert_discriminator(disc_state, config, path, prefix + "loss.", mapper.dropped)
  return params, disc, mapper.dropped


def convert_discriminator(disc_state, config, path: str, prefix: str, dropped):
  """Discriminator variables {"params", "batch_stats"} from `loss.discriminator.*`; LPIPS's
  linear layers are checked against the packaged ones that training uses."""
  lpips_keys = {k[len("__lpips__."):]: v for k, v in disc_state.items()
                if k.startswith("__lpips__.")}
  _check_lpips(lpips_keys, path, prefix, dropped)
  disc_state = {k: v for k, v in disc_state.items() if not k.startswith("__lpips__.")}
  if not disc_state:
    raise ConversionError(f"{path}: --keep_discriminator but the checkpoint has no "
                          f"{prefix}discriminator.* keys")
  l = config.loss
  model = discriminator.NLayerDiscriminator(ndf=l.disc_ndf, n_layers=l.disc_num_layers,
                                            norm=l.disc_norm)
  x = jnp.zeros((1, 32, 32, config.model.in_channels))
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  mapper = KeyMapper(path, _flat_shapes(abstract), "our NLayerDiscriminator")
  n = l.disc_num_layers
  convs = {0: "conv_0", 3 * n + 2: f"conv_{n + 1}"}
  convs.update({3 * i - 1: f"conv_{i}" for i in range(1, n + 1)})
  norms = {3 * i: f"norm_{i}" for i in range(1, n + 1)}
  bn_leaves = {"weight": "params/{}/scale", "bias": "params/{}/bias",
               "running_mean": "batch_stats/{}/mean", "running_var": "batch_stats/{}/var"}
  for local, value in sorted(disc_state.items()):
    key = f"{prefix}discriminator.{local}"
    match = re.fullmatch(r"main\.(\d+)\.(\w+)", local)
    if not match:
      mapper.unknown(key)
      continue
    index, leaf = int(match.group(1)), match.group(2)
    if index in convs and leaf in ("weight", "bias"):
      mapper.assign(key, torch_checkpoint.to_numpy(value),
                    f"params/{convs[index]}/{'kernel' if leaf == 'weight' else 'bias'}")
    elif index in norms and leaf == "num_batches_tracked":
      mapper.drop(key, "BatchNorm step counter")
    elif index in norms and leaf in bn_leaves:
      mapper.assign(key, torch_checkpoint.to_numpy(value), bn_leaves[leaf].format(norms[index]))
    else:
      mapper.unknown(key)
  dropped.update(mapper.dropped)
  return mapper.finish()


def _check_lpips(lpips_state, path: str, prefix: str, dropped) -> None:
  """Training uses the packaged LPIPS (v0.1 linear layers); a checkpoint whose linear
  layers differ could not continue with the same loss, so that is an error."""
  lin = {k: v for k, v in lpips_state.items() if re.fullmatch(r"lin\d\.model\.1\.weight", k)}
  for k in lpips_state:
    key = f"{prefix}perceptual_loss.{k}"
    if k in lin:
      dropped[key] = "LPIPS linear layer, equal to the packaged LPIPS weights (checked)"
    elif k.startswith(("net.", "scaling_layer.")):
      dropped[key] = "LPIPS VGG16 backbone / input scaling: vqgan_jax uses the packaged copy"
    else:
      raise ConversionError(f"{path}: key {key} has no place in vqgan_jax's LPIPS")
  if not lin:
    return
  packaged = lpips.load_lpips_params()
  for k, v in sorted(lin.items()):
    i = int(k[3])
    ours = np.asarray(packaged[f"lin_{i}"]["kernel"])
    theirs = _to_target(torch_checkpoint.to_numpy(v), "kernel", ours.shape)
    if theirs.shape != ours.shape or np.max(np.abs(theirs - ours)) > 1e-6:
      raise ConversionError(
          f"{path}: {prefix}perceptual_loss.{k} differs from the packaged LPIPS weights "
          "that vqgan_jax's stage-1 training uses; continued GAN training would change the "
          "loss (convert without --keep_discriminator to drop it)")


def gpt_target(key: str) -> Optional[str]:
  key = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1/", key)
  key = key.replace("mlp.0.", "mlp/fc/").replace("mlp.2.", "mlp/proj/")
  path = key.replace(".", "/")
  if re.search(r"(^|/)(ln1|ln2|ln_f)/weight$", path):
    return path[:-len("weight")] + "scale"
  if path.endswith("/weight"):
    return path[:-len("weight")] + "kernel"
  return path


def convert_gpt(state: Dict[str, Any], prefix: str, gpt_module, ref_ids: np.ndarray,
                ref_vocab: int, path: str):
  """Our GPT params from the reference's `transformer.*` keys, with the embedding and
  head gathered to our vocabulary by `ref_ids`."""
  abstract = jax.eval_shape(
      lambda: gpt_module.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  mapper = KeyMapper(path, _flat_shapes(abstract), "our GPT")
  block = gpt_module.block_size
  for key in sorted(k for k in state if k.startswith(prefix)):
    local = key[len(prefix):]
    value = torch_checkpoint.to_numpy(state[key])
    if re.fullmatch(r"blocks\.\d+\.attn\.mask", local):
      causal = np.tril(np.ones((block, block), value.dtype))
      if value.shape != (1, 1, block, block) or not np.array_equal(value[0, 0], causal):
        raise ConversionError(f"{path}: {key} is not a causal mask of block size {block}")
      mapper.drop(key, "causal attention mask (a constant)")
    elif local in ("tok_emb.weight", "head.weight"):
      if value.shape[0] != ref_vocab:
        mapper.bad_shapes.append(f"{key}: checkpoint {value.shape}, vocab_size {ref_vocab}")
        continue
      gathered = value[ref_ids]
      if local == "tok_emb.weight":
        mapper.assign(key, gathered, "wte/embedding")
      else:
        mapper.assign(key, gathered, "head/kernel")
    elif local == "pos_emb":
      mapper.assign(key, value.reshape(value.shape[1:]), "wpe")
    else:
      mapper.assign(key, value, gpt_target(local))
  return mapper.finish(), mapper.dropped


# ---------------------------------------------------------------------------------------
# Workdirs
# ---------------------------------------------------------------------------------------


def config_source(config: ml_collections.ConfigDict, default_module: str, header: str) -> str:
  """A config file: the default config plus one assignment per value that differs."""
  default = importlib.import_module(f"configs.{default_module}").get_config()
  ours = traverse_util.flatten_dict(checkpointing.config_to_dict(config), sep=".")
  base = traverse_util.flatten_dict(checkpointing.config_to_dict(default), sep=".")
  extra = sorted(set(ours) - set(base))
  if extra:
    raise ConversionError(f"config keys unknown to configs/{default_module}.py: {extra}")
  lines = [f'"""{header}"""', "", f"from configs import {default_module}", "", "",
           "def get_config():", f"  config = {default_module}.get_config()"]
  for key in sorted(ours):
    value = ours[key]
    if value != base[key]:
      value = tuple(value) if isinstance(value, list) else value
      lines.append(f"  config.{key} = {value!r}")
  lines += ["  return config", ""]
  return "\n".join(lines)


def _write_checkpoint(workdir: str, step: int, params, trainer, metadata) -> None:
  manager = checkpointing.make_manager(workdir, max_to_keep=1, async_checkpointing=False)
  checkpointing.save(manager, step, params, trainer, metadata, force=True)
  manager.wait_until_finished()
  manager.close()


def _fresh_opt_state(tx, params):
  """tx.init(params) for Adam/AdamW (+ clipping), whose initial states are all zeros (step
  counts and moments), built without compiling anything."""
  abstract = jax.eval_shape(tx.init, params)
  return jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract)


def _fresh_discriminator(model, in_channels: int, seed: int):
  """A newly initialised discriminator, as `model.init` would draw it (conv kernels
  N(0, 0.02), norm scales N(1, 0.02), zero biases, BatchNorm statistics 0 / 1), filled
  with numpy: XLA's CPU compile of the discriminator's forward pass takes seconds."""
  x = jnp.zeros((1, 32, 32, in_channels))
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.default_rng(seed)
  draw = {"kernel": lambda s: rng.normal(0.0, 0.02, s), "scale": lambda s: rng.normal(1.0, 0.02, s),
          "bias": np.zeros, "mean": np.zeros, "var": np.ones}
  flat = traverse_util.flatten_dict(abstract)
  return traverse_util.unflatten_dict(
      {k: draw[k[-1]](v.shape).astype(v.dtype) for k, v in flat.items()})


def write_stage1(workdir: str, final_workdir: str, config, params, step: int, disc,
                 source: Dict[str, Any]) -> Dict[str, Any]:
  """A stage-1 workdir: checkpoint (model, fresh optimiser states, discriminator) +
  config.py. `final_workdir` is where it will live (recorded paths)."""
  setup = stage1_trainer.Stage1Setup(config)
  if disc is None:
    disc = _fresh_discriminator(setup.disc, config.model.in_channels, config.seed)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  d_params = jax.tree_util.tree_map(jnp.asarray, disc["params"])
  trainer = stage1_trainer.TrainerState(
      step=jnp.asarray(step, jnp.int32), g_opt_state=_fresh_opt_state(setup.g_tx, params),
      d_params=d_params,
      d_batch_stats=jax.tree_util.tree_map(jnp.asarray, disc.get("batch_stats", {})),
      d_opt_state=_fresh_opt_state(setup.d_tx, d_params),
      code_usage_ema=jnp.full((config.model.n_embed,), 1.0, jnp.float32),
      nonfinite_steps=jnp.zeros((), jnp.int32))
  metadata = checkpointing.stage1_metadata(config, step)
  metadata["converted_from"] = source
  _write_checkpoint(workdir, step, params, trainer, metadata)
  header = (f"vqgan_jax stage-1 config converted from taming-transformers' "
            f"{os.path.basename(source['config'])}.\n\n"
            f"  python -m vqgan_jax.eval --config {final_workdir}/config.py "
            f"--workdir {final_workdir}\n")
  with open(os.path.join(workdir, "config.py"), "w") as f:
    f.write(config_source(config, "vqgan_default", header))
  return metadata


def write_stage2(workdir: str, final_workdir: str, config, layout, prefix: int, n: int,
                 gpt_module, params, step: int, first_record, cond_record,
                 source: Dict[str, Any]) -> Dict[str, Any]:
  grid = tuple(config.first_stage.latent_grid)
  setup = types.SimpleNamespace(layout=layout, prefix_len=prefix, window=grid, grid=grid,
                                num_image_tokens=n, gpt=gpt_module)
  metadata = stage2_trainer.stage2_metadata(config, setup, step, first_record, cond_record)
  metadata["converted_from"] = source
  params = jax.tree_util.tree_map(jnp.asarray, params)
  trainer = stage2_trainer.TrainerState(
      step=jnp.asarray(step, jnp.int32),
      opt_state=_fresh_opt_state(optim.make_optimizer(config), params),
      nonfinite_steps=jnp.zeros((), jnp.int32))
  _write_checkpoint(workdir, step, params, trainer, metadata)
  header = (f"vqgan_jax stage-2 config converted from taming-transformers' "
            f"{os.path.basename(source['config'])}.\n\n"
            f"  python -m vqgan_jax.sample --workdir {final_workdir} --output SAMPLES_DIR\n")
  with open(os.path.join(workdir, "config.py"), "w") as f:
    f.write(config_source(config, "transformer_default", header))
  return metadata


def _frozen_record(workdir: str, output: str, config, step: int, params) -> Dict[str, Any]:
  """As handoff.frozen_record: the frozen stage by absolute and relative path (it sits
  inside the stage-2 output), step and codebook fingerprint."""
  f = 2 ** (len(config.model.ch_mult) - 1)
  return {"workdir": workdir, "relative_workdir": os.path.relpath(workdir, output),
          "step": int(step), "n_embed": int(config.model.n_embed),
          "latent_grid": list(latent_grid(config)), "downsample_factor": f,
          "fingerprint": handoff.codebook_fingerprint(params)}


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def _prepare_output(output: str, overwrite: bool) -> str:
  output = os.path.abspath(output)
  if os.path.exists(output):
    if not os.path.isdir(output):
      raise ConversionError(f"--output {output} exists and is not a folder")
    if os.listdir(output) and not overwrite:
      raise ConversionError(f"--output {output} is not empty; pass --overwrite to replace it")
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  return output


def _commit(tmp: str, output: str) -> None:
  old = None
  if os.path.exists(output):
    old = tempfile.mkdtemp(prefix=os.path.basename(output) + ".old-", dir=os.path.dirname(output))
    os.rename(output, os.path.join(old, "x"))
  os.rename(tmp, output)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def convert(ckpt: str, config_path: str, output: str, *, keep_discriminator: bool = False,
            overwrite: bool = False, step: Optional[int] = None,
            reader: str = "numpy") -> Dict[str, Any]:
  """Converts one reference checkpoint; returns a summary (also printed by the CLI)."""
  output = _prepare_output(output, overwrite)
  model = read_yaml(config_path)
  try:
    state, rest = torch_checkpoint.load_state_dict(ckpt, reader)
  except torch_checkpoint.TorchCheckpointError as e:
    raise ConversionError(str(e)) from e
  global_step = rest.get("global_step")
  global_step = int(global_step) if isinstance(global_step, (int, np.integer)) else None
  if step is None or step < 0:
    step = global_step or 0
  source = {"ckpt": os.path.abspath(ckpt), "config": os.path.abspath(config_path),
            "target": model["target"], "global_step": global_step}
  try:
    plan, stage2, summary, dropped = _plan(model, state, ckpt, config_path, output,
                                           keep_discriminator)
  except (KeyError, TypeError) as e:
    raise ConversionError(f"{config_path}: a required entry is missing or malformed "
                          f"({type(e).__name__}: {e})") from e

  tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=os.path.dirname(output))
  try:
    records = {}
    for sub, cfg, params, disc in plan:
      final = os.path.join(output, sub) if sub else output
      target = os.path.join(tmp, sub) if sub else tmp
      sub_step = 0 if sub else step  # frozen stages of a transformer: step 0
      os.makedirs(target, exist_ok=True)
      write_stage1(target, final, cfg, params, sub_step, disc, source)
      records[sub] = _frozen_record(final, output, cfg, sub_step, params)
    if stage2 is not None:
      write_stage2(tmp, output, *stage2, step, records["first_stage"],
                   records.get("cond_stage"), source)
    _commit(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  summary.update(step=step, dropped_keys=len(dropped),
                 dropped_rules=sorted(set(dropped.values())),
                 converted_keys=len(state) - len(dropped))
  return summary


def _plan(model, state, ckpt: str, config_path: str, output: str, keep_discriminator: bool):
  """Everything that can fail before writing: configs and converted parameters.
  Returns ([(subfolder, stage-1 config, params, discriminator)], stage-2 pieces or None,
  summary, dropped keys)."""
  base_lr = model.get("base_learning_rate")
  where = f"{ckpt} ({config_path})"
  if model["target"] == VQMODEL:
    config = vqgan_config(model, config_path, base_lr)
    params, disc, dropped = convert_vqgan(state, "", config, where, keep_discriminator)
    return [("", config, params, disc)], None, {"kind": "vqgan", "workdir": output}, dropped
  elif model["target"] == NET2NET:
    if keep_discriminator:
      raise ConversionError(f"{config_path}: --keep_discriminator applies to VQModel "
                            "checkpoints only")
    gpt, first_entry, spec, pkeep = transformer_spec(model, config_path)
    first = vqgan_config(first_entry, config_path)
    first_params, _, dropped = convert_vqgan(state, "first_stage_model.", first, where)
    cond = cond_params = None
    if spec.kind == "spatial":
      cond = vqgan_config(spec.vq, config_path)
      cond_params, _, more = convert_vqgan(state, "cond_stage_model.", cond, where)
      dropped.update(more)
    first_dir, cond_dir = os.path.join(output, "first_stage"), os.path.join(output, "cond_stage")
    config, layout, prefix, n = transformer_config(gpt, first, spec, cond, pkeep, base_lr,
                                                   first_dir, cond_dir if cond else None)
    _check_vocab(gpt, spec, first, cond, config_path)
    try:
      config_lib.validate_transformer_config(config)
      gpt_module = handoff.build_gpt(config, layout, prefix, n)
    except config_lib.ConfigError as e:
      raise ConversionError(f"{config_path}: the transformer does not fit vqgan_jax: {e}") from e
    ids = reference_ids(layout, spec)
    gpt_params, more = convert_gpt(state, "transformer.", gpt_module, ids,
                                   int(gpt["vocab_size"]), where)
    dropped.update(more)
    leftover = sorted(k for k in state if not k.startswith(
        ("first_stage_model.", "transformer.") + (("cond_stage_model.",) if cond else ())))
    if leftover:
      raise ConversionError(f"{where}: keys no rule maps or drops: {leftover}")
    plan = [("first_stage", first, first_params, None)]
    if cond is not None:
      plan.append(("cond_stage", cond, cond_params, None))
    summary = {"kind": "transformer", "cond_kind": spec.kind, "workdir": output,
               "first_stage": first_dir, "cond_stage": cond_dir if cond else None,
               "vocab": layout.to_dict(), "reference_sos_token": spec.sos_token}
    return plan, (config, layout, prefix, n, gpt_module, gpt_params), summary, dropped
  raise ConversionError(f"{config_path}: model target {model['target']!r} is not supported "
                        f"(known: {VQMODEL}, {NET2NET})")


def _check_vocab(gpt, spec: CondSpec, first, cond, path: str) -> None:
  vocab = int(gpt["vocab_size"])
  needs = {"image codes": int(first.model.n_embed)}
  if spec.kind == "none":
    needs["sos_token + 1"] = spec.sos_token + 1
  elif spec.kind == "class":
    needs["classes"] = spec.num_classes
  elif spec.kind == "spatial":
    needs["conditioning codes"] = int(cond.model.n_embed)
  short = {k: v for k, v in needs.items() if v > vocab}
  if short:
    raise ConversionError(f"{path}: transformer vocab_size={vocab} is smaller than the ids "
                          f"it must embed: {short}")


def _define_flags():
  flags.DEFINE_string("ckpt", None, "The reference .ckpt (PyTorch Lightning).")
  flags.DEFINE_string("config", None, "Its yaml config (model.yaml).")
  flags.DEFINE_string("output", None, "Workdir to write.")
  flags.DEFINE_bool("keep_discriminator", False,
                    "VQModel: keep loss.discriminator.* for continued GAN training.")
  flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.")
  flags.DEFINE_integer("step", -1, "Checkpoint step to write; -1 = the checkpoint's "
                       "global_step.")
  flags.DEFINE_enum("reader", "numpy", ["numpy", "torch"],
                    "numpy: built-in safe reader; torch: torch.load(weights_only=True), "
                    "needed for pre-1.6 (non-zip) files.")


def main(argv):
  cli.no_positional_args(argv)
  cli.require_flags("ckpt", "config", "output")
  f = flags.FLAGS
  summary = convert(f.ckpt, f.config, f.output, keep_discriminator=f.keep_discriminator,
                    overwrite=f.overwrite, step=f.step, reader=f.reader)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

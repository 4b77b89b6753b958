"""Config checks that run before anything is compiled, with errors naming the key."""

import difflib
from typing import Any, Iterable

import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import transformer_default, vqgan_default
from vqgan_jax import data, sharding
from vqgan_jax.models import quantizer as quantizers


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def compute_dtype(config) -> jnp.dtype:
  """The dtype activations are computed in (`config.compute_dtype`); params stay float32."""
  return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


def check_known_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict,
                     prefix: str = "") -> None:
  """Every key of `config` must exist in `reference` (catches typos in config files)."""
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in reference:
      close = _close_matches(key, reference.keys())
      hint = f" (did you mean {close}?)" if close else ""
      raise ConfigError(f"unknown config key {name!r}{hint}")
    value, ref_value = config[key], reference[key]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(ref_value, ml_collections.ConfigDict):
      check_known_keys(value, ref_value, name + ".")


def _close_matches(key: str, candidates: Iterable[str]):
  matches = difflib.get_close_matches(key, list(candidates), n=1)
  return repr(matches[0]) if matches else None


def _require(condition: bool, key: str, message: str, value: Any) -> None:
  if not condition:
    raise ConfigError(f"config.{key}={value!r}: {message}")


def validate_vqgan_config(config: ml_collections.ConfigDict) -> None:
  """Checks a stage-1 config; raises ConfigError naming the first bad key."""
  check_known_keys(config, vqgan_default.get_config())
  m = config.model
  _require(m.n_embed >= 1, "model.n_embed", "the codebook needs at least one code", m.n_embed)
  _require(len(m.ch_mult) >= 1, "model.ch_mult", "needs at least one level", m.ch_mult)
  groups = int(m.get("norm_groups", 32))
  _require(groups >= 1, "model.norm_groups", "must be positive", groups)
  _require(m.ch >= groups and m.ch % groups == 0, "model.ch",
           f"GroupNorm uses model.norm_groups={groups} groups, so channels must be a positive "
           f"multiple of {groups}", m.ch)
  _require(m.z_channels >= groups and m.z_channels % groups == 0, "model.z_channels",
           f"GroupNorm uses model.norm_groups={groups} groups, so channels must be a positive "
           f"multiple of {groups}", m.z_channels)
  _require(m.embed_dim >= 1, "model.embed_dim", "must be positive", m.embed_dim)
  _require(m.codebook_dim >= 0, "model.codebook_dim", "must be 0 (off) or positive", m.codebook_dim)
  validate_quantizer(m)
  factor = 2 ** (len(m.ch_mult) - 1)
  _require(m.resolution % factor == 0, "model.resolution",
           f"must be divisible by the downsampling factor {factor} (2**(len(ch_mult)-1))",
           m.resolution)
  reached = {m.resolution // 2 ** i for i in range(len(m.ch_mult))}
  for res in m.attn_resolutions:
    _require(res in reached, "model.attn_resolutions",
             f"resolution {res} never occurs; the feature maps have {sorted(reached, reverse=True)}",
             tuple(m.attn_resolutions))
  _require(config.data.image_size % factor == 0, "data.image_size",
           f"must be divisible by the downsampling factor {factor}", config.data.image_size)
  _require(config.loss.pixel_loss in ("l1", "l2"), "loss.pixel_loss", "must be 'l1' or 'l2'",
           config.loss.pixel_loss)
  _require(config.loss.disc_loss in ("hinge", "vanilla"), "loss.disc_loss",
           "must be 'hinge' or 'vanilla'", config.loss.disc_loss)
  _require(config.loss.disc_norm in ("batch", "group", "none"), "loss.disc_norm",
           "must be 'batch', 'group' or 'none'", config.loss.disc_norm)
  validate_data(config)
  if config.data.input == "segmentation":
    channels = data.segment_classes(config.data)
    source = ("data.photos.num_segments" if config.data.name == "photos" else
              "data.label_maps (num_classes, plus 1 for an 'extra' ignore class)")
    for key in ("in_channels", "out_ch"):
      _require(m[key] == channels, f"model.{key}",
               f"a VQGAN of segmentation maps takes one one-hot channel per id: {source} "
               f"gives {channels}; set model.in_channels = model.out_ch = {channels}",
               m[key])
  validate_common(config)


def validate_data(config: ml_collections.ConfigDict) -> None:
  """The data keys (data.check_data_config), as a ConfigError naming the key."""
  try:
    data.check_data_config(config.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate_quantizer(m: ml_collections.ConfigDict) -> None:
  """The quantizer keys of a stage-1 `config.model` (models/quantizer.py)."""
  kind = m.get("quantizer", "vq")
  _require(kind in quantizers.QUANTIZERS, "model.quantizer",
           f"must be one of {quantizers.QUANTIZERS}", kind)
  opts = quantizers.quantizer_options(m)
  if kind == "fsq":
    levels = opts["fsq_levels"]
    _require(len(levels) >= 1 and min(levels) >= 2, "model.fsq_levels",
             "needs at least one level count, each >= 2", tuple(levels))
    size = int(np.prod(levels, dtype=np.int64))
    _require(m.n_embed == size, "model.n_embed",
             f"model.quantizer='fsq' with model.fsq_levels={tuple(levels)} has prod(levels) = "
             f"{size} codes; set model.n_embed={size}", m.n_embed)
  if kind == "lfq":
    bits = opts["lfq_bits"]
    _require(1 <= bits <= 30, "model.lfq_bits", "must be in [1, 30]", bits)
    _require(m.n_embed == 2 ** bits, "model.n_embed",
             f"model.quantizer='lfq' with model.lfq_bits={bits} has 2**lfq_bits = "
             f"{2 ** bits} codes; set model.n_embed={2 ** bits}", m.n_embed)
  if kind in ("fsq", "lfq"):
    _require(not m.codebook_dim, "model.codebook_dim",
             f"model.quantizer={kind!r} has no codebook to look up: must be 0",
             m.codebook_dim)
    _require(not m.l2_normalize, "model.l2_normalize",
             f"model.quantizer={kind!r} has no codebook to look up: must be False",
             m.l2_normalize)
  _require(kind == "vq" or not m.restart_dead_codes, "model.restart_dead_codes",
           f"dead-code restart rewrites the learned codebook of model.quantizer='vq' only, "
           f"not {kind!r} (vq_ema moves its codes by EMA; fsq, lfq and simvq have no "
           "per-code parameters); set it False", m.restart_dead_codes)
  try:  # the remaining ranges (ema_decay, ema_eps, lfq_temperature, ...)
    quantizers.make_quantizer(m)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate_common(config: ml_collections.ConfigDict) -> None:
  _require(config.batch_size >= 1, "batch_size", "must be positive", config.batch_size)
  _require(config.num_train_steps >= 0, "num_train_steps", "must be >= 0", config.num_train_steps)
  for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
    _require(config[key] >= 1, key, "must be >= 1", config[key])
  _require(config.compute_dtype in ("float32", "bfloat16"), "compute_dtype",
           "must be 'float32' or 'bfloat16'", config.compute_dtype)
  _require(config.nonfinite_policy in ("error", "skip"), "nonfinite_policy",
           "must be 'error' or 'skip'", config.nonfinite_policy)


COND_KINDS = ("none", "class", "spatial", "coord")


def validate_transformer_config(config: ml_collections.ConfigDict) -> None:
  """Checks a stage-2 config (no checkpoint access); raises ConfigError naming the key."""
  check_known_keys(config, transformer_default.get_config())
  _require(config.stage == "transformer", "stage", "must be 'transformer' for stage 2",
           config.stage)
  _require(bool(config.first_stage.workdir), "first_stage.workdir",
           "set it to a stage-1 workdir (train_stage1.py --workdir)", config.first_stage.workdir)
  _require(config.first_stage.n_embed >= 0, "first_stage.n_embed", "must be >= 0 (0 = from the "
           "checkpoint)", config.first_stage.n_embed)
  _require(len(config.first_stage.latent_grid) == 2 and min(config.first_stage.latent_grid) >= 0,
           "first_stage.latent_grid", "must be (h, w) with h, w >= 0",
           tuple(config.first_stage.latent_grid))
  m = config.model
  for key in ("n_layer", "n_head", "n_embd"):
    _require(m[key] >= 1, f"model.{key}", "must be positive", m[key])
  _require(m.n_embd % m.n_head == 0, "model.n_embd",
           f"must be divisible by model.n_head={m.n_head}", m.n_embd)
  _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = derived)", m.vocab_size)
  _require(m.block_size >= 0, "model.block_size", "must be >= 0 (0 = derived)", m.block_size)
  _require(str(m.remat).strip().lower() in ("none", "full", "dots", "true", "false", "0", "1",
                                            ""), "model.remat",
           "must be 'none', 'full' (recompute each block) or 'dots' (keep matmul outputs)",
           m.remat)
  _require(m.attention in ("softmax", "linear"), "model.attention",
           "must be 'softmax' or 'linear'", m.attention)
  _require(m.linear_chunk_size >= 1, "model.linear_chunk_size", "must be positive",
           m.linear_chunk_size)
  for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
    _require(0.0 <= m[key] < 1.0, f"model.{key}", "must be in [0, 1)", m[key])
  _require(m.attention == "softmax" or m.attn_pdrop == 0.0, "model.attn_pdrop",
           "must be 0 with linear attention (no attention matrix to drop from)", m.attn_pdrop)
  c = config.cond
  _require(c.kind in COND_KINDS, "cond.kind", f"must be one of {COND_KINDS}", c.kind)
  _require(0.0 <= c.cfg_dropout < 1.0, "cond.cfg_dropout", "must be in [0, 1)", c.cfg_dropout)
  _require(c.cfg_dropout == 0.0 or c.kind == "class", "cond.cfg_dropout",
           f"classifier-free-guidance dropout needs cond.kind='class', not {c.kind!r}",
           c.cfg_dropout)
  _require(c.num_classes >= 0, "cond.num_classes", "must be >= 0 (0 = from the dataset)",
           c.num_classes)
  if c.kind == "spatial":
    _require(bool(c.cond_stage_workdir), "cond.cond_stage_workdir",
             "spatial conditioning needs the workdir of a conditioning VQGAN",
             c.cond_stage_workdir)
    _require(data.has_segmentation(config.data) or bool(config.tokens_dir), "data.name",
             "spatial conditioning needs segmentation maps: use 'photos', 'seg_folder' "
             "(image / label-map pairs) or 'tfds' with data.tfds.mask_key",
             config.data.name)
  if c.kind == "coord":
    _require(config.crop_tokens > 0, "crop_tokens",
             "coordinate conditioning conditions on the crop origin, so it needs crop_tokens > 0",
             config.crop_tokens)
    _require(c.coord_grid >= 1, "cond.coord_grid", "must be >= 1", c.coord_grid)
  _require(0.0 < config.pkeep <= 1.0, "pkeep", "must be in (0, 1] (1 = off)", config.pkeep)
  _require(config.crop_tokens >= 0, "crop_tokens", "must be >= 0 (0 = off)", config.crop_tokens)
  _require(config.weight_decay >= 0.0, "weight_decay", "must be >= 0", config.weight_decay)
  _require(config.warmup_steps >= 0, "warmup_steps", "must be >= 0", config.warmup_steps)
  _require(config.unigram_batches >= 0, "unigram_batches", "must be >= 0",
           config.unigram_batches)
  if not config.tokens_dir:
    validate_data(config)
  s = config.sampling
  _require(s.temperature >= 0.0, "sampling.temperature", "must be >= 0 (0 = greedy)",
           s.temperature)
  _require(s.top_k >= 0, "sampling.top_k", "must be >= 0 (0 = off)", s.top_k)
  _require(0.0 <= s.top_p <= 1.0, "sampling.top_p", "must be in [0, 1] (0 = off)", s.top_p)
  _require(s.sliding_window_factor >= 1, "sampling.sliding_window_factor", "must be >= 1",
           s.sliding_window_factor)
  for key in ("num_samples_per_class", "num_samples", "batch_size"):
    _require(s[key] >= 1, f"sampling.{key}", "must be >= 1", s[key])
  validate_common(config)


def validate_batch_sizes(config: ml_collections.ConfigDict, mesh, processes=None) -> None:
  """The training and eval batch sizes against the mesh's batch shards (data x fsdp), the
  processes and config.grad_accum_steps, before anything compiles (`ConfigError` naming
  the key, both numbers and the nearest valid size)."""
  accum = int(config.get("grad_accum_steps", 1))
  _require(accum >= 1, "grad_accum_steps", "must be >= 1", accum)
  checks = [("config.batch_size", int(config.batch_size), accum,
             "or set config.grad_accum_steps so that batch_size / grad_accum_steps splits"),
            ("config.eval_batch_size", int(config.eval_batch_size), 1, "")]
  for what, size, steps, fix in checks:
    try:
      sharding.check_batch_size(size, mesh, what, steps, fix, processes)
    except ValueError as e:
      raise ConfigError(str(e)) from None

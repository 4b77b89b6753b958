"""Config checks that run before anything is compiled, with errors naming the key."""

from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


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
  import difflib  # pylint: disable=g-import-not-at-top
  matches = difflib.get_close_matches(key, list(candidates), n=1)
  return repr(matches[0]) if matches else None


def _require(condition: bool, key: str, message: str, value: Any) -> None:
  if not condition:
    raise ConfigError(f"config.{key}={value!r}: {message}")


def validate_vqgan_config(config: ml_collections.ConfigDict) -> None:
  """Checks a stage-1 config; raises ConfigError naming the first bad key."""
  from configs import vqgan_default  # pylint: disable=g-import-not-at-top
  check_known_keys(config, vqgan_default.get_config())
  m = config.model
  _require(m.n_embed >= 1, "model.n_embed", "the codebook needs at least one code", m.n_embed)
  _require(len(m.ch_mult) >= 1, "model.ch_mult", "needs at least one level", m.ch_mult)
  _require(m.ch >= 32 and m.ch % 32 == 0, "model.ch",
           "GroupNorm uses 32 groups, so channels must be a positive multiple of 32", m.ch)
  _require(m.z_channels >= 32 and m.z_channels % 32 == 0, "model.z_channels",
           "GroupNorm uses 32 groups, so channels must be a positive multiple of 32", m.z_channels)
  _require(m.embed_dim >= 1, "model.embed_dim", "must be positive", m.embed_dim)
  _require(m.codebook_dim >= 0, "model.codebook_dim", "must be 0 (off) or positive", m.codebook_dim)
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
  validate_common(config)


def validate_common(config: ml_collections.ConfigDict) -> None:
  _require(config.batch_size >= 1, "batch_size", "must be positive", config.batch_size)
  _require(config.num_train_steps >= 0, "num_train_steps", "must be >= 0", config.num_train_steps)
  for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
    _require(config[key] >= 1, key, "must be >= 1", config[key])
  _require(config.compute_dtype in ("float32", "bfloat16"), "compute_dtype",
           "must be 'float32' or 'bfloat16'", config.compute_dtype)
  _require(config.nonfinite_policy in ("error", "skip"), "nonfinite_policy",
           "must be 'error' or 'skip'", config.nonfinite_policy)

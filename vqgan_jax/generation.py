"""Drawing token grids and images from a loaded stage-2 model (`handoff.Stage2Model`).

Library code behind `python -m vqgan_jax.sample` and the stage-2 evaluation: the sampling
options (`SamplingOptions`, validated against a checkpoint by `check_options`), window token
grids drawn on every device of a mesh after condition prefixes (`token_batches`,
`draw_tokens`; sample n is keyed by its index only, so its tokens do not depend on the batch
size or device count), coordinate-conditioned sliding-window sampling
(`sample_sliding_window_coord`), and encoding / decoding under frozen VQGANs (`encode_inputs`,
`decode`, `decode_rows`, `center_crop_tokens`, `colorize`). The GPT-level sampler (KV cache,
top-k/p, guidance, sliding window) is `vqgan_jax.sampling`.
"""

import dataclasses
import functools
import math
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import conditioning, handoff, sampling, sharding, visualize
from vqgan_jax.models import vqgan


@dataclasses.dataclass
class SamplingOptions:
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 0.0
  cfg_scale: float = 1.0
  num_samples: int = 8
  num_samples_per_class: int = 4
  classes: Optional[Sequence[int]] = None
  sliding_window_factor: int = 2
  batch_size: int = 64
  seed: int = 0

  @classmethod
  def from_config(cls, sampling_config, **overrides) -> "SamplingOptions":
    values = {f.name: sampling_config[f.name] for f in dataclasses.fields(cls)
              if f.name in sampling_config}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def check_options(metadata: Dict[str, Any], opts: SamplingOptions, mesh=None,
                  batch_what: str = "--batch_size") -> List[int]:
  """Validates options against a checkpoint's metadata (before anything is sampled) and,
  with `mesh`, the batch size against its batch shards (`batch_what` names the setting);
  returns the class labels to draw (class-conditional models) or []."""
  layout = conditioning.VocabLayout.from_dict(metadata["vocab"])
  if opts.temperature < 0:
    raise ValueError(f"temperature={opts.temperature} must be >= 0 (0 = greedy)")
  if opts.top_k < 0:
    raise ValueError(f"top_k={opts.top_k} must be >= 0 (0 = off)")
  if not 0.0 <= opts.top_p <= 1.0:
    raise ValueError(f"top_p={opts.top_p} must be in [0, 1] (0 = off)")
  if opts.sliding_window_factor < 1:
    raise ValueError(f"sliding_window_factor={opts.sliding_window_factor} must be >= 1")
  if min(opts.num_samples, opts.num_samples_per_class, opts.batch_size) < 1:
    raise ValueError("num_samples, num_samples_per_class and batch_size must be >= 1")
  if mesh is not None:
    sharding.check_batch_size(opts.batch_size, mesh, what=batch_what)
  if opts.cfg_scale != 1.0 and not (layout.kind == "class" and layout.has_null_class):
    raise ValueError(
        f"cfg_scale={opts.cfg_scale} needs a class-conditional model trained with "
        f"cond.cfg_dropout > 0 (this one: kind={layout.kind!r}, null class "
        f"{'present' if layout.has_null_class else 'absent'}); use cfg_scale=1")
  if layout.kind != "class":
    if opts.classes:
      raise ValueError(f"classes={list(opts.classes)} given but the model is conditioned on "
                       f"{layout.kind!r}, not on classes")
    return []
  classes = list(range(layout.num_classes)) if not opts.classes else [int(c) for c in opts.classes]
  for c in classes:
    if not 0 <= c < layout.num_classes:
      raise ValueError(f"class label {c} is out of range: the model has {layout.num_classes} "
                       f"classes, labels 0..{layout.num_classes - 1}")
  return classes


# ---------------------------------------------------------------------------------------
# Compiled helpers
# ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0,))
def _decode(model: vqgan.VQModel, params, indices):
  x = model.apply(vqgan.as_variables(params), indices, method=vqgan.VQModel.decode_indices)
  return jnp.clip(x, -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0,))
def _encode(model: vqgan.VQModel, params, x):
  return model.apply(vqgan.as_variables(params), x, method=vqgan.VQModel.encode_to_indices)


def decode(frozen, indices) -> np.ndarray:
  """Images (B, H, W, C) in [-1, 1] of token grids (B, h, w) under a frozen VQGAN."""
  return np.asarray(_decode(frozen.model, frozen.params, jnp.asarray(indices, jnp.int32)))


def encode_inputs(frozen, batch) -> np.ndarray:
  """Token grid of a batch under a frozen VQGAN (its own data.input: image or segmentation)."""
  x = handoff.model_inputs({k: jnp.asarray(v) for k, v in batch.items()}, frozen.config)
  return np.asarray(_encode(frozen.model, frozen.params, x))


@functools.partial(jax.jit, static_argnames=("model", "layout", "grid_h", "grid_w", "window_h",
                                             "window_w", "batch", "top_k", "num_image_codes",
                                             "use_cache"))
def sample_sliding_window_coord(params, model, layout, grid_h: int, grid_w: int,
                                window_h: int, window_w: int, batch: int, key,
                                temperature=1.0, top_k=None, top_p=None,
                                num_image_codes=None, use_cache: bool = True):
  """`sampling.sample_sliding_window` for coordinate conditioning: every window is
  conditioned on its own origin (binned relative to grid - window, as in training)."""
  spans = (grid_h - window_h, grid_w - window_w)

  def prefix(top, left):
    return conditioning.condition_tokens(
        layout, batch, origins=(jnp.full((batch,), top), jnp.full((batch,), left)), spans=spans)

  return sampling.sliding_window_loop(params, model, prefix, layout.prefix_len(), batch, grid_h,
                                      grid_w, window_h, window_w, key, temperature, top_k, top_p,
                                      num_image_codes, use_cache=use_cache)


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------


def filters(opts: SamplingOptions):
  """(top_k, top_p) for the sampler from the options, None where a filter is off."""
  top_k = int(opts.top_k) if opts.top_k > 0 else None
  top_p = float(opts.top_p) if 0.0 < opts.top_p < 1.0 else None
  return top_k, top_p


def replicate(tree, mesh):
  """A pytree placed whole on every device of the mesh."""
  return jax.device_put(tree, sharding.replicated(mesh))


def shard_rows(x: np.ndarray, mesh) -> jax.Array:
  """A host array holding the whole batch (the same on every process) as a global array
  split over the mesh's batch axes; each process supplies only its devices' rows."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding.batch_sharding(mesh), lambda i: x[i])


def sampling_batch(batch_size: int, num_samples: int, mesh) -> int:
  """Samples per sampler call: batch_size, or, for fewer samples, their number rounded up
  to a multiple of the batch shards and processes (so the batch still splits evenly)."""
  multiple = math.lcm(sharding.batch_devices(mesh), jax.process_count())
  return min(batch_size, -(-num_samples // multiple) * multiple)


def token_batches(loaded, prefix: np.ndarray, key, opts: SamplingOptions, mesh,
                  params=None):
  """Draws window token sequences after condition prefixes (N, P) (the same host array on
  every process) in calls of `sampling_batch` samples, each a global batch split over the
  mesh's batch axes (the last one padded, so the sampler compiles once). Sample n is keyed
  by its index n (see `sampling`), whatever the batch size and device count.

  Yields (tokens: global (batch, h * w) int32 array, number of real samples in it).
  `params`: the GPT params already replicated over the mesh (default: replicated here).
  """
  layout, model = loaded.layout, loaded.model
  h, w = loaded.window
  sharding.check_batch_size(opts.batch_size, mesh, what="--batch_size")
  top_k, top_p = filters(opts)
  guided = opts.cfg_scale != 1.0
  uncond = jnp.full((1, prefix.shape[1]), layout.null_id, jnp.int32) if guided else None
  variables = {"params": params if params is not None else replicate(loaded.params, mesh)}
  chunk = sampling_batch(opts.batch_size, prefix.shape[0], mesh)
  for start in range(0, prefix.shape[0], chunk):
    part = np.asarray(prefix[start:start + chunk], np.int32)
    real = part.shape[0]
    if real < chunk:
      part = np.concatenate([part, np.repeat(part[-1:], chunk - real, axis=0)])
    tokens = sampling.sample(
        variables, model, shard_rows(part, mesh), h * w, key, temperature=opts.temperature,
        top_k=top_k, top_p=top_p, cfg_scale=opts.cfg_scale if guided else None,
        uncond_prefix=uncond, num_image_codes=layout.n_codes, first_index=start, mesh=mesh)
    yield tokens, real


def draw_tokens(loaded, prefix: np.ndarray, key, opts: SamplingOptions, mesh=None,
                params=None) -> np.ndarray:
  """Window token grids (N, h, w) after condition prefixes (N, P), drawn on every device
  of `mesh` (default: the mesh of the checkpoint's config) by `token_batches`; the whole
  result on every process."""
  mesh = mesh if mesh is not None else sharding.make_mesh(loaded.config.mesh)
  h, w = loaded.window
  out = [sharding.host_array(tokens)[:real]
         for tokens, real in token_batches(loaded, prefix, key, opts, mesh, params)]
  return np.concatenate(out).reshape(-1, h, w)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode_rows(model: vqgan.VQModel, params, tokens, grid):
  indices = tokens.reshape((tokens.shape[0],) + tuple(grid))
  x = model.apply(vqgan.as_variables(params), indices, method=vqgan.VQModel.decode_indices)
  return jnp.clip(x, -1.0, 1.0)


def decode_rows(frozen, params, tokens: jax.Array, grid) -> jax.Array:
  """Images (B, H, W, C) in [-1, 1] of flat token rows (B, h * w) (e.g. a global batch
  from `token_batches`, decoded where its rows are) under a frozen VQGAN whose `params`
  are placed like the tokens' mesh (replicated)."""
  return _decode_rows(frozen.model, params, tokens, tuple(int(g) for g in grid))


def colorize(segmentation: np.ndarray) -> np.ndarray:
  """Segment ids (B, H, W) -> RGB in [-1, 1] with a fixed palette."""
  return visualize.colorize_segments(segmentation)


def center_crop_tokens(grid: np.ndarray, window) -> tuple:
  """The centred window of token grids (B, H, W) and its origin (y, x)."""
  gh, gw = grid.shape[1:3]
  y, x = (gh - window[0]) // 2, (gw - window[1]) // 2
  return grid[:, y:y + window[0], x:x + window[1]], (y, x)

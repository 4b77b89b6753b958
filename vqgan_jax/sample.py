"""Samples from a stage-2 checkpoint, decoded by the frozen stage-1 VQGAN, as PNG grids.

  python -m vqgan_jax.sample --workdir STAGE2_DIR --output DIR [--config CONFIG]
      [--step -1] [--seed 0] [--temperature T] [--top_k K] [--top_p P] [--cfg_scale S]
      [--num_samples N] [--classes 0,3,5] [--sliding_window_factor F] [--batch_size B]

Unset options come from `sampling` of --config (which must then ask for the same attention
type as the checkpoint) or, without --config, from the checkpoint's own config.

What is written, by the checkpoint's conditioning kind:
  class    class_<c>[_<name>].png    num_samples_per_class samples of each class in --classes
                                     (default: all); classifier-free guidance with
                                     --cfg_scale != 1 (models trained with cfg_dropout > 0)
  none     unconditional.png         num_samples samples
  spatial  spatial_conditioned.png   rows: condition map (colour per segment), the real val
                                     crop it came from, the sample; val-split conditions
  coord    coord_conditioned.png     windows sampled at random crop origins
  all      sliding_window.png        token grids sliding_window_factor times the trained
                                     window per side, sampled with the sliding attention
                                     window (taming's sampler; guidance is not applied):
                                     class: the first requested classes; spatial: a larger
                                     condition region of the val split (see
                                     `data.condition_regions`); coord: each window conditioned on
                                     its own origin.
The paths written are printed.

Devices: samples are drawn on every device of the mesh (`mesh` of the config; with several
processes, each process draws its devices' rows): each call of the sampler takes
--batch_size samples (sampling.batch_size) as a global batch split over data x fsdp, with
the GPT replicated, so --batch_size must be a multiple of data x fsdp (and of the process
count); it is checked before anything is restored or compiled. A sample's tokens depend on
the seed and its index only, so they are the same on any number of devices.
"""

import functools
import os
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from vqgan_jax import (checkpointing, cli, conditioning, data, handoff,
                       sampling, sharding, visualize)
from vqgan_jax.generation import (SamplingOptions, center_crop_tokens, check_options,
                                  colorize, decode, draw_tokens, encode_inputs, filters,
                                  replicate, sample_sliding_window_coord)


def _grid_png(path: str, images: np.ndarray, labels: Optional[Sequence[str]] = None) -> str:
  """Writes samples as a near-square, upscaled grid, each captioned (process 0 only)."""
  if labels is None:
    labels = [f"#{i}" for i in range(len(images))]
  if jax.process_index() == 0:
    visualize.save_png(path, visualize.square_grid(images, labels))
    print(f"wrote {path}")
  return path


def _rows_png(path: str, rows: Sequence[np.ndarray], row_labels: Sequence[str]) -> str:
  """Writes labelled rows of images (e.g. map / original / sample), process 0 only."""
  if jax.process_index() == 0:
    count = max(r.shape[0] for r in rows)
    grid = visualize.make_grid(list(rows), row_labels=list(row_labels),
                               col_labels=[f"#{i}" for i in range(count)])
    visualize.save_png(path, grid)
    print(f"wrote {path}")
  return path


def generate(loaded: handoff.Stage2Model, output_dir: str,
             opts: SamplingOptions, mesh=None) -> Dict[str, str]:
  """Samples as described in the module docstring, the window-sized ones drawn on every
  device of `mesh` (default: the mesh of the checkpoint's config); returns
  {name: PNG path}."""
  mesh = mesh if mesh is not None else sharding.make_mesh(loaded.config.mesh)
  classes = check_options(loaded.metadata, opts, mesh)
  params = replicate(loaded.params, mesh)
  draw = functools.partial(draw_tokens, opts=opts, mesh=mesh, params=params)
  layout, config = loaded.layout, loaded.config
  first, cond = loaded.first_stage, loaded.cond_stage
  key = jax.random.PRNGKey(opts.seed)
  window = loaded.window
  f = first.downsample_factor
  if jax.process_index() == 0:
    os.makedirs(output_dir, exist_ok=True)
  written = {}
  top_k, top_p = filters(opts)

  # ----- samples at the trained window size
  if layout.kind == "class":
    labels = np.repeat(np.asarray(classes, np.int32), opts.num_samples_per_class)
    prefix = np.asarray(conditioning.condition_tokens(layout, len(labels), labels=labels))
    images = decode(first, draw(loaded, prefix, jax.random.fold_in(key, 0)))
    names = data.PHOTO_NAMES if config.data.name == "photos" else ()
    for n, c in enumerate(classes):
      name = f"class_{c:04d}" + (f"_{names[c]}" if c < len(names) else "")
      part = images[n * opts.num_samples_per_class:(n + 1) * opts.num_samples_per_class]
      label = names[c] if c < len(names) else f"class {c}"
      written[name] = _grid_png(os.path.join(output_dir, name + ".png"), part,
                                [f"{label} #{i}" for i in range(len(part))])
  elif layout.kind == "none":
    prefix = np.asarray(conditioning.condition_tokens(layout, opts.num_samples))
    images = decode(first, draw(loaded, prefix, jax.random.fold_in(key, 0)))
    written["unconditional"] = _grid_png(os.path.join(output_dir, "unconditional.png"), images)
  elif layout.kind == "spatial":
    batch = next(iter(data.make_eval_iterator(config.data, batch_size=opts.num_samples)))
    batch = {k: v for k, v in batch.items() if k in ("image", "segmentation")}
    codes, (y, x) = center_crop_tokens(encode_inputs(cond, batch), window)
    prefix = np.asarray(conditioning.condition_tokens(layout, codes.shape[0], cond_codes=codes))
    images = decode(first, draw(loaded, prefix, jax.random.fold_in(key, 0)))
    py, px, ph, pw = y * f, x * f, window[0] * f, window[1] * f
    seg = batch["segmentation"][:, py:py + ph, px:px + pw]
    real = batch["image"][:, py:py + ph, px:px + pw]
    written["spatial_conditioned"] = _rows_png(
        os.path.join(output_dir, "spatial_conditioned.png"), [colorize(seg), real, images],
        ["condition map", "original", "sample"])
  else:  # coord
    grid = loaded.token_grid
    spans = (grid[0] - window[0], grid[1] - window[1])
    rng = np.random.default_rng(opts.seed)
    origins = (rng.integers(0, spans[0] + 1, opts.num_samples),
               rng.integers(0, spans[1] + 1, opts.num_samples))
    prefix = np.asarray(conditioning.condition_tokens(
        layout, opts.num_samples, origins=tuple(jnp.asarray(o) for o in origins), spans=spans))
    images = decode(first, draw(loaded, prefix, jax.random.fold_in(key, 0)))
    written["coord_conditioned"] = _grid_png(
        os.path.join(output_dir, "coord_conditioned.png"), images,
        [f"y{int(oy)} x{int(ox)}" for oy, ox in zip(*origins)])

  # ----- one sliding-window image set, sliding_window_factor x the window per side
  big = (opts.sliding_window_factor * window[0], opts.sliding_window_factor * window[1])
  count = min(opts.num_samples, 4)
  skey = jax.random.fold_in(key, 1)
  variables = {"params": loaded.params}
  rows, row_labels = [], []
  if layout.kind == "coord":
    tokens = sample_sliding_window_coord(
        variables, loaded.model, layout, big[0], big[1], window[0], window[1], count, skey,
        temperature=opts.temperature, top_k=top_k, top_p=top_p, num_image_codes=layout.n_codes)
  else:
    spatial = None
    if layout.kind == "spatial":
      seg, real = data.condition_regions(config.data, big[0] * f, count)
      spatial = encode_inputs(cond, {"segmentation": seg})
      if spatial.shape[1:] != big:
        raise ValueError(f"the conditioning VQGAN gives a {spatial.shape[1:]} grid for a "
                         f"{big[0] * f}px region; expected {big}")
      rows = [colorize(seg), real]
      row_labels = ["condition map", "original"]
      prefix = None
      spatial = jnp.asarray(spatial + layout.offset("spatial"), jnp.int32)
    elif layout.kind == "class":
      labels = np.asarray(classes[:count], np.int32)
      prefix = conditioning.condition_tokens(layout, len(labels), labels=labels)
    else:
      prefix = conditioning.condition_tokens(layout, count)
    tokens = sampling.sample_sliding_window(
        variables, loaded.model, prefix, big[0], big[1], window[0], window[1], skey,
        temperature=opts.temperature, top_k=top_k, top_p=top_p, spatial_cond=spatial,
        num_image_codes=layout.n_codes)
  images = decode(first, np.asarray(tokens))
  sample_label = f"sample {big[0]}x{big[1]} tokens"
  if layout.kind == "class":
    names = data.PHOTO_NAMES if config.data.name == "photos" else ()
    sample_label += " (" + ", ".join(names[c] if c < len(names) else str(c)
                                     for c in classes[:count]) + ")"
  written["sliding_window"] = _rows_png(os.path.join(output_dir, "sliding_window.png"),
                                        rows + [images], row_labels + [sample_label])
  return written


def run_sampling(workdir: str, output_dir: str, config=None, step: Optional[int] = None,
                 first_stage_workdir: Optional[str] = None, mesh=None,
                 **overrides) -> Dict[str, str]:
  """Loads a stage-2 workdir and writes the PNGs; `overrides` are SamplingOptions fields
  (None = from `config.sampling`, or the checkpoint's config without `config`). Samples
  are drawn on `mesh` (default: `mesh` of that config over all devices).
  Every option is checked before the model is restored or anything is sampled."""
  sharding.maybe_initialize_distributed()  # before anything touches the JAX backend
  metadata, step = handoff.read_stage2_metadata(workdir, step)
  if config is not None and config.model.attention != metadata["attention"]:
    raise checkpointing.CheckpointError(
        f"{workdir} step {step} holds a GPT trained with {metadata['attention']!r} attention "
        f"but the config asks for {config.model.attention!r} (model.attention)")
  run_config = config if config is not None else checkpointing.config_from_dict(
      metadata["config"])
  if overrides.get("classes"):
    overrides["classes"] = class_ids(overrides["classes"], run_config.data)
  opts = SamplingOptions.from_config(run_config.sampling, **overrides)
  mesh = mesh if mesh is not None else sharding.make_mesh(run_config.mesh)
  check_options(metadata, opts, mesh, batch_what="--batch_size" if overrides.get("batch_size")
                else "sampling.batch_size")
  loaded = handoff.load_stage2(
      workdir, step, attention=config.model.attention if config is not None else None,
      first_stage_workdir=first_stage_workdir)
  return generate(loaded, output_dir, opts, mesh)


def class_ids(classes: Sequence[Any], data_config) -> List[int]:
  """Class ids from ids or names (`--classes astronaut,3`): names are looked up in the
  training data's class names (photo names, folder names, TFDS label names)."""
  ids, names = [], None
  for c in classes:
    text = str(c).strip()
    if text.lstrip("-").isdigit():
      ids.append(int(text))
      continue
    if names is None:
      names = list(data.dataset_info(data_config)["class_names"])
    if text not in names:
      raise ValueError(f"--classes: {text!r} is neither a class id nor a class name of the "
                       f"training data ({', '.join(names[:20])}{' ...' if len(names) > 20 else ''})")
    ids.append(names.index(text))
  return ids


def run_from_flags(f) -> Dict[str, str]:
  """run_sampling with the options of parsed flags (see define_flags)."""
  classes = list(f.classes) if f.classes else None
  return run_sampling(f.workdir, f.output, config=f.config, step=f.step,
               first_stage_workdir=f.first_stage_workdir, seed=f.seed,
               temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, cfg_scale=f.cfg_scale,
               num_samples=f.num_samples, num_samples_per_class=f.num_samples_per_class,
               classes=classes, sliding_window_factor=f.sliding_window_factor,
               batch_size=getattr(f, "batch_size", None))


def main(argv):
  del argv
  run_from_flags(flags.FLAGS)


def define_flags(flag_values=None):
  """Defines the CLI flags on `flag_values` (default: absl's global FLAGS)."""
  fv = flag_values if flag_values is not None else flags.FLAGS
  config_flags.DEFINE_config_file(
      "config", None, "Stage-2 config (sampling defaults; its model.attention must match the "
      "checkpoint).", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Stage-2 workdir (train_stage2.py --workdir).",
                      flag_values=fv)
  flags.DEFINE_string("output", None, "Folder for the PNG files.", flag_values=fv)
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1 = newest.", flag_values=fv)
  flags.DEFINE_string("first_stage_workdir", None,
                      "Stage-1 workdir if it moved since training (default: as recorded).",
                      flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_float("temperature", None, "Softmax temperature; 0 = greedy.", flag_values=fv)
  flags.DEFINE_integer("top_k", None, "Top-k filtering; 0 = off.", flag_values=fv)
  flags.DEFINE_float("top_p", None, "Nucleus filtering; 0 = off.", flag_values=fv)
  flags.DEFINE_float("cfg_scale", None, "Classifier-free guidance scale; 1 = off.",
                     flag_values=fv)
  flags.DEFINE_integer("num_samples", None, "Samples (unconditional / spatial / coord).",
                       flag_values=fv)
  flags.DEFINE_integer("num_samples_per_class", None, "Samples per class.", flag_values=fv)
  flags.DEFINE_list("classes", None, "Classes to sample, by id or name, e.g. 0,3 or "
                    "astronaut,rocket (default: all).", flag_values=fv)
  flags.DEFINE_integer("sliding_window_factor", None,
                       "Sliding-window canvas = this x the trained window per side.",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", None,
                       "Samples per sampler call, split over the mesh's data x fsdp devices "
                       "(a multiple of them); default sampling.batch_size.", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "output"], flag_values=fv)


if __name__ == "__main__":
  define_flags()
  cli.run(main)

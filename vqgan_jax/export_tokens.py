"""Encode a data split with a frozen stage-1 VQGAN into ArrayRecord token shards.

  python -m vqgan_jax.export_tokens --config configs/vqgan_demo.py --workdir runs/demo/vqgan \\
      --output runs/demo/tokens [--split validation|train] [--overwrite] [--flip_copies] \\
      [--num_crops N] [--seed S] [--step N] [--batch_size B] \\
      [--cond_workdir SEG_VQGAN_DIR [--cond_step N]]

writes OUT/<split>/metadata.json and one shard per process,
OUT/<split>/tokens-<split>-<p:05d>-of-<P:05d>.array_record (format and reader:
`vqgan_jax.data.tokens`; `python -m vqgan_jax.decode_tokens` turns them back into images). `--config` gives the data pipeline (and, for a stage-1 config,
must describe the same model as the checkpoint); the model itself comes from the
checkpoint in `--workdir`.

What is encoded, per source image of the split:
  * the deterministic base view(s) the evaluation uses: the centre crop (folder/tfds) or
    the grid of non-overlapping crops of the photo's region (photos: the val grid for
    `validation`, the same tiling of the train region for `train`);
  * with `--num_crops N`, N extra random crops per source image, drawn with a generator
    seeded by (seed, source index, crop index), so they do not depend on the number of
    processes or the batch size;
  * with `--flip_copies`, a horizontally flipped copy of each of the above.
Records keep the order sources x crops x (unflipped, flipped); process p encodes the
records p, p + P, ... (a round-robin split that `TokenSource` undoes).

Safety: without --overwrite the export refuses, before writing anything, an output
folder that holds anything but other splits' exports (or that already holds this split).
Shards and metadata are written to OUT/.<split>.tmp and renamed to OUT/<split> only when
everything succeeded; on an error the temporary folder is removed.
"""

import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, Optional

import grain
import jax
import numpy as np
from absl import flags
from array_record.python import array_record_module
from jax.experimental import multihost_utils
from ml_collections import config_flags

# The exporter reuses the input pipeline's loaders and crop helpers so its base views are
# exactly the pixels the evaluation pipeline produces.
from vqgan_jax import cli
from vqgan_jax import checkpointing, data, handoff, sharding
from vqgan_jax.data import tokens as tokens_lib
from vqgan_jax.models import vqgan

HEADER_FIELDS = ("label", "source_index", "crop_index", "flipped", "crop_y", "crop_x")
# Fills the last batch. Not None: grain drops None elements as filtered out.
PAD_ITEM = (-1, -1, -1)


class ExportError(ValueError):
  """An export that cannot run as asked (raised before anything is written)."""


# ------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _SplitReader:
  """Source images of one split: labels, base windows and loading, for every source."""
  data_config: Any
  split: str

  @property
  def size(self) -> int:
    return int(self.data_config.image_size)

  @property
  def has_segmentation(self) -> bool:
    return data.has_segmentation(self.data_config)

  def _photos(self):
    return data.photo_layout(self.data_config)

  # Scanned once per reader, not once per loaded example (a scan walks the whole folder).
  @functools.cached_property
  def _folder_entries(self):
    scan = data.scan_folder(self.data_config.folder)
    return scan.train if self.split == "train" else scan.val

  @functools.cached_property
  def _seg_pairs(self):
    scan = data.scan_seg_folder(self.data_config.seg_folder, data.label_spec(self.data_config))
    return scan.train if self.split == "train" else scan.val

  def _tfds(self):
    tc = self.data_config.tfds
    return data.tfds_source(tc, tc.train_split if self.split == "train" else tc.val_split)

  def num_base_windows(self):
    """Per source, how many deterministic windows it has (a list)."""
    name = self.data_config.name
    if name == "photos":
      return [len(self._base_photo_windows(p)) for p in self._photos()]
    if name == "folder":
      return [1] * len(self._folder_entries)
    if name == "seg_folder":
      return [1] * len(self._seg_pairs)
    if name == "tfds":
      return [1] * len(self._tfds())
    raise ExportError(f"data.name={name!r}: must be one of {data.SOURCE_NAMES}")

  def _base_photo_windows(self, photo):
    if self.split == "validation":
      return photo.val_windows
    return data.grid_windows(photo.train_box, self.size)

  def load(self, source_index: int):
    """(uint8 image (H, W, 3), segmentation (H, W) or None, label, region, base windows)."""
    size, name = self.size, self.data_config.name
    if name == "photos":
      photo = self._photos()[source_index]
      region = photo.val_box if self.split == "validation" else photo.train_box
      windows = [(y, x) for y, x, _, _ in self._base_photo_windows(photo)]
      return photo.image, photo.segmentation, source_index, region, windows
    seg = None
    if name == "folder":
      path, label = self._folder_entries[source_index]
      image = data.resize_short_side(data.decode_image(path, size), size)
    elif name == "seg_folder":
      image_path, label_path = self._seg_pairs[source_index]
      image, seg = data.load_seg_pair(image_path, label_path,
                                      data.label_spec(self.data_config), size)
      label = 0
    else:
      tc = self.data_config.tfds
      example = self._tfds()[source_index]
      mask_key = str(tc.get("mask_key", ""))
      image, seg = data.tfds_pair(
          example, tc.image_key, mask_key,
          data.label_spec(self.data_config) if mask_key else None, size,
          f"tfds {tc.tfds_name} {self.split} example {source_index}")
      label = data.tfds_label(example, tc.label_key)
    h, w = image.shape[:2]
    center = data.center_window(h, w, size)
    return image, seg, label, (0, 0, h, w), [center]


@dataclasses.dataclass(frozen=True)
class _MakeExample:
  """(source, crop, flip) item -> example dict; PAD_ITEM -> masked zero padding."""
  reader: _SplitReader
  seed: int

  def __call__(self, item):
    size = self.reader.size
    if tuple(item) == PAD_ITEM:
      example = {"image": np.zeros((size, size, 3), np.float32), "mask": np.bool_(False)}
      if self.reader.has_segmentation:
        example["segmentation"] = np.zeros((size, size), np.int32)
      example.update({k: np.int32(0) for k in HEADER_FIELDS})
      return example
    source_index, crop_index, flipped = item
    image, seg, label, region, windows = self.reader.load(source_index)
    if crop_index < len(windows):
      y, x = windows[crop_index]
    else:
      rng = np.random.default_rng([self.seed, source_index, crop_index])
      ry, rx, rh, rw = region
      dy, dx = data.random_window(rh, rw, size, rng)
      y, x = ry + dy, rx + dx
    crop = image[y:y + size, x:x + size]
    seg_crop = seg[y:y + size, x:x + size] if seg is not None else None
    if flipped:
      crop = crop[:, ::-1]
      seg_crop = seg_crop[:, ::-1] if seg_crop is not None else None
    example = {"image": data.to_float(np.ascontiguousarray(crop)),
               "mask": np.bool_(True)}
    if self.reader.has_segmentation:
      example["segmentation"] = np.ascontiguousarray(seg_crop).astype(np.int32)
    example.update(label=np.int32(label), source_index=np.int32(source_index),
                   crop_index=np.int32(crop_index), flipped=np.int32(flipped),
                   crop_y=np.int32(y), crop_x=np.int32(x))
    return example


def export_items(num_base_windows, num_crops: int, flip_copies: bool):
  """All (source, crop, flipped) items of an export, in record order."""
  items = []
  for source, base in enumerate(num_base_windows):
    for crop in range(base + num_crops):
      for flipped in ((0, 1) if flip_copies else (0,)):
        items.append((source, crop, flipped))
  return items


# ------------------------------------------------------------------------- helpers


def make_encode_fn(frozen, mesh):
  """jitted (params, batch) -> (B, h, w) int32 indices, batch-sharded over the mesh."""
  inputs = handoff.model_inputs_fn(frozen.config)
  model = frozen.model

  def encode(params, batch):
    return model.apply(vqgan.as_variables(params), inputs(batch),
                       method=vqgan.VQModel.encode_to_indices)

  return jax.jit(encode, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def local_rows(array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in local batch order."""
  if jax.process_count() == 1:
    return np.asarray(array)
  shards = {}
  for shard in array.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  return np.concatenate([shards[k] for k in sorted(shards)])


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def check_output(output: str, split: str, overwrite: bool) -> str:
  """Refuses (ExportError) an output that would clobber something; returns OUT/<split>."""
  output = os.fspath(output)
  if os.path.exists(output) and not os.path.isdir(output):
    raise ExportError(f"--output {output} exists and is not a folder")
  final = os.path.join(output, split)
  if overwrite or not os.path.isdir(output):
    return final
  other_splits = {s for s in tokens_lib.SPLITS if s != split and
                  os.path.isfile(os.path.join(output, s, tokens_lib.METADATA_FILE))}
  stray = sorted(set(os.listdir(output)) - other_splits)
  if stray:
    raise ExportError(
        f"--output {output} is not empty (it holds {stray[:5]}{' ...' if len(stray) > 5 else ''}); "
        "pass --overwrite to replace this split's export, or choose another folder")
  return final


# ------------------------------------------------------------------------- export


def export_tokens(config, workdir: str, output: str, *, split: str = "validation",
                  overwrite: bool = False, flip_copies: bool = False, num_crops: int = 0,
                  seed: Optional[int] = None, step: Optional[int] = None,
                  cond_workdir: Optional[str] = None, cond_step: Optional[int] = None,
                  batch_size: Optional[int] = None, mesh=None) -> Dict[str, Any]:
  """Encodes `split` of config.data with the VQGAN of `workdir`; returns the metadata."""

  start_time = time.time()
  sharding.maybe_initialize_distributed()  # before anything touches the JAX backend
  if split not in tokens_lib.SPLITS:
    raise ExportError(f"--split must be one of {tokens_lib.SPLITS}, got {split!r}")
  if num_crops < 0:
    raise ExportError(f"--num_crops must be >= 0, got {num_crops}")
  seed = int(config.get("seed", 0) if seed is None else seed)
  if seed < 0:
    raise ExportError(f"--seed must be >= 0, got {seed}")
  what = "--batch_size" if batch_size else "config.eval_batch_size"
  batch_size = int(batch_size or config.get("eval_batch_size", 16))
  final_dir = check_output(output, split, overwrite)

  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  try:
    sharding.check_batch_size(batch_size, mesh, what=what)
  except ValueError as e:
    raise ExportError(str(e)) from None
  per_process = batch_size // jax.process_count()

  replicated = sharding.replicated(mesh)
  frozen = checkpointing.load_stage1(workdir, step, sharding=replicated)
  if config.get("stage") == "vqgan":
    checkpointing.check_same_model(frozen.metadata["config"]["model"],
                                   checkpointing.config_to_dict(config)["model"], workdir,
                                   force=bool(config.get("force_resume", False)))
  reader = _SplitReader(config.data, split)
  if handoff.input_kind(frozen.config) == "segmentation" and not reader.has_segmentation:
    raise ExportError(f"{workdir} encodes segmentation maps, but data.name="
                      f"{config.data.name!r} has none")
  cond = None
  if cond_workdir:
    cond = checkpointing.load_stage1(cond_workdir, cond_step, sharding=replicated)
    if handoff.input_kind(cond.config) != "segmentation":
      raise ExportError(f"--cond_workdir {cond_workdir} is a VQGAN of "
                        f"{handoff.input_kind(cond.config)!r} inputs, not of segmentation maps")
    if not reader.has_segmentation:
      raise ExportError(f"--cond_workdir needs segmentation maps, but data.name="
                        f"{config.data.name!r} has none ('photos', 'seg_folder' and 'tfds' with "
                        "data.tfds.mask_key have them)")

  info = data.dataset_info(config.data)
  items = export_items(reader.num_base_windows(), num_crops, flip_copies)
  p, num_p = jax.process_index(), jax.process_count()
  local = items[p::num_p]
  num_batches = -(-len(items[0::num_p]) // per_process)  # equal on every process
  local = local + [PAD_ITEM] * (num_batches * per_process - len(local))

  f = frozen.downsample_factor
  size = int(config.data.image_size)
  if size % f:
    raise ExportError(f"data.image_size={size} is not divisible by the downsampling factor {f}")
  grid = [size // f, size // f]
  token_dtype = tokens_lib.token_dtype_for(frozen.n_embed)
  layout = [{"name": k, "dtype": "<i4", "shape": []} for k in HEADER_FIELDS]
  layout.append({"name": "tokens", "dtype": token_dtype, "shape": grid})
  if cond is not None:
    cond_grid = [size // cond.downsample_factor] * 2
    cond_dtype = tokens_lib.token_dtype_for(cond.n_embed)
    layout.append({"name": "cond_tokens", "dtype": cond_dtype, "shape": cond_grid})
  codec = tokens_lib.RecordCodec(layout)

  tmp_dir = os.path.join(output, f".{split}.tmp")
  created_output = not os.path.exists(output)
  if p == 0:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
  _barrier("export_tokens:tmp")
  shard_file = tokens_lib.shard_name(split, p, num_p)
  writer = None
  try:
    writer = array_record_module.ArrayRecordWriter(os.path.join(tmp_dir, shard_file),
                                                   "group_size:1")
    encode = make_encode_fn(frozen, mesh)
    encode_cond = make_encode_fn(cond, mesh) if cond is not None else None
    ds = grain.MapDataset.source(local).map(_MakeExample(reader, seed)).batch(per_process)
    threads = max(1, min(8, os.cpu_count() or 1))
    batches = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=2 * threads))
    written = 0
    for batch in batches:
      device_keys = [k for k in ("image", "segmentation") if k in batch]
      device_batch = sharding.global_batch({k: batch[k] for k in device_keys}, mesh)
      indices = local_rows(encode(frozen.params, device_batch))
      if tuple(indices.shape[1:]) != tuple(grid):
        raise ExportError(f"the model produced a {indices.shape[1:]} grid, expected {grid}")
      cond_indices = (local_rows(encode_cond(cond.params, device_batch))
                      if encode_cond is not None else None)
      for i in np.flatnonzero(batch["mask"]):
        record = {k: batch[k][i] for k in HEADER_FIELDS}
        record["tokens"] = indices[i]
        if cond_indices is not None:
          record["cond_tokens"] = cond_indices[i]
        writer.write(codec.encode(record))
        written += 1
    writer.close()
    writer = None
    if written != len(items[p::num_p]):
      raise ExportError(f"process {p} wrote {written} records, expected {len(items[p::num_p])}")
    _barrier("export_tokens:written")

    metadata = {
        "format": tokens_lib.FORMAT_NAME,
        "format_version": tokens_lib.FORMAT_VERSION,
        "split": split,
        "num_records": len(items),
        "codebook_size": frozen.n_embed,
        "grid_shape": grid,
        "token_dtype": token_dtype,
        "image_size": size,
        "record_layout": layout,
        "shards": [{"file": tokens_lib.shard_name(split, q, num_p),
                    "num_records": len(items[q::num_p])} for q in range(num_p)],
        "order": "round_robin",
        "stage1": {
            "workdir": os.path.abspath(workdir),
            "step": frozen.step,
            "n_embed": frozen.n_embed,
            "downsample_factor": f,
            "input": handoff.input_kind(frozen.config),
            "config": frozen.metadata["config"],
        },
        "cond": None if cond is None else {
            "workdir": os.path.abspath(cond_workdir),
            "step": cond.step,
            "codebook_size": cond.n_embed,
            "grid_shape": cond_grid,
            "token_dtype": cond_dtype,
            "input": "segmentation",
            "config": cond.metadata["config"],
        },
        "data": checkpointing.config_to_dict(config.data),
        "labels": {"num_classes": int(info["num_classes"]),
                   "class_names": list(info["class_names"]),
                   "num_segments": int(info.get("num_segments", 0))},
        "num_sources": len(reader.num_base_windows()),
        "augmentation": {
            "base": ("grid of non-overlapping crops of the photo region"
                     if config.data.name == "photos" else "centre crop"),
            "num_crops": int(num_crops),
            "flip_copies": bool(flip_copies),
            "seed": seed,
        },
        "created_unix": time.time(),
    }
    if p == 0:
      tokens_lib.validate_metadata(json.loads(json.dumps(metadata)), "export metadata")
      with open(os.path.join(tmp_dir, tokens_lib.METADATA_FILE), "w") as fh:
        json.dump(metadata, fh, indent=2)
      old = os.path.join(output, f".{split}.old")
      if os.path.exists(final_dir):  # only reachable with --overwrite
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
      os.replace(tmp_dir, final_dir)
      shutil.rmtree(old, ignore_errors=True)
    _barrier("export_tokens:renamed")
  except BaseException:
    if writer is not None:
      try:
        writer.close()
      except Exception:  # pylint: disable=broad-except
        pass
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if created_output and p == 0:
      try:
        os.rmdir(output)  # only if still empty
      except OSError:
        pass
    raise
  logging.info("exported %d %s records to %s in %.1fs", len(items), split, final_dir,
               time.time() - start_time)
  return metadata


# ------------------------------------------------------------------------- CLI


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config with the data pipeline (the stage-1 "
                                  "config the workdir was trained with).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Stage-1 workdir (its newest checkpoint unless --step).")
  flags.DEFINE_string("output", None, "Tokens folder; the split goes to OUTPUT/<split>.")
  flags.DEFINE_enum("split", "validation", list(tokens_lib.SPLITS), "Split to encode.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing export of this split.")
  flags.DEFINE_bool("flip_copies", False, "Also encode a horizontally flipped copy of each crop.")
  flags.DEFINE_integer("num_crops", 0, "Extra random crops per source image.")
  flags.DEFINE_integer("seed", -1, "Seed of the random crops (-1: config.seed).")
  flags.DEFINE_integer("step", -1, "Stage-1 checkpoint step (-1: newest).")
  flags.DEFINE_string("cond_workdir", None, "Optional conditioning VQGAN (segmentation maps).")
  flags.DEFINE_integer("cond_step", -1, "Step of the conditioning VQGAN (-1: newest).")
  flags.DEFINE_integer("batch_size", 0, "Global batch size (0: config.eval_batch_size).")
  flags.mark_flags_as_required(["config", "workdir", "output"])


def main(argv):
  del argv
  f = flags.FLAGS
  meta = export_tokens(
      f.config, f.workdir, f.output, split=f.split, overwrite=f.overwrite,
      flip_copies=f.flip_copies, num_crops=f.num_crops,
      seed=None if f.seed < 0 else f.seed, step=None if f.step < 0 else f.step,
      cond_workdir=f.cond_workdir, cond_step=None if f.cond_step < 0 else f.cond_step,
      batch_size=f.batch_size or None)
  print(f"wrote {meta['num_records']} {meta['split']} records "
        f"({meta['grid_shape'][0]}x{meta['grid_shape'][1]} tokens, codebook "
        f"{meta['codebook_size']}) to {os.path.join(f.output, meta['split'])}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

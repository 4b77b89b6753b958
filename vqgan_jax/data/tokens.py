"""Reading exported stage-1 tokens (written by `vqgan_jax.export_tokens`).

Layout of a tokens folder (`--output OUT` of the exporter):

  OUT/<split>/metadata.json                                   what the records hold
  OUT/<split>/tokens-<split>-<p:05d>-of-<P:05d>.array_record  one shard per exporting process

Each record is a fixed binary layout without pickle: the fields listed in the
metadata's `record_layout` (name, little-endian numpy dtype string, shape), packed one
after the other. The exporter writes int32 `label`, `source_index`, `crop_index`,
`flipped`, `crop_y`, `crop_x`, then `tokens` (int16 if the codebook has at most 32768
codes, else int32; shape = the latent grid) and, with a conditioning VQGAN,
`cond_tokens`. Shard p holds the examples p, p + P, p + 2P, ... of the export order, so
`TokenSource` can present them in the original order whatever P was.

Public API:
  split_dir(tokens_dir, split)          OUT/<split>, or OUT itself if it holds metadata.json
  read_metadata(tokens_dir, split=None) the validated metadata dict
  TokenSource(tokens_dir, split=None)   grain RandomAccessDataSource of example dicts:
      {'tokens': int32 (h, w), 'label': int32, 'source_index', 'crop_index', 'flipped',
       'crop_y', 'crop_x' (int32 scalars), ['cond_tokens': int32 (hc, wc)]}
  make_token_train_dataset / make_token_train_iterator   shuffled, repeated, batched,
      checkpointable (get_state/set_state, grain.checkpoint.CheckpointSave/Restore)
  make_token_eval_iterator / num_token_eval_batches       one deterministic padded pass
      (batches carry 'mask', False on padding), as data.make_eval_iterator

Decoding tokens back to images: `python -m vqgan_jax.decode_tokens`.
"""

import dataclasses
import json
import math
import os
from typing import Any, Dict, Optional, Sequence

import grain
import numpy as np

from vqgan_jax.data import common

FORMAT_NAME = "vqgan_jax.tokens"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
ALLOWED_DTYPES = ("<i2", "<i4", "<u2")
SPLITS = ("train", "validation")


class TokenFormatError(ValueError):
  """A tokens folder whose metadata or records cannot be used; names the file."""


def shard_name(split: str, process_index: int, process_count: int) -> str:
  return f"tokens-{split}-{process_index:05d}-of-{process_count:05d}.array_record"


def token_dtype_for(codebook_size: int) -> str:
  """Little-endian dtype string for code indices: int16 up to 32768 codes, else int32."""
  return "<i2" if codebook_size <= 2 ** 15 else "<i4"


def split_dir(tokens_dir: str, split: Optional[str] = None) -> str:
  """The folder holding one split's metadata and shards.

  `tokens_dir` may be the exporter's --output folder (then `split` picks the sub-folder)
  or a split folder itself (one that holds metadata.json).
  """
  tokens_dir = os.fspath(tokens_dir)
  if os.path.isfile(os.path.join(tokens_dir, METADATA_FILE)):
    return tokens_dir
  if split is None:
    found = [s for s in SPLITS if os.path.isfile(os.path.join(tokens_dir, s, METADATA_FILE))]
    if len(found) != 1:
      raise TokenFormatError(
          f"{tokens_dir}: pass a split; found exported splits {found or 'none'} "
          f"(no {METADATA_FILE} here)")
    split = found[0]
  path = os.path.join(tokens_dir, split)
  if not os.path.isfile(os.path.join(path, METADATA_FILE)):
    raise TokenFormatError(f"no exported {split!r} tokens in {tokens_dir}: "
                           f"{os.path.join(path, METADATA_FILE)} does not exist")
  return path


# ------------------------------------------------------------------------- metadata


def _need(cond: bool, path: str, message: str) -> None:
  if not cond:
    raise TokenFormatError(f"{path}: {message}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def validate_metadata(meta: Dict[str, Any], path: str = METADATA_FILE) -> Dict[str, Any]:
  """Checks every field the reader relies on; raises TokenFormatError naming `path`."""
  _need(isinstance(meta, dict), path, "metadata must be a JSON object")
  _need(meta.get("format") == FORMAT_NAME, path,
        f"'format' is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
  _need(meta.get("format_version") == FORMAT_VERSION, path,
        f"'format_version' is {meta.get('format_version')!r}; this reader knows "
        f"{FORMAT_VERSION}")
  for key in ("split", "token_dtype"):
    _need(isinstance(meta.get(key), str), path, f"'{key}' must be a string")
  for key in ("num_records", "codebook_size"):
    _need(_is_int(meta.get(key)) and meta[key] >= 0, path,
          f"'{key}' must be a non-negative integer, got {meta.get(key)!r}")
  _need(meta["codebook_size"] > 0, path, "'codebook_size' must be positive")
  grid = meta.get("grid_shape")
  _need(isinstance(grid, list) and len(grid) == 2 and all(_is_int(g) and g > 0 for g in grid),
        path, f"'grid_shape' must be [h, w] of positive ints, got {grid!r}")
  _need(meta["token_dtype"] in ALLOWED_DTYPES, path,
        f"'token_dtype' {meta['token_dtype']!r} not in {ALLOWED_DTYPES}")
  layout = meta.get("record_layout")
  _need(isinstance(layout, list) and layout, path, "'record_layout' must be a non-empty list")
  names = []
  for field in layout:
    _need(isinstance(field, dict) and isinstance(field.get("name"), str), path,
          f"bad record_layout entry {field!r}")
    _need(field.get("dtype") in ALLOWED_DTYPES, path,
          f"record field {field['name']!r}: dtype {field.get('dtype')!r} not in {ALLOWED_DTYPES}")
    shape = field.get("shape")
    _need(isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape), path,
          f"record field {field['name']!r}: shape must be a list of ints, got {shape!r}")
    names.append(field["name"])
  _need(len(set(names)) == len(names), path, f"duplicate record fields in {names}")
  _need("tokens" in names and "label" in names, path,
        f"record_layout needs 'tokens' and 'label', has {names}")
  tokens_field = layout[names.index("tokens")]
  _need(tokens_field["shape"] == grid and tokens_field["dtype"] == meta["token_dtype"], path,
        "record field 'tokens' disagrees with 'grid_shape'/'token_dtype'")
  shards = meta.get("shards")
  _need(isinstance(shards, list) and shards, path, "'shards' must be a non-empty list")
  for shard in shards:
    _need(isinstance(shard, dict) and isinstance(shard.get("file"), str)
          and _is_int(shard.get("num_records")) and shard["num_records"] >= 0, path,
          f"bad shard entry {shard!r}")
    _need(os.path.basename(shard["file"]) == shard["file"], path,
          f"shard file {shard['file']!r} must be a plain file name")
  _need(sum(s["num_records"] for s in shards) == meta["num_records"], path,
        "the shards' num_records do not add up to 'num_records'")
  counts = [s["num_records"] for s in shards]
  # Round-robin assignment: shard p holds ceil((N - p) / P) records.
  p_count = len(shards)
  expected = [len(range(p, meta["num_records"], p_count)) for p in range(p_count)]
  _need(counts == expected, path,
        f"shard record counts {counts} are not a round-robin split of {meta['num_records']}")
  return meta


def read_metadata(tokens_dir: str, split: Optional[str] = None) -> Dict[str, Any]:
  """Reads and validates <split folder>/metadata.json (see `split_dir`)."""
  path = os.path.join(split_dir(tokens_dir, split), METADATA_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise TokenFormatError(f"{path}: cannot read token metadata: {e}") from e
  meta = validate_metadata(meta, path)
  if split is not None and meta["split"] != split:
    raise TokenFormatError(f"{path}: holds split {meta['split']!r}, not {split!r}")
  return meta


# ------------------------------------------------------------------------- records


class RecordCodec:
  """Packs and unpacks one record of a fixed layout (no pickle)."""

  def __init__(self, layout: Sequence[Dict[str, Any]]):
    self.fields = []
    offset = 0
    for field in layout:
      dtype = np.dtype(field["dtype"])
      if dtype.kind not in "iu":
        raise TokenFormatError(f"record field {field['name']!r} has non-integer dtype {dtype}")
      shape = tuple(int(s) for s in field["shape"])
      size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      self.fields.append((field["name"], dtype, shape, offset, size))
      offset += size
    self.record_size = offset

  def encode(self, values: Dict[str, Any]) -> bytes:
    parts = []
    for name, dtype, shape, _, _ in self.fields:
      value = np.asarray(values[name])
      if value.shape != shape:
        raise ValueError(f"record field {name!r}: shape {value.shape}, layout says {shape}")
      info = np.iinfo(dtype)
      if value.size and (value.min() < info.min or value.max() > info.max):
        raise ValueError(f"record field {name!r}: values outside {dtype}")
      parts.append(value.astype(dtype).tobytes())
    return b"".join(parts)

  def decode(self, record: bytes, where: str = "record") -> Dict[str, np.ndarray]:
    if len(record) != self.record_size:
      raise TokenFormatError(f"{where}: {len(record)} bytes, the layout needs "
                             f"{self.record_size}")
    out = {}
    for name, dtype, shape, offset, size in self.fields:
      value = np.frombuffer(record, dtype=dtype, count=size // dtype.itemsize, offset=offset)
      value = value.astype(np.int32).reshape(shape)
      out[name] = value if shape else np.int32(value)
    return out


class TokenSource:
  """grain RandomAccessDataSource over one exported split, in the export order.

  `source[i]` is a dict of int32 numpy values: 'tokens' (h, w), 'label' and the other
  scalar fields of the layout, plus 'cond_tokens' if a conditioning VQGAN was used.
  """

  def __init__(self, tokens_dir: str, split: Optional[str] = None):
    self.directory = split_dir(tokens_dir, split)
    self.metadata = read_metadata(self.directory, split)
    self.codec = RecordCodec(self.metadata["record_layout"])
    shards = self.metadata["shards"]
    self._num_shards = len(shards)
    self._length = int(self.metadata["num_records"])
    offsets, paths, offset = [], [], 0
    for shard in shards:
      path = os.path.join(self.directory, shard["file"])
      if not os.path.isfile(path):
        raise TokenFormatError(f"{path}: shard listed in {METADATA_FILE} is missing")
      offsets.append(offset)
      if shard["num_records"]:
        paths.append(path)
      offset += shard["num_records"]
    self._offsets = offsets
    self._source = grain.sources.ArrayRecordDataSource(paths) if paths else None
    found = len(self._source) if self._source is not None else 0
    if found != self._length:
      raise TokenFormatError(f"{self.directory}: the shards hold {found} records, "
                             f"{METADATA_FILE} says {self._length} (truncated export?)")

  def __len__(self) -> int:
    return self._length

  def _position(self, index: int) -> int:
    # Export order index j lives in shard j % P at position j // P.
    return self._offsets[index % self._num_shards] + index // self._num_shards

  def __getitem__(self, index) -> Dict[str, np.ndarray]:
    index = int(index)
    if index < 0:
      index += self._length
    if not 0 <= index < self._length:
      raise IndexError(f"record {index} out of range [0, {self._length})")
    record = self._source[self._position(index)]
    return self.codec.decode(record, f"{self.directory} record {index}")

  def __repr__(self) -> str:
    return (f"TokenSource({self.directory!r}, split={self.metadata['split']!r}, "
            f"num_records={self._length})")

  @property
  def grid_shape(self):
    return tuple(self.metadata["grid_shape"])

  @property
  def codebook_size(self) -> int:
    return int(self.metadata["codebook_size"])

  def all_tokens(self) -> np.ndarray:
    """Every record's tokens stacked, (N, h, w) int32 (small splits / tests)."""
    return np.stack([self[i]["tokens"] for i in range(len(self))]) if len(self) else \
        np.zeros((0, *self.grid_shape), np.int32)


# ------------------------------------------------------------------------- iterators


def _read_options():
  threads = max(1, min(4, os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def make_token_train_dataset(tokens_dir: str, *, batch_size: int, seed: int,
                             process_index: int = 0, process_count: int = 1,
                             split: Optional[str] = "train"):
  """Shuffled (reshuffled every epoch), repeated, batched IterDataset of token examples.

  `batch_size` is per process; process p reads records p, p + P, ... Batches are dicts of
  int32 arrays with a leading batch dimension ('tokens' (B, h, w), 'label' (B,), ...).
  """
  common.check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  source = TokenSource(tokens_dir, split)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(f"{source.directory}: process {process_index} of {process_count} has "
                     f"{len(ds)} records, fewer than one batch of {batch_size}")
  ds = ds.shuffle(seed=common.derive_seed(seed, "tokens-shuffle")).repeat()
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(_read_options())


def make_token_train_iterator(tokens_dir: str, *, batch_size: int, seed: int,
                              process_index: int = 0, process_count: int = 1,
                              split: Optional[str] = "train"):
  """Infinite checkpointable iterator over `make_token_train_dataset` (get_state/set_state)."""
  return iter(make_token_train_dataset(tokens_dir, batch_size=batch_size, seed=seed,
                                       process_index=process_index,
                                       process_count=process_count, split=split))


def num_token_eval_batches(num_records: int, batch_size: int, process_count: int = 1,
                           drop_remainder: bool = False) -> int:
  """Batches per process of make_token_eval_iterator (equal on every process)."""
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if drop_remainder:
    return (num_records // process_count) // batch_size
  per_process = math.ceil(num_records / process_count)
  return math.ceil(per_process / batch_size)


@dataclasses.dataclass(frozen=True)
class _EvalRead:
  """Index -> example with mask True; -1 -> a zero example with mask False (padding)."""
  source: Any
  template: Any

  def __call__(self, index):
    if index < 0:
      example = {k: np.zeros_like(v) for k, v in self.template.items()}
      example["mask"] = np.bool_(False)
      return example
    example = dict(self.source[index])
    example["mask"] = np.bool_(True)
    return example


def make_token_eval_iterator(tokens_dir: str, *, batch_size: int, process_index: int = 0,
                             process_count: int = 1, split: Optional[str] = "validation",
                             drop_remainder: bool = False):
  """One deterministic pass over an exported split (re-iterable grain IterDataset).

  Process p takes records p, p + P, ...; the last batch is padded to `batch_size` with
  zero examples whose 'mask' is False, so every process runs the same number of
  equally shaped batches. With drop_remainder=True only full batches of real records.
  """
  common.check_process(process_index, process_count)
  source = TokenSource(tokens_dir, split)
  n = num_token_eval_batches(len(source), batch_size, process_count, drop_remainder)
  shard = list(range(process_index, len(source), process_count))[:n * batch_size]
  shard += [-1] * (n * batch_size - len(shard))
  template = source[0] if len(source) else {}
  ds = grain.MapDataset.source(shard).map(_EvalRead(source, template)).batch(batch_size)
  return ds.to_iter_dataset(_read_options())

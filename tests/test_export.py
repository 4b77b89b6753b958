"""Tests for token export (vqgan_jax.export_tokens) and the reader/decoder (vqgan_jax.tokens)."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

import helpers
from vqgan_jax import visualize
from vqgan_jax import checkpointing, data
from vqgan_jax import decode_tokens
from vqgan_jax import export_tokens as export_lib
from vqgan_jax.data import tokens as tokens_lib
from vqgan_jax.models import vqgan

BATCH = 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return helpers.shared_stage1_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def config():
  return helpers.tiny_stage1_config()


@pytest.fixture(scope="module")
def frozen(workdir):
  return checkpointing.load_stage1(workdir)


@pytest.fixture(scope="module")
def exported(workdir, config, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tokens") / "out")
  meta = export_lib.export_tokens(config, workdir, out, split="validation", batch_size=BATCH)
  return out, meta


def test_val_export_equals_direct_encoding(exported, config, frozen):
  out, _ = exported
  source = tokens_lib.TokenSource(out, "validation")
  encode = jax.jit(lambda p, x: frozen.model.apply({"params": p}, x,
                                                   method=vqgan.VQModel.encode_to_indices))
  direct, labels = [], []
  for batch in data.make_eval_iterator(config.data, batch_size=BATCH):
    indices = np.asarray(encode(frozen.params, batch["image"]))
    direct.append(indices[batch["mask"]])
    labels.append(batch["label"][batch["mask"]])
  direct, labels = np.concatenate(direct), np.concatenate(labels)
  assert len(source) == len(direct) == data.dataset_info(config.data)["num_val"]
  np.testing.assert_array_equal(source.all_tokens(), direct)
  example = source[3]
  assert example["tokens"].dtype == np.int32 and example["tokens"].shape == (8, 8)
  np.testing.assert_array_equal([source[i]["label"] for i in range(len(source))], labels)
  assert all(source[i]["flipped"] == 0 for i in range(len(source)))


def test_metadata(exported, workdir, config):
  out, returned = exported
  meta = tokens_lib.read_metadata(out, "validation")
  assert meta == json.loads(json.dumps(returned))
  assert meta["split"] == "validation" and meta["num_records"] == 28
  assert meta["codebook_size"] == 32 and meta["grid_shape"] == [8, 8]
  assert meta["token_dtype"] == "<i2"
  assert meta["stage1"]["workdir"] == os.path.abspath(workdir) and meta["stage1"]["step"] == 2
  assert meta["stage1"]["config"]["model"]["n_embed"] == 32
  assert meta["labels"]["num_classes"] == 7 and len(meta["labels"]["class_names"]) == 7
  assert meta["augmentation"]["flip_copies"] is False and meta["augmentation"]["num_crops"] == 0
  assert meta["cond"] is None
  assert meta["shards"] == [{"file": "tokens-validation-00000-of-00001.array_record",
                             "num_records": 28}]
  assert sorted(os.listdir(os.path.join(out, "validation"))) == [
      "metadata.json", "tokens-validation-00000-of-00001.array_record"]
  assert sorted(os.listdir(out)) == ["validation"]  # no temporary folder left
  # Records are a fixed binary layout (6 int32 header fields + 64 int16 tokens), no pickle.
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(
      os.path.join(out, "validation", meta["shards"][0]["file"]))
  record = reader.read([0])[0]
  reader.close()
  assert len(record) == 6 * 4 + 64 * 2


def test_bad_metadata_is_rejected(exported, tmp_path):
  out, _ = exported
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(os.path.join(out, "validation"), copy)
  meta_path = copy / "metadata.json"
  meta = json.loads(meta_path.read_text())
  meta["grid_shape"] = [8, 7]
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(tokens_lib.TokenFormatError, match=r"metadata\.json.*tokens"):
    tokens_lib.TokenSource(str(copy))
  meta["grid_shape"] = [8, 8]
  meta["num_records"] = 29
  meta["shards"][0]["num_records"] = 29
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(tokens_lib.TokenFormatError, match="truncated"):
    tokens_lib.TokenSource(str(copy))


def test_reader_restores_order_of_a_multi_process_export(tmp_path):
  """Shard p holds records p, p + P, ...; TokenSource returns them in export order."""
  from array_record.python import array_record_module
  layout = [{"name": "label", "dtype": "<i4", "shape": []},
            {"name": "tokens", "dtype": "<i2", "shape": [2, 2]}]
  codec = tokens_lib.RecordCodec(layout)
  n, p_count = 7, 3
  shards = []
  split = tmp_path / "train"
  split.mkdir()
  for p in range(p_count):
    name = tokens_lib.shard_name("train", p, p_count)
    writer = array_record_module.ArrayRecordWriter(str(split / name), "group_size:1")
    for j in range(p, n, p_count):
      writer.write(codec.encode({"label": j, "tokens": np.full((2, 2), 10 * j)}))
    writer.close()
    shards.append({"file": name, "num_records": len(range(p, n, p_count))})
  meta = {"format": tokens_lib.FORMAT_NAME, "format_version": tokens_lib.FORMAT_VERSION,
          "split": "train", "num_records": n, "codebook_size": 100, "grid_shape": [2, 2],
          "token_dtype": "<i2", "record_layout": layout, "shards": shards}
  (split / "metadata.json").write_text(json.dumps(meta))
  source = tokens_lib.TokenSource(str(tmp_path), "train")
  assert [int(source[j]["label"]) for j in range(n)] == list(range(n))
  np.testing.assert_array_equal(source[5]["tokens"], np.full((2, 2), 50))
  # The eval iterator covers every record once, padding flagged by the mask.
  batches = list(tokens_lib.make_token_eval_iterator(str(tmp_path), batch_size=4, split="train"))
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert len(batches) == 2 and sorted(labels) == list(range(n))


def test_non_empty_output_is_refused_and_left_untouched(exported, workdir, config, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  with pytest.raises(export_lib.ExportError, match="not empty"):
    export_lib.export_tokens(config, workdir, str(out), batch_size=BATCH)
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

  # An existing export of the same split is refused too, and left as it was.
  existing, _ = exported
  split_dir = os.path.join(existing, "validation")
  before = {f: open(os.path.join(split_dir, f), "rb").read() for f in os.listdir(split_dir)}
  with pytest.raises(export_lib.ExportError, match="--overwrite"):
    export_lib.export_tokens(config, workdir, existing, batch_size=BATCH)
  after = {f: open(os.path.join(split_dir, f), "rb").read() for f in os.listdir(split_dir)}
  assert after == before and sorted(os.listdir(existing)) == ["validation"]


def test_failed_export_leaves_nothing(workdir, config, tmp_path, monkeypatch):
  def broken_encode_fn(frozen, mesh):
    def encode(params, batch):
      raise RuntimeError("device on fire")
    return encode

  monkeypatch.setattr(export_lib, "make_encode_fn", broken_encode_fn)
  out = tmp_path / "new_out"
  with pytest.raises(RuntimeError, match="device on fire"):
    export_lib.export_tokens(config, workdir, str(out), batch_size=BATCH)
  assert not out.exists()
  kept = tmp_path / "kept"
  (kept / "train").mkdir(parents=True)
  with pytest.raises(RuntimeError, match="device on fire"):
    export_lib.export_tokens(config, workdir, str(kept), batch_size=BATCH, overwrite=True)
  assert os.listdir(kept) == ["train"]


def test_augmented_train_export(workdir, config, tmp_path, frozen):
  reader = export_lib._SplitReader(config.data, "train")
  base = reader.num_base_windows()
  meta = export_lib.export_tokens(config, workdir, str(tmp_path / "out"), split="train",
                                  flip_copies=True, num_crops=1, seed=3, batch_size=BATCH)
  assert meta["num_records"] == sum(2 * (b + 1) for b in base)
  assert meta["augmentation"] == {**meta["augmentation"], "num_crops": 1, "flip_copies": True,
                                  "seed": 3}
  source = tokens_lib.TokenSource(str(tmp_path / "out"), "train")
  # Records come in (unflipped, flipped) pairs of the same crop.
  first, second = source[0], source[1]
  assert (first["flipped"], second["flipped"]) == (0, 1)
  assert (first["crop_y"], first["crop_x"]) == (second["crop_y"], second["crop_x"])
  # The random crop (crop_index == base) is reproducible from (seed, source, crop) alone,
  # and its flipped copy encodes the mirrored pixels.
  make = export_lib._MakeExample(reader, seed=3)
  last = base[0] * 2  # index of source 0's random crop, unflipped
  assert source[last]["crop_index"] == base[0] and source[last]["source_index"] == 0
  ex, ex_flip = make((0, base[0], 0)), make((0, base[0], 1))
  assert (ex["crop_y"], ex["crop_x"]) == (source[last]["crop_y"], source[last]["crop_x"])
  np.testing.assert_array_equal(ex_flip["image"], ex["image"][:, ::-1])
  encode = jax.jit(lambda p, x: frozen.model.apply({"params": p}, x,
                                                   method=vqgan.VQModel.encode_to_indices))
  pair = np.stack([ex["image"], ex_flip["image"]] + [ex["image"]] * (BATCH - 2))
  indices = np.asarray(encode(frozen.params, pair))
  np.testing.assert_array_equal(source[last]["tokens"], indices[0])
  np.testing.assert_array_equal(source[last + 1]["tokens"], indices[1])


def test_decode_command_writes_pngs_equal_to_direct_decoding(exported, workdir, frozen,
                                                             tmp_path):
  out, _ = exported
  png_dir = tmp_path / "png"
  paths = decode_tokens.decode_command(out, str(png_dir), workdir=workdir, split="validation",
                                      limit=10, batch_size=BATCH)
  assert len(paths) == 10
  files = sorted(os.listdir(png_dir))
  assert files == [f"{i:06d}.png" for i in range(10)]
  source = tokens_lib.TokenSource(out, "validation")
  tokens = np.stack([source[i]["tokens"] for i in range(10)])
  padded = np.concatenate([tokens, np.zeros((2 * BATCH - 10, 8, 8), np.int32)])
  decode = jax.jit(lambda p, t: frozen.model.apply({"params": p}, t,
                                                   method=vqgan.VQModel.decode_indices))
  direct = np.concatenate([np.asarray(decode(frozen.params, padded[s:s + BATCH]))
                           for s in (0, BATCH)])[:10]
  expected = visualize.to_uint8(np.clip(direct, -1, 1))
  written = np.stack([np.asarray(Image.open(png_dir / f)) for f in files])
  np.testing.assert_array_equal(written, expected)


def test_token_train_iterator_is_deterministic_and_resumable(exported):
  out, _ = exported
  make = lambda seed: tokens_lib.make_token_train_iterator(out, batch_size=4, seed=seed,
                                                           split="validation")
  a, b = make(0), make(0)
  first_a = [next(a) for _ in range(9)]  # more than one epoch of 28 records
  first_b = [next(b) for _ in range(9)]
  for x, y in zip(first_a, first_b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  assert first_a[0]["tokens"].shape == (4, 8, 8) and first_a[0]["label"].shape == (4,)
  # One epoch (7 batches) holds every record exactly once.
  epoch = np.concatenate([x["tokens"] for x in first_a[:7]])
  source = tokens_lib.TokenSource(out, "validation")
  assert sorted(map(bytes, epoch)) == sorted(map(bytes, source.all_tokens()))
  other = next(make(1))
  assert not np.array_equal(other["tokens"], first_a[0]["tokens"])

  it = make(0)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it)["tokens"] for _ in range(4)]
  resumed = make(0)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["tokens"], want)


def test_token_eval_iterator_with_processes(exported):
  out, _ = exported
  seen = []
  for p in range(2):
    batches = list(tokens_lib.make_token_eval_iterator(out, batch_size=8, process_index=p,
                                                       process_count=2))
    assert len(batches) == tokens_lib.num_token_eval_batches(28, 8, 2) == 2
    assert all(b["tokens"].shape == (8, 8, 8) for b in batches)
    seen += [bytes(t) for b in batches for t in b["tokens"][b["mask"]]]
  source = tokens_lib.TokenSource(out, "validation")
  assert sorted(seen) == sorted(map(bytes, source.all_tokens()))

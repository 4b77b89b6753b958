"""Spatial conditioning on image / label-map pairs (the seg_folder and TFDS-mask sources).

The pairs are the synthetic scenes of vqgan_jax.data.scenes: each class is painted in its
own colour, so the class of an image pixel can be read back from its colour and checked
against the map the pipeline delivers with it (crops and flips must move both together).
"""

import json
import os
import shutil

import helpers
import numpy as np
import pytest
from PIL import Image

from vqgan_jax import config_lib, data
from vqgan_jax.data import scenes

S = 16                  # crop size
N_IDS = len(scenes.CLASS_NAMES) + 1   # six classes and the "extra" unlabelled id


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("scenes"))
  return scenes.write_scene_folder(root, num_images=20, height=24, width=32, seed=0)


def seg_config(root, **overrides):
  c = data.default_data_config()
  c.name = "seg_folder"
  c.image_size = S
  c.seg_folder.folder_path = root
  c.seg_folder.val_fraction = 0.2
  c.label_maps.num_classes = len(scenes.CLASS_NAMES)
  return helpers.override(c, overrides)


def colour_classes(images):
  """Class of each pixel of float images in [-1, 1]: the nearest class colour."""
  rgb = (np.asarray(images) + 1.0) * 127.5
  d = ((rgb[..., None, :] - scenes.CLASS_COLORS) ** 2).sum(-1)
  return d.argmin(-1)


def agreement(images, segs):
  """Share of labelled pixels whose colour class is the map's class."""
  labelled = segs < len(scenes.CLASS_NAMES)
  return float(np.mean(colour_classes(images)[labelled] == segs[labelled]))


def test_scene_folder_is_deterministic_and_in_the_seg_folder_layout(tmp_path, scene_root):
  again = scenes.write_scene_folder(str(tmp_path / "again"), 3, 24, 32, seed=0)
  for sub in ("images", "labels"):
    for name in ("scene_00000.png", "scene_00002.png"):
      a = np.asarray(Image.open(os.path.join(scene_root, sub, name)))
      b = np.asarray(Image.open(os.path.join(again, sub, name)))
      np.testing.assert_array_equal(a, b)
  labels = np.asarray(Image.open(os.path.join(scene_root, "labels", "scene_00000.png")))
  assert labels.shape == (24, 32) and labels.dtype == np.uint8
  assert set(np.unique(labels)) <= set(range(len(scenes.CLASS_NAMES))) | {255}
  assert 255 in labels and 0 in labels      # the unlabelled horizon band, the sky


def test_label_spec_maps_ignore_and_rejects_stray_ids():
  raw = np.array([[0, 5, 255], [2, 255, 1]], np.uint8)
  extra = data.LabelSpec(6, 255, "extra")
  np.testing.assert_array_equal(extra.to_ids(raw), [[0, 5, 6], [2, 6, 1]])
  assert extra.num_ids == 7
  zero = data.LabelSpec(6, 255, "zero")
  np.testing.assert_array_equal(zero.to_ids(raw), [[0, 5, 0], [2, 0, 1]])
  assert zero.num_ids == 6
  with pytest.raises(ValueError, match=r"ids 7, 9 .*num_classes=6"):
    extra.to_ids(np.array([[7, 9, 0]], np.uint8))
  with pytest.raises(ValueError, match="single-channel"):
    extra.to_ids(np.zeros((2, 2, 3), np.uint8))


def test_nearest_resize_never_blends_ids():
  ids = np.arange(12, dtype=np.int32).reshape(3, 4)
  out = data.images.resize_nearest(ids, (6, 8))
  assert set(np.unique(out)) == set(range(12))
  np.testing.assert_array_equal(out[::2, ::2], ids)


def test_train_crops_and_flips_move_image_and_map_together(scene_root):
  c = seg_config(scene_root)
  info = data.dataset_info(c)
  assert info["num_train"] == 16 and info["num_val"] == 4 and info["num_skipped"] == 0
  assert info["num_segments"] == N_IDS == data.segment_classes(c)
  batch = next(data.make_train_iterator(c, batch_size=16, seed=0))
  images, segs = batch["image"], batch["segmentation"]
  assert images.shape == (16, S, S, 3) and segs.shape == (16, S, S)
  assert segs.dtype == np.int32 and segs.min() >= 0 and segs.max() < N_IDS
  aligned = agreement(images, segs)
  assert aligned > 0.9, aligned
  # The same crops with the maps mirrored (as if only the image had been flipped) agree
  # far less: the check above can tell a misaligned pair.
  assert agreement(images, segs[:, :, ::-1]) < aligned - 0.05
  # Flips happen (random_flip): with flip off, some examples differ.
  c_noflip = seg_config(scene_root, random_flip=False)
  plain = next(data.make_train_iterator(c_noflip, batch_size=16, seed=0))
  assert agreement(plain["image"], plain["segmentation"]) > 0.9
  assert not np.array_equal(plain["image"], images)
  evals = list(data.make_eval_iterator(c, batch_size=4))
  assert sum(int(b["mask"].sum()) for b in evals) == 4
  assert agreement(evals[0]["image"], evals[0]["segmentation"]) > 0.9


def test_bad_pairs_are_counted_skips_or_strict_errors(scene_root, tmp_path):
  root = str(tmp_path / "bad")
  shutil.copytree(scene_root, root)
  os.remove(os.path.join(root, "labels", "scene_00001.png"))                  # no map
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(
      os.path.join(root, "labels", "scene_00002.png"))                         # wrong size
  Image.fromarray(np.full((24, 32), 40, np.uint8)).save(
      os.path.join(root, "labels", "scene_00003.png"))                         # id 40
  c = seg_config(root)
  info = data.dataset_info(c)
  assert info["num_skipped"] == 3 and info["num_train"] + info["num_val"] == 17
  skipped = sorted(os.path.basename(p) for p in data.folder_skipped_files(c))
  assert skipped == ["scene_00001.png", "scene_00002.png", "scene_00003.png"]
  c.seg_folder.strict = True
  with pytest.raises(ValueError, match=r"scene_00001\.png.*strict"):
    data.dataset_info(c)
  shutil.copy(os.path.join(scene_root, "labels", "scene_00001.png"),
              os.path.join(root, "labels", "scene_00001.png"))
  with pytest.raises(ValueError, match=r"scene_00002\.png is 10x10 but image .* is 32x24"):
    data.dataset_info(c)


def test_config_errors_name_the_key(scene_root, tmp_path):
  from configs import vqgan_scenes_seg  # pylint: disable=g-import-not-at-top
  config = vqgan_scenes_seg.get_config()
  config.data.seg_folder.folder_path = scene_root
  config_lib.validate_vqgan_config(config)
  config.data.label_maps.num_classes = 10
  with pytest.raises(config_lib.ConfigError, match=r"model\.in_channels=7.*set model\.in_"
                                                   r"channels = model\.out_ch = 11"):
    config_lib.validate_vqgan_config(config)
  config.data.label_maps.num_classes = 6
  config.data.seg_folder.folder_path = ""
  config_lib.validate_vqgan_config(config)  # dry runs check configs that name no data...
  with pytest.raises(ValueError, match=r"seg_folder\.folder_path=''"):
    data.dataset_info(config.data)           # ...reading them names the key
  config.data.seg_folder.folder_path = scene_root
  config.data.label_maps.ignore_label = 3
  with pytest.raises(config_lib.ConfigError, match=r"ignore_label=3: that is class 3"):
    config_lib.validate_vqgan_config(config)
  with pytest.raises(ValueError, match=r"no folder .*masks.*label_dir='masks'"):
    data.dataset_info(seg_config(scene_root, **{"seg_folder.label_dir": "masks"}))


def test_tfds_mask_key_gives_aligned_maps(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(3)
  pairs = [scenes.scene(24, 32, rng) for _ in range(6)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="vqgan_tiny_scenes", version="1.0.0",
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "segmentation_mask": tfds.features.Image(shape=(None, None, 1))}),
      split_datasets={"train": [(f"t{i}", {"image": im, "segmentation_mask": lb[..., None]})
                                for i, (im, lb) in enumerate(pairs[:4])],
                      "validation": [(f"v{i}", {"image": im, "segmentation_mask": lb[..., None]})
                                     for i, (im, lb) in enumerate(pairs[4:])]},
      config=None, data_dir=str(tmp_path), file_format="array_record")
  c = data.default_data_config()
  c.name = "tfds"
  c.image_size = S
  c.tfds.tfds_name = "vqgan_tiny_scenes"
  c.tfds.tfds_data_dir = str(tmp_path)
  c.tfds.label_key = ""
  c.tfds.mask_key = "segmentation_mask"
  c.label_maps.num_classes = len(scenes.CLASS_NAMES)
  assert data.dataset_info(c)["num_segments"] == N_IDS
  batch = next(data.make_train_iterator(c, batch_size=8, seed=0))
  assert batch["segmentation"].shape == (8, S, S)
  assert agreement(batch["image"], batch["segmentation"]) > 0.9
  evals = list(data.make_eval_iterator(c, batch_size=2))
  assert agreement(evals[0]["image"], evals[0]["segmentation"]) > 0.9


@pytest.mark.slow
def test_both_stages_train_on_a_seg_folder(scene_root, tmp_path, tmp_path_factory):
  """A conditioning VQGAN of the maps and a spatial GPT train on the pairs (the image
  VQGAN is the session's shared tiny one: any RGB VQGAN encodes the scenes); tokens
  export with their condition codes; samples are drawn from val maps."""
  from configs import transformer_tiny  # pylint: disable=g-import-not-at-top
  from vqgan_jax import export_tokens, sample  # pylint: disable=g-import-not-at-top
  from vqgan_jax.training import stage1, stage2  # pylint: disable=g-import-not-at-top

  seg = helpers.tiny_stage1_config()
  seg.data = seg_config(scene_root, input="segmentation")
  seg.model.attn_resolutions = ()
  seg.model.in_channels = seg.model.out_ch = N_IDS
  seg.model.n_embed = 16
  seg.loss.pixel_loss = "l2"
  image_dir, seg_dir = helpers.shared_stage1_workdir(tmp_path_factory), str(tmp_path / "seg")
  stage1.train_and_evaluate(seg, seg_dir)

  c = transformer_tiny.get_config()
  c.first_stage.workdir = image_dir
  c.cond.kind = "spatial"
  c.cond.cfg_dropout = 0.0
  c.cond.cond_stage_workdir = seg_dir
  c.data = seg_config(scene_root)
  c.async_checkpointing = False
  c.num_train_steps = 2
  c.unigram_batches = 0
  c.sampling.sliding_window_factor = 1
  gpt_dir = str(tmp_path / "gpt")
  metrics = stage2.train_and_evaluate(c, gpt_dir)
  assert np.isfinite(metrics["val_bits_per_token"])

  out = str(tmp_path / "tokens")
  export_tokens.export_tokens(c, image_dir, out, split="validation", cond_workdir=seg_dir)
  meta = json.load(open(os.path.join(out, "validation", "metadata.json")))
  assert meta["num_records"] == 4

  written = sample.run_sampling(gpt_dir, str(tmp_path / "samples"))
  with Image.open(written["spatial_conditioned"]) as im:
    assert im.size[0] > 4 * S and im.size[1] > 3 * S   # rows: map, original, sample

"""Stage-2 trainer, vocabulary, checkpoints, loader and the sampling CLI (tiny models).

The frozen stage-1 models are created once per module by initialising a tiny VQGAN and
saving it with the stage-1 checkpoint functions (`checkpointing.save` +
`stage1_metadata`): the same format `stage1_trainer.train_and_evaluate` writes, without
compiling a stage-1 training step (which alone takes over a minute on a loaded 2-core CPU).
A persistent compilation cache (module-scoped) lets the resumed run reuse the compiled
stage-2 steps.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil

import jax
import jax.numpy as jnp
import helpers
import numpy as np
import pytest

from configs import transformer_tiny, vqgan_default
from vqgan_jax import (checkpointing, conditioning, config_lib, generation, handoff, losses,
                       sample, sampling, sharding, visualize)
from vqgan_jax.conditioning import VocabLayout
from vqgan_jax.models import transformer, vqgan
from vqgan_jax.training import optim
from vqgan_jax.training import stage2 as stage2_trainer

N_CODES = 32      # tiny stage-1 codebook
SEG_CODES = 16    # tiny conditioning-VQGAN codebook


def tiny_stage1_config(segmentation=False):
  c = vqgan_default.get_config()
  m = c.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, ()
  m.resolution, m.z_channels, m.embed_dim = 16, 32, 16
  m.n_embed = SEG_CODES if segmentation else N_CODES
  c.data.image_size = 16
  c.data.photos.photo_short_side = 128
  c.loss.perceptual_weight = 0.0
  c.loss.disc_start = 10 ** 9
  c.batch_size, c.num_train_steps = 4, 2
  c.eval_every_steps = c.checkpoint_every_steps = 2
  c.num_eval_batches = 1
  if segmentation:
    c.data.input = "segmentation"
    m.in_channels = m.out_ch = c.data.photos.num_segments
  return c


def make_stage1_workdir(path, config, step=2):
  """A stage-1 workdir with an initialised (untrained) VQGAN at `step`."""
  model = vqgan.vqmodel_from_config(config.model)
  # Random parameters of the right shapes (no init compilation): N(0, 0.1) weights,
  # unit norm scales, so that the codes the encoder picks vary across the image.
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (np.ones(a.shape, a.dtype) if path[-1].key == "scale" else
                       (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)),
      checkpointing.abstract_vqgan_params(model, config.model.resolution))
  manager = checkpointing.make_manager(str(path), async_checkpointing=False)
  checkpointing.save(manager, step, params, {"step": jnp.asarray(step)},
                     checkpointing.stage1_metadata(config, step))
  manager.wait_until_finished()
  return str(path)


def tiny_stage2_config(stage1_dir, kind="class", **overrides):
  c = transformer_tiny.get_config()
  c.first_stage.workdir = stage1_dir
  c.cond.kind = kind
  c.cond.cfg_dropout = 0.1 if kind == "class" else 0.0
  c.async_checkpointing = False
  return helpers.override(c, overrides)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  cache_dir = str(tmp_path_factory.mktemp("jax_cache"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  previous = {n: getattr(jax.config, n) for n in names}
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield cache_dir
  for n, v in previous.items():
    jax.config.update(n, v)
  try:
    from jax._src import compilation_cache as cc  # pylint: disable=g-import-not-at-top
    cc.reset_cache()
  except Exception:  # pylint: disable=broad-except
    pass


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
  return make_stage1_workdir(tmp_path_factory.mktemp("stage1"), tiny_stage1_config())


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
  return make_stage1_workdir(tmp_path_factory.mktemp("stage1_seg"), tiny_stage1_config(True))


@pytest.fixture(scope="module")
def class_run(tmp_path_factory, stage1_dir):
  workdir = str(tmp_path_factory.mktemp("gpt_class"))
  config = tiny_stage2_config(stage1_dir)
  metrics = stage2_trainer.train_and_evaluate(config, workdir)
  return workdir, config, metrics


# ----- vocabulary, masks, corruption (pure) ---------------------------------------------


def test_vocab_ranges_are_disjoint_and_sized():
  cases = {
      "none": (VocabLayout.build("none", 100), 101, 1),
      "class": (VocabLayout.build("class", 100, num_classes=7), 107, 1),
      "class+null": (VocabLayout.build("class", 100, num_classes=7, null_class=True), 108, 1),
      "spatial": (VocabLayout.build("spatial", 100, n_cond_codes=50), 150, 64),
      "coord": (VocabLayout.build("coord", 100, coord_grid=9), 118, 2),
  }
  for name, (layout, vocab, prefix) in cases.items():
    assert layout.vocab_size == vocab, name
    assert layout.prefix_len((8, 8)) == prefix, name
    spans = sorted(tuple(r) for r in layout.to_dict()["ranges"].values() if r[1] > r[0])
    assert spans[0] == (0, 100), name                    # image codes first
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
      assert a1 == b0, name                              # contiguous, no overlap
    assert spans[-1][1] == vocab, name
    assert VocabLayout.from_dict(layout.to_dict()) == layout
  lay = cases["class+null"][0]
  toks = np.asarray(conditioning.condition_tokens(lay, 3, labels=jnp.array([0, 6, 7])))
  assert toks[:, 0].tolist() == [100, 106, 107] and lay.null_id == 107
  lay = cases["spatial"][0]
  toks = np.asarray(conditioning.condition_tokens(lay, 2, cond_codes=jnp.full((2, 8, 8), 49)))
  assert toks.shape == (2, 64) and np.all(toks == 149)
  lay = cases["coord"][0]
  toks = np.asarray(conditioning.condition_tokens(
      lay, 3, origins=(jnp.array([0, 4, 8]), jnp.array([8, 0, 4])), spans=(8, 8)))
  assert toks.tolist() == [[100, 117], [104, 109], [108, 113]]
  assert np.all((toks >= lay.offset("coord")) & (toks < lay.vocab_size))
  assert VocabLayout.build("none", 100).start_id == 100


def test_loss_mask_excludes_condition_positions():
  p, n, vocab = 3, 4, 11
  mask = np.asarray(conditioning.loss_mask(p, n))
  assert mask.tolist() == [False, False, True, True, True, True]
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, p + n - 1, vocab)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (2, p + n - 1)), jnp.int32)
  mask2 = jnp.broadcast_to(jnp.asarray(mask), targets.shape)
  loss, count = losses.token_cross_entropy(logits, targets, mask2)
  assert float(count) == 2 * n
  changed = logits.at[:, :p - 1].set(100.0 * rng.normal(size=(2, p - 1, vocab)))
  assert float(losses.token_cross_entropy(changed, targets, mask2)[0]) == pytest.approx(
      float(loss), abs=1e-6)
  changed = logits.at[:, p - 1].add(5.0 * rng.normal(size=(2, vocab)))
  assert float(losses.token_cross_entropy(changed, targets, mask2)[0]) != pytest.approx(
      float(loss), abs=1e-4)


def test_pkeep_replaces_only_image_tokens_and_only_by_codes():
  p, n, n_codes = 5, 400, 32
  prefix = jnp.arange(40, 40 + p, dtype=jnp.int32)[None].repeat(8, 0)
  image = jnp.full((8, n), 7, jnp.int32)
  tokens = jnp.concatenate([prefix, image], axis=1)
  key = jax.random.PRNGKey(0)
  out = np.asarray(conditioning.corrupt_image_tokens(tokens, p, n_codes, 0.0, key))
  np.testing.assert_array_equal(out[:, :p], np.asarray(prefix))
  assert np.all((out[:, p:] >= 0) & (out[:, p:] < n_codes))
  assert np.mean(out[:, p:] != 7) > 0.9          # nearly all replaced (a few draw 7 again)
  half = np.asarray(conditioning.corrupt_image_tokens(tokens, p, n_codes, 0.5, key))
  np.testing.assert_array_equal(half[:, :p], np.asarray(prefix))
  assert 0.4 < np.mean(half[:, p:] != 7) < 0.6
  same = conditioning.corrupt_image_tokens(tokens, p, n_codes, 1.0, key)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(tokens))


def test_paper_config_parameter_counts():
  """Parameter counts (jax.eval_shape, nothing allocated) against the paper's models."""
  import importlib  # pylint: disable=g-import-not-at-top
  expected = {"transformer_imagenet_cond": 1.4e9, "transformer_ffhq": 355e6,
              "transformer_sflckr_seg": 307e6}
  for name, target in expected.items():
    config = importlib.import_module(f"configs.{name}").get_config()
    config.first_stage.workdir = "/placeholder"
    config.cond.cond_stage_workdir = "/placeholder" if config.cond.kind == "spatial" else ""
    config_lib.validate_transformer_config(config)
    gpt, layout, prefix, n = handoff.stated_model(config)
    shapes = jax.eval_shape(lambda: gpt.init(jax.random.PRNGKey(0),  # pylint: disable=cell-var-from-loop
                                             jnp.zeros((1, prefix + n - 1), jnp.int32)))
    count = transformer.count_params(shapes)
    assert count == transformer.gpt_param_count(gpt.vocab_size, gpt.block_size, gpt.n_layer,
                                                gpt.n_embd)
    assert abs(count / target - 1) < 0.03, (name, count)
  cfg = importlib.import_module("configs.transformer_imagenet_cond").get_config()
  gpt, layout, prefix, n = handoff.stated_model(cfg)
  assert (layout.vocab_size, prefix + n) == (16384 + 1000, 257)


def test_weight_decay_only_on_dense_kernels():
  gpt = transformer.GPT(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8)
  params = jax.eval_shape(gpt.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  flat = {"/".join(str(k.key) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(optim.decay_mask(params["params"]))[0]}
  decayed = sorted(k for k, v in flat.items() if v)
  assert decayed == sorted(["head/kernel"] + [f"blocks_0/{m}/kernel" for m in (
      "attn/key", "attn/query", "attn/value", "attn/proj", "mlp/fc", "mlp/proj")])
  assert not flat["wte/embedding"] and not flat["wpe"] and not flat["ln_f/scale"]


def test_coord_sliding_window_equals_plain_sampler_when_grid_is_window():
  layout = VocabLayout.build("coord", 12, coord_grid=3)
  gpt = transformer.GPT(vocab_size=layout.vocab_size, block_size=8, n_layer=1, n_head=2,
                        n_embd=16)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(gpt.init, jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), jnp.float32), shapes)
  key = jax.random.PRNGKey(5)
  grid = generation.sample_sliding_window_coord(params, gpt, layout, 2, 2, 2, 2, 3, key,
                                                num_image_codes=12)
  prefix = conditioning.condition_tokens(layout, 3, origins=(jnp.zeros(3, jnp.int32),) * 2,
                                           spans=(0, 0))
  plain = sampling.sample(params, gpt, prefix, 4, key, num_image_codes=12)
  np.testing.assert_array_equal(np.asarray(grid).reshape(3, 4), np.asarray(plain))
  assert np.all(np.asarray(grid) < 12)
  # On a larger grid the origin (and so the coordinate prefix) moves; the cached loop
  # gives the grid the recomputing one does.
  cached = generation.sample_sliding_window_coord(params, gpt, layout, 3, 4, 2, 2, 3, key,
                                                  num_image_codes=12)
  recomputed = generation.sample_sliding_window_coord(params, gpt, layout, 3, 4, 2, 2, 3, key,
                                                      num_image_codes=12, use_cache=False)
  np.testing.assert_array_equal(cached, recomputed)


# ----- sequences from real (tiny) frozen VQGANs ------------------------------------------


def test_sequences_for_spatial_and_coord_conditioning(stage1_dir, seg_dir):
  from vqgan_jax import data  # pylint: disable=g-import-not-at-top
  config = tiny_stage2_config(stage1_dir, "spatial", **{"cond.cond_stage_workdir": seg_dir})
  config_lib.validate_transformer_config(config)
  first, cond = handoff.load_frozen_stages(config)
  setup = stage2_trainer.Stage2Setup(config, first, cond)
  layout = setup.layout
  assert layout.vocab_size == N_CODES + SEG_CODES and setup.prefix_len == 64
  batch = next(data.make_train_iterator(config.data, batch_size=2, seed=0))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  frozen = {"first": first.params, "cond": cond.params}
  sequence = jax.jit(setup.sequence, static_argnames="train")
  tokens = np.asarray(sequence(frozen, batch, jax.random.PRNGKey(0), train=True))
  img_codes, seg_codes = jax.jit(setup.tokenize)(frozen, batch)
  np.testing.assert_array_equal(tokens[:, :64], np.asarray(seg_codes).reshape(2, -1) + N_CODES)
  np.testing.assert_array_equal(tokens[:, 64:], np.asarray(img_codes).reshape(2, -1))

  # Coordinates: a 4x4 window of the 8x8 grid, prefixed by its binned origin.
  config = tiny_stage2_config(stage1_dir, "coord", crop_tokens=4, **{"cond.coord_grid": 5})
  setup = stage2_trainer.Stage2Setup(config, first)
  assert setup.prefix_len == 2 and setup.num_image_tokens == 16
  tokens = np.asarray(jax.jit(setup.sequence, static_argnames="train")(
      {"first": first.params}, batch, jax.random.PRNGKey(3), train=True))
  by, bx = tokens[:, 0] - N_CODES, tokens[:, 1] - N_CODES - 5
  for b in range(2):   # origin bins of a 4-wide window in 8 are the origins (5 bins, span 4)
    window = np.asarray(img_codes)[b, by[b]:by[b] + 4, bx[b]:bx[b] + 4]
    np.testing.assert_array_equal(tokens[b, 2:], window.reshape(-1))


# ----- training, resume, checkpoints ------------------------------------------------------


def test_training_metrics_and_checkpoint_metadata(class_run, stage1_dir):
  workdir, config, metrics = class_run
  for key in ("val_loss", "val_bits_per_token", "unigram_entropy_bits",
              "val_unigram_bits_per_token"):
    assert np.isfinite(metrics[key]), key
  assert metrics["val_bits_per_token"] == pytest.approx(metrics["val_loss"] / np.log(2))
  assert 0 < metrics["unigram_entropy_bits"] <= np.log2(N_CODES) + 1e-6
  meta, step = handoff.read_stage2_metadata(workdir)
  assert step == 3 and meta["stage"] == "transformer" and meta["attention"] == "softmax"
  assert meta["vocab"]["ranges"]["image"] == [0, N_CODES]
  assert meta["vocab"]["ranges"]["class"] == [N_CODES, N_CODES + 7]
  assert meta["vocab"]["ranges"]["null_class"] == [N_CODES + 7, N_CODES + 8]
  recorded = dict(meta["first_stage"])
  assert len(recorded.pop("fingerprint")) == 16
  assert recorded == {"workdir": os.path.abspath(stage1_dir), "step": 2,
                      "relative_workdir": os.path.relpath(stage1_dir, workdir),
                      "n_embed": N_CODES, "latent_grid": [8, 8], "downsample_factor": 2}
  assert meta["config"]["cond"]["kind"] == "class"
  loaded = handoff.load_stage2(workdir)
  assert loaded.model.vocab_size == N_CODES + 8 and loaded.model.block_size == 65
  assert loaded.first_stage.n_embed == N_CODES and loaded.cond_stage is None
  # Frozen VQGAN parameters are not part of the stage-2 checkpoint.
  assert "encoder" not in loaded.params and "blocks_0" in loaded.params
  with pytest.raises(checkpointing.CheckpointError, match="'linear'"):
    handoff.load_stage2(workdir, attention="linear")


def test_a_moved_run_finds_its_vqgan_and_refuses_another(class_run, stage1_dir, tmp_path):
  """A stage-2 run copied together with its VQGAN (same relative layout) loads after the
  original folders are gone; another VQGAN at the same step is refused by fingerprint,
  and a missing one names the override flag."""
  workdir, _, _ = class_run
  moved = tmp_path / "elsewhere"
  shutil.copytree(stage1_dir, moved / "s1")
  shutil.copytree(workdir, moved / "s2")
  meta, _ = handoff.read_stage2_metadata(str(moved / "s2"))
  record = dict(meta["first_stage"], workdir="/nonexistent/s1", relative_workdir="../s1")
  frozen = handoff.load_recorded_stage1(str(moved / "s2"), record, None,
                                        "--first_stage_workdir")
  assert frozen.step == 2 and frozen.n_embed == N_CODES
  with pytest.raises(checkpointing.CheckpointError, match="--first_stage_workdir=DIR"):
    handoff.load_recorded_stage1(str(moved / "s2"), dict(record, relative_workdir="../gone"),
                                 None, "--first_stage_workdir")
  with pytest.raises(checkpointing.CheckpointError, match="codebook differs"):
    handoff.load_recorded_stage1(str(moved / "s2"), dict(record, fingerprint="0" * 16),
                                 str(moved / "s1"), "--first_stage_workdir")


def test_resume_continues_from_checkpoint(class_run, tmp_path, monkeypatch):
  src, config, _ = class_run
  workdir = str(tmp_path / "resumed")
  shutil.copytree(src, workdir)
  saved = handoff.load_stage2(workdir)
  seen = []
  original = stage2_trainer.Stage2Runner.train_step

  def recording(self, state, batch):
    if not seen:
      seen.append((int(state.trainer.step), jax.device_get(state.params)))
    return original(self, state, batch)

  monkeypatch.setattr(stage2_trainer.Stage2Runner, "train_step", recording)
  config = tiny_stage2_config(config.first_stage.workdir, num_train_steps=5,
                              checkpoint_every_steps=5, unigram_batches=0)
  stage2_trainer.train_and_evaluate(config, workdir)
  step, params = seen[0]
  assert step == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, jax.device_get(saved.params))
  manager = checkpointing.make_manager(workdir, read_only=True)
  assert sorted(manager.all_steps()) == [3, 5]
  assert handoff.read_stage2_metadata(workdir)[0]["step"] == 5


# ----- bad input fails before anything is compiled ------------------------------------------


@pytest.fixture
def no_runner(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("a Stage2Runner (compilation) was created before the error")
  monkeypatch.setattr(stage2_trainer, "Stage2Runner", fail)


def test_missing_stage1_workdir_fails_naming_it(tmp_path, no_runner):
  missing = str(tmp_path / "no_such_vqgan")
  with pytest.raises(checkpointing.CheckpointError, match="no_such_vqgan"):
    stage2_trainer.train_and_evaluate(tiny_stage2_config(missing), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists() or not os.listdir(
      tmp_path / "w" / "checkpoints")


def test_codebook_or_grid_mismatch_fails_naming_values(stage1_dir, tmp_path, no_runner):
  config = tiny_stage2_config(stage1_dir, **{"first_stage.n_embed": 64})
  with pytest.raises(config_lib.ConfigError) as err:
    stage2_trainer.train_and_evaluate(config, str(tmp_path / "w"))
  assert "64" in str(err.value) and str(N_CODES) in str(err.value) and stage1_dir in str(err.value)
  config = tiny_stage2_config(stage1_dir, **{"first_stage.latent_grid": (16, 16)})
  with pytest.raises(config_lib.ConfigError, match=r"\(16, 16\).*\(8, 8\)"):
    stage2_trainer.train_and_evaluate(config, str(tmp_path / "w2"))


def test_spatial_needs_a_segmentation_vqgan(stage1_dir, tmp_path, no_runner):
  # The image VQGAN is no conditioning VQGAN: it was trained on RGB, not segmentations.
  config = tiny_stage2_config(stage1_dir, "spatial", **{"cond.cond_stage_workdir": stage1_dir})
  with pytest.raises(config_lib.ConfigError, match="segmentation"):
    stage2_trainer.train_and_evaluate(config, str(tmp_path / "w"))


def test_sampling_rejects_bad_class_label_before_sampling(class_run, tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("sampling started")
  monkeypatch.setattr(sampling, "sample", fail)
  monkeypatch.setattr(handoff, "load_stage2", fail)
  workdir = class_run[0]
  with pytest.raises(ValueError, match="class label 7 is out of range.*7 classes"):
    sample.run_sampling(workdir, str(tmp_path), classes=[0, 7])
  with pytest.raises(ValueError, match="class label -1"):
    sample.run_sampling(workdir, str(tmp_path), classes=[-1])
  linear = tiny_stage2_config(class_run[1].first_stage.workdir, **{"model.attention": "linear"})
  with pytest.raises(checkpointing.CheckpointError, match="attention"):
    sample.run_sampling(workdir, str(tmp_path), config=linear)


# ----- the sampling CLI ---------------------------------------------------------------------


def test_sample_cli_writes_pngs(class_run, tmp_path, capsys):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = tmp_path / "samples"
  flag_values = flags.FlagValues()
  sample.define_flags(flag_values)
  flag_values(["sample", f"--workdir={class_run[0]}", f"--output={out}", "--classes=0,3",
               "--num_samples_per_class=2", "--num_samples=2", "--seed=1", "--top_k=8",
               "--cfg_scale=1.5"])
  sample.run_from_flags(flag_values)
  names = sorted(os.listdir(out))
  assert names == ["class_0000_astronaut.png", "class_0003_rocket.png", "sliding_window.png"]
  assert str(out / "sliding_window.png") in capsys.readouterr().out
  # Cells are upscaled to at least MIN_CELL_PIXELS; a caption line sits above each row.
  pad, caption = visualize.PAD, visualize.LABEL_HEIGHT + 2
  cell = 16 * visualize.upscale_factor(16)                   # 16px samples
  with Image.open(out / "class_0000_astronaut.png") as im:
    assert im.size == (pad + 2 * (cell + pad), caption + pad + cell + pad)  # two in one row
  cell = 32 * visualize.upscale_factor(32)                   # 16x16 tokens x f=2: 32px
  with Image.open(out / "sliding_window.png") as im:
    width, height = im.size
    assert height == caption + pad + cell + pad              # one row (2 classes), captioned
    assert width >= pad + 2 * (cell + pad)


# ----- training from exported tokens (config.tokens_dir) -------------------------------------


@pytest.fixture(scope="module")
def exported_tokens(stage1_dir, tmp_path_factory):
  """Train and validation splits of the tiny photos data, exported with the stage-1 model."""
  from vqgan_jax import export_tokens  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp("exported") / "tokens")
  config = tiny_stage2_config(stage1_dir)
  for split in ("train", "validation"):
    export_tokens.export_tokens(config, stage1_dir, out, split=split, batch_size=8)
  return out


def test_a_step_on_exported_tokens_equals_a_step_on_images(stage1_dir, exported_tokens):
  from vqgan_jax import data  # pylint: disable=g-import-not-at-top
  from vqgan_jax.data import tokens  # pylint: disable=g-import-not-at-top
  config = tiny_stage2_config(stage1_dir, tokens_dir=exported_tokens, pkeep=0.5)
  config_lib.validate_transformer_config(config)
  first, _ = handoff.load_frozen_stages(config)
  handoff.check_exported_tokens(config, first)
  runner = stage2_trainer.Stage2Runner(config, first, num_classes=7)
  # The validation records are the eval iterator's examples in the same order.
  images = next(iter(data.make_eval_iterator(config.data, batch_size=4)))
  assert images["mask"].all()
  source = tokens.TokenSource(exported_tokens, "validation")
  records = [source[i] for i in range(4)]
  token_batch = {"tokens": np.stack([r["tokens"] for r in records]),
                 "label": np.stack([r["label"] for r in records])}
  np.testing.assert_array_equal(token_batch["label"], images["label"])
  assert runner.setup.batch_keys(True) == ("tokens", "label")
  # Same initial state (init is deterministic; the step donates its input state).
  from_images, m_images = runner.train_step(runner.init_state(), images)
  from_tokens, m_tokens = runner.train_step(runner.init_state(), token_batch)
  assert float(m_images["loss"]) == pytest.approx(float(m_tokens["loss"]), rel=1e-6)
  assert np.isfinite(float(m_tokens["loss"]))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         jax.device_get(from_images.params), jax.device_get(from_tokens.params))


def test_training_from_exported_tokens(stage1_dir, exported_tokens, tmp_path, monkeypatch):
  seen = []
  original = stage2_trainer.Stage2Runner.select

  def recording(self, batch, eval_batch=False):
    seen.append((eval_batch, tuple(sorted(batch))))
    return original(self, batch, eval_batch)

  monkeypatch.setattr(stage2_trainer.Stage2Runner, "select", recording)
  config = tiny_stage2_config(stage1_dir, tokens_dir=exported_tokens, num_train_steps=2,
                              unigram_batches=1)
  metrics = stage2_trainer.train_and_evaluate(config, str(tmp_path / "gpt"))
  assert np.isfinite(metrics["val_bits_per_token"]) and metrics["unigram_entropy_bits"] > 0
  # Every batch, train and eval, came from the exported tokens, none from images.
  assert seen and all("tokens" in keys and "image" not in keys for _, keys in seen)
  assert {e for e, _ in seen} == {True, False}
  meta, step = handoff.read_stage2_metadata(str(tmp_path / "gpt"))
  assert step == 2 and meta["config"]["tokens_dir"] == exported_tokens


def test_exported_tokens_from_another_checkpoint_are_refused(stage1_dir, exported_tokens,
                                                             tmp_path, no_runner):
  other = make_stage1_workdir(tmp_path / "other_vq", tiny_stage1_config(), step=5)
  config = tiny_stage2_config(other, tokens_dir=exported_tokens)
  with pytest.raises(config_lib.ConfigError, match=r"train/metadata\.json.*stage-1 step.*2.*5"):
    stage2_trainer.train_and_evaluate(config, str(tmp_path / "w"))
  config = tiny_stage2_config(stage1_dir, tokens_dir=str(tmp_path / "nothing"))
  with pytest.raises(config_lib.ConfigError, match="nothing"):
    stage2_trainer.train_and_evaluate(config, str(tmp_path / "w2"))


# ----- evaluation of every conditioning kind ----------------------------------------------


@pytest.mark.parametrize("kind", ["none", "class", "spatial", "coord"])
def test_eval_runs_on_every_conditioning(kind, class_run, stage1_dir, seg_dir, tmp_path):
  """`evaluate_stage2` on a briefly trained checkpoint of each kind: bits/token and the
  sample metrics (spatial: the val split's maps; coord: drawn origins) are all there and
  finite; FID of the val features against themselves is ~0."""
  from vqgan_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  if kind == "class":
    workdir, config, _ = class_run
  else:
    extra = {"cond.cond_stage_workdir": seg_dir} if kind == "spatial" else {}
    if kind == "coord":
      extra = {"crop_tokens": 4, "cond.coord_grid": 5}
    config = tiny_stage2_config(stage1_dir, kind, num_train_steps=2, unigram_batches=0,
                                **extra)
    workdir = str(tmp_path / kind)
    stage2_trainer.train_and_evaluate(config, workdir)
  feature_fn = helpers.mock_feature_fn()
  results = eval_lib.evaluate_stage2(config, workdir, num_samples=8, batch_size=8,
                                     feature_fn=feature_fn, write=False)
  for key in ("bits_per_token", "fid", "inception_score", "kid", "precision", "recall"):
    assert key in results and np.isfinite(results[key]), (key, results)
  assert results["num_samples"] == 8 and results["stage"] == "transformer"
  real, _ = eval_lib.collect_features(feature_fn, eval_lib.val_batches(
      config.data, sharding.make_mesh(config.mesh), 8))
  assert eval_lib.generated_image_metrics(real, real_pool=real)["fid"] == pytest.approx(
      0.0, abs=1e-6)

"""Tests for vqgan_jax.eval and vqgan_jax.evaluation: stage-1 evaluation end to end on a
tiny trained workdir, its error paths, and the stage-2 metric plumbing with known inputs.

The Inception network itself is tested in test_inception.py; here the FID path loads a
random-weights file through the real loader and replaces only the network by a cheap
feature function (the real network at 299px plus a 2048-d FID would take minutes).
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from vqgan_jax import checkpointing, data, metrics, visualize
from vqgan_jax import eval as eval_lib
from vqgan_jax.evaluation import common as eval_common

K = 32  # codebook size of the tiny config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return helpers.shared_stage1_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def config():
  return helpers.tiny_stage1_config()


@pytest.fixture(scope="module")
def stage1_results(workdir, config, tmp_path_factory):
  out = tmp_path_factory.mktemp("eval") / "out.json"
  env = os.environ.pop(eval_lib.INCEPTION_ENV, None)
  try:
    results = eval_lib.evaluate(config, workdir, batch_size=32, output_json=str(out))
  finally:
    if env is not None:
      os.environ[eval_lib.INCEPTION_ENV] = env
  return results, out


def test_stage1_json_has_every_metric(stage1_results, workdir, config):
  results, out = stage1_results
  for key in ("l1", "mse", "psnr", "ssim", "lpips", "border_ratio", "codebook_usage",
              "code_perplexity",
              "code_entropy_bits", "codebook_size", "codes_used", "num_images", "step",
              "reconstruction_grid", "fid_skipped"):
    assert key in results, key
  assert results["step"] == 2 and results["stage"] == "vqgan"
  assert results["num_images"] == data.dataset_info(config.data)["num_val"]
  assert math.isfinite(results["psnr"]) and results["psnr"] > 0
  assert -1.0 <= results["ssim"] <= 1.0
  assert 0.0 < results["codebook_usage"] <= 100.0
  assert results["codes_used"] == round(results["codebook_usage"] * K / 100)
  assert 1.0 <= results["code_perplexity"] <= K + 1e-9
  assert 0.0 <= results["code_entropy_bits"] <= math.log2(K) + 1e-9
  np.testing.assert_allclose(results["code_perplexity"], 2 ** results["code_entropy_bits"])
  assert results["lpips"] >= 0 and results["l1"] > 0 and results["mse"] > 0
  assert results["num_indices"] == results["num_images"] * 8 * 8
  assert results["fid_skipped"] == ("no Inception weights given (--inception_weights or "
                                    "VQGAN_INCEPTION_WEIGHTS); see README")
  assert "rfid" not in results
  # Written to DIR/eval/stage1_step{N}.json and --output_json, both valid JSON.
  written = os.path.join(workdir, "eval", "stage1_step2.json")
  assert results["json"] == written
  for path in (written, out):
    with open(path) as f:
      on_disk = json.load(f)
    assert on_disk["psnr"] == results["psnr"] and on_disk["fid_skipped"] == results["fid_skipped"]
  from PIL import Image
  grid = np.asarray(Image.open(results["reconstruction_grid"]))
  cell = 16 * visualize.upscale_factor(16) + visualize.PAD     # upscaled 16px crops
  assert grid.shape[0] == 2 * cell + visualize.PAD            # originals over reconstructions
  assert grid.shape[1] > 8 * cell + visualize.PAD             # 8 columns after row labels
  assert grid.shape[2] == 3


def test_stage1_metrics_match_direct_computation(stage1_results, workdir, config):
  """The pixel and code metrics equal metrics.* applied to the model's own outputs."""
  results, _ = stage1_results
  frozen = checkpointing.load_stage1(workdir)
  batch = next(iter(data.make_eval_iterator(config.data, batch_size=32)))
  mask = batch["mask"]
  out = jax.jit(lambda p, x: frozen.model.apply({"params": p}, x))(frozen.params, batch["image"])
  x = batch["image"][mask]
  x_rec = np.clip(np.asarray(out["x_rec"]), -1, 1)[mask]
  np.testing.assert_allclose(results["l1"], float(metrics.l1(x, x_rec)), rtol=1e-5)
  np.testing.assert_allclose(results["mse"], float(metrics.mse(x, x_rec)), rtol=1e-5)
  np.testing.assert_allclose(results["psnr"], float(metrics.psnr(x, x_rec)), rtol=1e-5)
  np.testing.assert_allclose(results["ssim"], float(metrics.ssim(x, x_rec)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(results["border_ratio"],
                             float(np.mean(metrics.border_ratio(x, x_rec))), rtol=1e-5)
  counts = np.bincount(np.asarray(out["indices"])[mask].ravel(), minlength=K)
  assert results["codebook_usage"] == metrics.codebook_usage(counts)
  np.testing.assert_allclose(results["code_perplexity"], metrics.code_perplexity(counts))


@pytest.fixture(scope="module")
def inception_npz(tmp_path_factory):
  return helpers.write_random_inception_weights(
      tmp_path_factory.mktemp("inception") / "inception_fid.npz")


def test_rfid_with_inception_weights_from_env(workdir, config, inception_npz, monkeypatch,
                                              tmp_path):
  """Weights named by $VQGAN_INCEPTION_WEIGHTS are loaded (and validated) by the real
  loader; only the network is replaced by a cheap feature function."""
  seen = {}

  def fake_feature_fn(variables, mesh):
    seen["variables"] = variables
    return helpers.mock_feature_fn()

  monkeypatch.setenv(eval_lib.INCEPTION_ENV, inception_npz)
  monkeypatch.setattr(eval_common, "make_inception_feature_fn", fake_feature_fn)
  monkeypatch.setattr(eval_common, "inception_feature_dim", lambda: 16)
  results = eval_lib.evaluate_stage1(config, workdir, batch_size=32, use_lpips=False,
                                     output_json=str(tmp_path / "r.json"))
  params = seen["variables"]["params"]
  assert params["fc"]["kernel"].shape == (2048, 1008)
  assert "fid_skipped" not in results
  assert results["lpips_skipped"] == "disabled (--nolpips)"
  assert math.isfinite(results["rfid"]) and results["rfid"] > 0
  assert results["rfid_num_images"] == results["num_images"]
  assert results["inception_weights"] == os.path.abspath(inception_npz)

  # The same FID against precomputed reference statistics of the val images.
  stats_path = str(tmp_path / "ref.npz")
  ref = eval_lib.compute_reference_stats(config, stats_path, batch_size=32)
  assert ref["num_images"] == results["num_images"] and ref["feature_dim"] == 16
  with_ref = eval_lib.evaluate_stage1(config, workdir, batch_size=32, use_lpips=False,
                                      reference_stats=stats_path, write=False)
  np.testing.assert_allclose(with_ref["rfid"], results["rfid"], rtol=1e-6)
  assert with_ref["rfid_reference"] == os.path.abspath(stats_path)


def test_low_rank_fid_equals_sqrtm_fid():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((12, 40))
  b = rng.standard_normal((9, 40)) * 1.5 + 0.3
  expected = metrics.frechet_distance(*metrics.FeatureStats().update(a).stats(),
                                      *metrics.FeatureStats().update(b).stats())
  np.testing.assert_allclose(eval_lib.frechet_distance_from_features(a, b), expected, rtol=1e-6)
  c = rng.standard_normal((60, 8))  # more samples than dimensions: the sqrtm path
  d = rng.standard_normal((50, 8))
  expected = metrics.frechet_distance(*metrics.FeatureStats().update(c).stats(),
                                      *metrics.FeatureStats().update(d).stats())
  np.testing.assert_allclose(eval_lib.frechet_distance_from_features(c, d), expected, rtol=1e-9)


def _no_results(tmp_path, workdir=None):
  assert not (tmp_path / "out.json").exists()
  if workdir is not None:
    assert not os.path.exists(os.path.join(workdir, "eval"))


def test_workdir_without_checkpoint_fails_naming_it(config, tmp_path):
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(checkpointing.CheckpointError, match=re.escape(str(empty))):
    eval_lib.evaluate(config, str(empty), output_json=str(tmp_path / "out.json"))
  _no_results(tmp_path, str(empty))
  missing = tmp_path / "no_such_run"
  with pytest.raises(checkpointing.CheckpointError, match="no_such_run"):
    eval_lib.evaluate(config, str(missing))
  assert not missing.exists()


def test_cli_reports_missing_checkpoint(tmp_path):
  empty = tmp_path / "run"
  empty.mkdir()
  proc = subprocess.run(
      [sys.executable, "-m", "vqgan_jax.eval", "--config", "configs/vqgan_demo.py",
       "--workdir", str(empty), "--output_json", str(tmp_path / "out.json")],
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 2
  assert "error:" in proc.stderr and str(empty) in proc.stderr
  _no_results(tmp_path, str(empty))


def test_wrong_inception_weights_fail_naming_the_file(workdir, config, inception_npz, tmp_path):
  eval_dir = os.path.join(workdir, "eval")
  listing = lambda: sorted(os.listdir(eval_dir)) if os.path.isdir(eval_dir) else []
  before = listing()
  bad = tmp_path / "bad_weights.npz"
  np.savez(bad, **{"fc/kernel": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="bad_weights.npz"):
    eval_lib.evaluate(config, workdir, inception_weights=str(bad),
                      output_json=str(tmp_path / "out.json"))
  with pytest.raises(ValueError, match=r"inception_fid\.npz.*SHA-256 mismatch"):
    eval_lib.evaluate(config, workdir, inception_weights=inception_npz,
                      inception_sha256="0" * 64, output_json=str(tmp_path / "out.json"))
  _no_results(tmp_path)
  assert listing() == before


def test_stage_or_model_mismatch_fails(workdir, config, tmp_path):
  other = helpers.tiny_stage1_config()
  other.stage = "transformer"
  with pytest.raises(checkpointing.CheckpointError, match="'vqgan' checkpoint"):
    eval_lib.evaluate(other, workdir, output_json=str(tmp_path / "out.json"))
  other = helpers.tiny_stage1_config()
  other.model.n_embed = 64
  with pytest.raises(checkpointing.CheckpointError, match="model.n_embed"):
    eval_lib.evaluate(other, workdir, output_json=str(tmp_path / "out.json"))
  _no_results(tmp_path)


# ------------------------------------------------------------------ stage-2 plumbing


def test_bits_per_token_of_known_logits():
  v = 16
  targets = np.arange(24).reshape(2, 12) % v
  uniform = lambda batch: (jnp.zeros((2, 12, v)), batch, None)
  out = eval_lib.bits_per_token(uniform, [targets, targets])
  np.testing.assert_allclose(out["bits_per_token"], math.log2(v), rtol=1e-6)
  np.testing.assert_allclose(out["token_perplexity"], v, rtol=1e-5)
  assert out["num_tokens"] == 48

  # A model putting probability 1/2 on the target and 1/2 spread over the rest: 1 bit;
  # weights drop the second example, whose logits would give a very different value.
  def half(batch):
    logits = np.full((2, 12, v), np.log(0.5 / (v - 1)))
    np.put_along_axis(logits, batch[..., None], np.log(0.5), axis=-1)
    logits[1] = 0.0
    return logits, batch, np.array([[1.0] * 12, [0.0] * 12])

  np.testing.assert_allclose(eval_lib.bits_per_token(half, [targets])["bits_per_token"], 1.0,
                             rtol=1e-6)


def test_generated_image_metrics():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((200, 8))
  same = rng.standard_normal((200, 8))
  shifted = rng.standard_normal((200, 8)) + 2.0
  uniform_logits = np.zeros((200, 10))
  near = eval_lib.generated_image_metrics(same, uniform_logits, real_pool=real, kid_subsets=10,
                                          kid_subset_size=100)
  far = eval_lib.generated_image_metrics(shifted, uniform_logits, real_pool=real,
                                         kid_subsets=10, kid_subset_size=100)
  assert 0 <= near["fid"] < 1.0 < far["fid"]
  assert near["kid"] < far["kid"]
  assert near["precision"] > far["precision"] and near["recall"] > far["recall"]
  np.testing.assert_allclose(near["inception_score"], 1.0, rtol=1e-9)  # uniform p(y|x)
  stats = metrics.FeatureStats().update(real).stats()
  only_stats = eval_lib.generated_image_metrics(same, real_stats=stats)
  np.testing.assert_allclose(only_stats["fid"], near["fid"], rtol=1e-6)
  assert "kid_skipped" in only_stats and "inception_score_skipped" in only_stats


def test_evaluate_stage2_with_a_fake_model(tmp_path):
  """The stage-2 evaluation wiring with a stand-in model and feature function."""
  v, images = 32, np.random.default_rng(0).uniform(-1, 1, (24, 16, 16, 3)).astype(np.float32)

  class FakeStage2:
    step = 7

    def eval_token_batches(self, batch_size):
      return [{"tokens": np.zeros((batch_size, 64), np.int32)}] * 2

    def token_logits(self, batch):
      return jnp.zeros(batch["tokens"].shape + (v,)), batch["tokens"], None

    def generate_images(self, rng, num_samples, batch_size):
      for s in range(0, num_samples, batch_size):
        yield images[s:s + batch_size]

  stage2_config = helpers.tiny_stage1_config()
  stage2_config.stage = "transformer"
  results = eval_lib.evaluate_stage2(stage2_config, str(tmp_path), num_samples=24,
                                     batch_size=8, feature_fn=helpers.mock_feature_fn(),
                                     model=FakeStage2())
  np.testing.assert_allclose(results["bits_per_token"], math.log2(v), rtol=1e-6)
  for key in ("fid", "inception_score", "kid", "precision", "recall", "sample_grid"):
    assert key in results, key
  assert results["num_samples"] == 24 and results["step"] == 7
  with open(os.path.join(tmp_path, "eval", "stage2_step7.json")) as f:
    assert json.load(f)["fid"] == results["fid"]

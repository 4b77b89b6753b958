"""Stage-1 evaluation: reconstruction metrics of a VQGAN workdir on the val split.

`evaluate_stage1` runs `make_stage1_eval_step` (jitted, replicated parameters,
batch-sharded val batches) over the whole val split (or `num_batches` batches) and
averages per image: l1, mse, psnr (data range 2 on [-1, 1]), ssim (skimage conventions,
see metrics.ssim; skipped below the 11px window), lpips (VGG LPIPS v0.1) and, for
segmentation models, pixel accuracy. The val indices give codebook usage, perplexity and
entropy (metrics.IndexHistogram). rFID compares the reconstructions' Inception features
with the val images' (same crops), or with reference statistics: the raw rows are kept
while there are few, so small sets use the exact low-rank FID
(common.frechet_distance_from_features), large ones the streamed mean/covariance.
"""

import math
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import checkpointing, handoff, metrics, sharding, visualize
from vqgan_jax.evaluation import common
from vqgan_jax.models import lpips, vqgan


def _finite_or_none(value: float):
  return float(value) if math.isfinite(value) else None


class _Features:
  """Streaming features: mean/covariance always, the raw rows while there are few."""

  def __init__(self, keep_rows: int = 4096):
    self.stats = metrics.FeatureStats()
    self.rows = []
    self.keep_rows = keep_rows

  def update(self, features) -> None:
    features = np.asarray(features, np.float64)
    self.stats.update(features)
    if self.rows is not None:
      self.rows.append(features)
      if self.stats.n > self.keep_rows:
        self.rows = None

  def all_rows(self):
    return None if self.rows is None else np.concatenate(self.rows)


def _fid(fake: "_Features", real: Optional["_Features"] = None, real_stats=None) -> float:
  if real_stats is not None:
    mu, sigma = fake.stats.stats()
    if real_stats[0].shape != mu.shape:
      raise common.EvalError(f"the reference statistics have {real_stats[0].shape[0]}-d "
                             f"features, the Inception features are {mu.shape[0]}-d")
    return metrics.frechet_distance(mu, sigma, *real_stats)
  x_fake, x_real = fake.all_rows(), real.all_rows()
  if x_fake is not None and x_real is not None:
    return common.frechet_distance_from_features(x_fake, x_real)
  return metrics.frechet_distance(*fake.stats.stats(), *real.stats.stats())


def make_stage1_eval_step(frozen, *, use_ssim: bool, use_lpips: bool) -> Callable:
  """jitted (params, lpips_params, batch) -> (per-example metrics, indices, x, x_rec)."""
  inputs = handoff.model_inputs_fn(frozen.config)
  segmentation = handoff.input_kind(frozen.metadata["config"]) == "segmentation"
  model = frozen.model

  def step(params, lpips_params, batch):
    x = inputs(batch)
    out = model.apply(vqgan.as_variables(params), x, train=False)
    x_rec = jnp.clip(out["x_rec"], -1.0, 1.0)
    diff = x - x_rec
    mse = jnp.mean(diff * diff, axis=(1, 2, 3))
    per = {"l1": jnp.mean(jnp.abs(diff), axis=(1, 2, 3)), "mse": mse,
           # data range 2 on [-1, 1]; the floor keeps a perfect reconstruction finite
           "psnr": 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))}
    if min(x.shape[1:3]) > 4:  # error on the 2-pixel ring over the interior's (fringes)
      per["border_ratio"] = metrics.border_ratio(x, x_rec)
    if use_ssim:
      per["ssim"] = metrics.ssim(x, x_rec, per_image=True)
    if use_lpips:
      per["lpips"] = lpips.lpips_distance(lpips_params, x, x_rec)
    if segmentation:
      same = jnp.argmax(x_rec, axis=-1) == jnp.argmax(x, axis=-1)
      per["segmentation_accuracy"] = jnp.mean(same.astype(jnp.float32), axis=(1, 2))
    return per, out["indices"], x, x_rec

  return jax.jit(step)


def evaluate_stage1(config, workdir: str, *, step: Optional[int] = None,
                    inception_weights: Optional[str] = None,
                    inception_sha256: Optional[str] = None,
                    reference_stats: Optional[str] = None, output_json: Optional[str] = None,
                    batch_size: Optional[int] = None, num_batches: int = 0,
                    use_lpips: bool = True, num_grid_images: int = 8,
                    feature_fn: Optional[Callable] = None, mesh=None,
                    write: bool = True) -> Dict[str, Any]:
  """Reconstruction metrics of a VQGAN workdir on the val split (see module doc).

  `feature_fn(images) -> {'pool': (B, D)}` replaces the Inception network (tests).
  Returns the results dict, also written as JSON unless `write=False`.
  """
  start = time.time()
  sharding.maybe_initialize_distributed()  # before anything touches the JAX backend
  if config.get("stage", "vqgan") != "vqgan":
    raise common.EvalError("evaluate_stage1 needs a stage-1 config, got "
                           f"config.stage={config.stage!r}")
  step, meta = common.check_stage(config, workdir, step)
  checkpointing.check_same_model(meta["config"]["model"],
                                 checkpointing.config_to_dict(config)["model"], workdir,
                                 force=bool(config.get("force_resume", False)))
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  what = common.batch_setting(batch_size)
  batch_size = int(batch_size or config.eval_batch_size)
  common.check_batch_size(batch_size, mesh, what)
  rgb = handoff.input_kind(meta["config"]) == "image"
  size = int(config.data.image_size)

  # Everything that can fail on a user-given file, before any work or output.
  weights_path = common.resolve_inception_weights(inception_weights)
  fid_skipped, feature_dim = None, None
  if not rgb:
    fid_skipped = common.FID_SKIPPED_NOT_RGB
  elif feature_fn is None and weights_path is None:
    fid_skipped = common.FID_SKIPPED_NO_WEIGHTS
  elif feature_fn is None:
    feature_fn = common.make_inception_feature_fn(
        common.load_inception(weights_path, inception_sha256), mesh)
    feature_dim = common.inception_feature_dim()
  ref_stats = common.load_reference_stats(reference_stats)
  if ref_stats is not None and feature_dim is not None and ref_stats[0].shape != (feature_dim,):
    raise common.EvalError(f"--reference_stats {reference_stats} holds "
                           f"{ref_stats[0].shape[0]}-d features; the Inception pool "
                           f"features are {feature_dim}-d")

  frozen = checkpointing.load_stage1(workdir, step, sharding=sharding.replicated(mesh))
  lpips_params, lpips_skipped = None, None
  if not use_lpips:
    lpips_skipped = "disabled (--nolpips)"
  elif not rgb:
    lpips_skipped = common.FID_SKIPPED_NOT_RGB
  else:
    try:
      lpips_params = jax.device_put(lpips.load_lpips_params(), sharding.replicated(mesh))
    except (FileNotFoundError, ValueError) as e:
      lpips_skipped = f"LPIPS weights unavailable: {e}"
  use_ssim = size >= 11
  eval_step = make_stage1_eval_step(frozen, use_ssim=use_ssim,
                                    use_lpips=lpips_params is not None)

  sums: Dict[str, float] = {}
  count = 0
  hist = metrics.IndexHistogram(frozen.n_embed)
  fake_features, real_features = _Features(), _Features()
  shown_x, shown_rec = [], []
  for batch in common.val_batches(config.data, mesh, batch_size, num_batches):
    per, indices, x, x_rec = eval_step(frozen.params, lpips_params, batch)
    mask = common.gather(batch["mask"]).astype(bool)
    for k, v in per.items():
      sums[k] = sums.get(k, 0.0) + float(np.sum(common.gather(v).astype(np.float64)[mask]))
    count += int(mask.sum())
    hist.update(common.gather(indices)[mask])
    if feature_fn is not None and fid_skipped is None:
      fake_features.update(common.gather(feature_fn(x_rec)["pool"])[mask])
      if ref_stats is None:
        real_features.update(common.gather(feature_fn(x)["pool"])[mask])
    if sum(len(a) for a in shown_x) < num_grid_images:
      shown_x.append(common.gather(x)[mask])
      shown_rec.append(common.gather(x_rec)[mask])
  if count == 0:
    raise common.EvalError("the val split is empty: nothing to evaluate")

  results: Dict[str, Any] = {
      "stage": "vqgan", "step": frozen.step, "workdir": os.path.abspath(workdir),
      "split": "validation", "data": config.data.name, "image_size": size,
      "num_images": count, "batch_size": batch_size,
  }
  results.update({k: _finite_or_none(v / count) for k, v in sums.items()})
  if not use_ssim:
    results["ssim_skipped"] = f"images of {size}px are smaller than the 11px SSIM window"
  if lpips_skipped:
    results["lpips_skipped"] = lpips_skipped
  results.update({
      "codebook_size": frozen.n_embed,
      "codebook_usage": hist.usage(),
      "codes_used": int(np.count_nonzero(hist.counts)),
      "code_perplexity": hist.perplexity(),
      "code_entropy_bits": hist.entropy(),
      "num_indices": hist.total,
  })
  if fid_skipped is None:
    results["rfid"] = _fid(fake_features, real_features, ref_stats)
    results["rfid_num_images"] = fake_features.stats.n
    results["rfid_reference"] = (os.path.abspath(reference_stats) if ref_stats is not None
                                 else "val images (same crops)")
    results["inception_weights"] = os.path.abspath(weights_path) if weights_path else None
  else:
    results["fid_skipped"] = fid_skipped

  if write and jax.process_index() == 0:
    out_dir = os.path.join(workdir, "eval")
    if shown_x:
      originals = np.concatenate(shown_x)[:num_grid_images]
      recons = np.concatenate(shown_rec)[:num_grid_images]
      if not rgb:
        originals, recons = _colorize(originals), _colorize(recons)
      grid = visualize.make_grid([originals, recons], row_labels=["original", "reconstruction"])
      results["reconstruction_grid"] = visualize.save_png(
          os.path.join(out_dir, f"stage1_step{frozen.step}_reconstructions.png"), grid)
    return common.finish_results(results, start,
                                 os.path.join(out_dir, f"stage1_step{frozen.step}.json"),
                                 output_json)
  return common.finish_results(results, start, None)


def _colorize(onehot_like: np.ndarray) -> np.ndarray:
  """Segmentation maps (B, H, W, K) -> RGB in [-1, 1] with a fixed palette."""
  palette = np.random.default_rng(0).uniform(-1, 1, (256, 3)).astype(np.float32)
  return palette[np.argmax(onehot_like, axis=-1) % 256]

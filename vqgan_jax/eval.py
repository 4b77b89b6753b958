"""Evaluation of a trained workdir: stage-1 reconstructions or stage-2 samples.

  python -m vqgan_jax.eval --config CONFIG --workdir DIR [--step N]
      [--inception_weights inception_fid.npz | env VQGAN_INCEPTION_WEIGHTS]
      [--inception_sha256 HEX] [--reference_stats stats.npz] [--output_json PATH]
      [--batch_size B] [--num_batches N] [--nolpips] [--num_samples N] [--seed S]
  python -m vqgan_jax.eval --config CONFIG --compute_reference_stats OUT.npz
      --inception_weights inception_fid.npz

`--config` is the config the workdir was trained with; `config.stage` ("vqgan" or
"transformer") picks the evaluation and must match the checkpoint's stage. Config
overrides work as in training (`--config.eval_batch_size=16`).

Stage 1 (`evaluate_stage1`), over the whole val split (or --num_batches batches):
  l1, mse, psnr (per image, then averaged; data range 2 on [-1, 1]), ssim (skimage
  conventions, see metrics.ssim), lpips (VGG LPIPS v0.1), codebook usage (% of codes
  hit by the val indices), code perplexity and entropy (bits) of the val indices, and
  rFID of the reconstructions against the val images (or --reference_stats) when
  Inception weights are given; otherwise the JSON says why under "fid_skipped". The
  results go to DIR/eval/stage1_step{N}.json (and --output_json) with a grid of
  originals over reconstructions in DIR/eval/stage1_step{N}_reconstructions.png.

Stage 2 (`evaluate_stage2`) loads the workdir with `vqgan_jax.handoff.load_stage2`
(its VQGAN as recorded, or --first_stage_workdir) and evaluates, through
`Stage2Adapter`:
  .step                                  int
  .eval_token_batches(batch_size)        iterable of val token batches
  .token_logits(batch)                   -> (logits (B, L, V), targets (B, L), weights
                                            (B, L) or None): bits/token on the val tokens
  .generate_images(rng, num_samples, batch_size)
                                         iterable of (b, H, W, 3) images in [-1, 1], or
                                            of {"image": ..., "mask": (b,)} (padding
                                            rows masked out): FID, IS, KID,
                                            precision/recall
On a stage-2 checkpoint the samples are drawn on every device of the mesh
(`config.mesh`; with several processes each draws its devices' rows): each batch of
--batch_size samples is one global array split over data x fsdp, decoded and fed to
Inception where it lies, and only the Inception features are gathered for FID/IS/KID.
Sample n is keyed by its index, so the samples do not depend on the device count.
--batch_size is checked against the mesh (a multiple of data x fsdp and of the process
count) before anything is restored or compiled.
The metric plumbing is in pure functions (`bits_per_token`, `collect_features`,
`generated_image_metrics`) that the tests exercise with known inputs.

Everything that can fail (workdir without a checkpoint, a stage mismatch, an Inception
weights file of the wrong shape or checksum, a bad reference-statistics file) fails
before anything is written.
"""

import functools
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from vqgan_jax import cli
from vqgan_jax import (checkpointing, conditioning, convert_inception, data, export_tokens,
                       handoff, metrics, sample, sharding, visualize)
from vqgan_jax.models import inception, lpips, vqgan

INCEPTION_ENV = "VQGAN_INCEPTION_WEIGHTS"
FID_SKIPPED_NO_WEIGHTS = ("no Inception weights given (--inception_weights or "
                          "VQGAN_INCEPTION_WEIGHTS); see README")
FID_SKIPPED_NOT_RGB = "the model encodes segmentation maps, not RGB images"
STAGES = ("vqgan", "transformer")


class EvalError(ValueError):
  """An evaluation that cannot run as asked (raised before anything is written)."""


# ------------------------------------------------------------------------ shared pieces


def resolve_inception_weights(path: Optional[str] = None) -> Optional[str]:
  """The weights file to use: the flag, else $VQGAN_INCEPTION_WEIGHTS, else None."""
  return path or os.environ.get(INCEPTION_ENV) or None


def load_inception(path: str, expected_sha256: Optional[str] = None):
  """Validated Inception variables (errors name the file; see convert_inception)."""
  return convert_inception.load_inception_params(path, expected_sha256=expected_sha256 or None)


def make_inception_feature_fn(variables, mesh) -> Callable:
  """jitted images (B, H, W, 3) in [-1, 1] -> {'pool': (B, 2048), 'logits': (B, 1008)}."""
  variables = jax.device_put(variables, sharding.replicated(mesh))
  apply = jax.jit(inception.InceptionV3().apply)
  return lambda images: apply(variables, images)


def _inception_feature_dim() -> int:
  return inception.FEATURE_DIM


def gather(array) -> np.ndarray:
  """A global (batch-sharded) array as one numpy array on every process (a collective
  with several processes: every process calls it in the same order)."""
  if isinstance(array, np.ndarray):
    return array
  return sharding.host_array(array)


def checkpoint_info(workdir: str, step: Optional[int] = None) -> Tuple[int, Dict[str, Any]]:
  """(step, metadata) of a workdir's checkpoint; CheckpointError naming the path if none."""
  if not workdir or not os.path.isdir(workdir):
    raise checkpointing.CheckpointError(f"workdir {workdir!r} does not exist")
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  if not ckpt_dir.exists():
    raise checkpointing.CheckpointError(f"{workdir} holds no checkpoint: {ckpt_dir} does not "
                                        "exist")
  manager = checkpointing.make_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise checkpointing.CheckpointError(f"{workdir} holds no finished checkpoint in {ckpt_dir}")
  if step is None or step < 0:
    step = max(steps)
  elif step not in steps:
    raise checkpointing.CheckpointError(f"{workdir} has no step {step}; it has {sorted(steps)}")
  return int(step), checkpointing.read_metadata(manager, step)


def check_stage(config, workdir: str, step: Optional[int] = None):
  """Refuses a config whose stage differs from the checkpoint's; returns (step, metadata)."""
  stage = config.get("stage")
  if stage not in STAGES:
    raise EvalError(f"config.stage={stage!r}: must be one of {STAGES}")
  step, meta = checkpoint_info(workdir, step)
  if meta.get("stage") != stage:
    raise checkpointing.CheckpointError(
        f"config.stage={stage!r}, but {workdir} step {step} holds a {meta.get('stage')!r} "
        "checkpoint; pass the config the workdir was trained with")
  return step, meta


def _write_json(path: str, values: Dict[str, Any]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(values, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path


def _finite_or_none(value: float):
  return float(value) if math.isfinite(value) else None


def frechet_distance_from_features(x1, x2) -> float:
  """FID between two feature sets (N, D); exact and fast when both N < D.

  With S1 = A^T A and S2 = B^T B (A, B the centred features / sqrt(n - 1)), the non-zero
  eigenvalues of S1 S2 are the squared singular values of A B^T, so
  tr sqrtm(S1 S2) = ||A B^T||_* (nuclear norm): an (n1 x n2) SVD instead of the (D x D)
  matrix square root, which for D = 2048 takes about a minute on a small CPU. Equals
  metrics.frechet_distance of the two sets' (mu, sigma). Larger sets use that directly.
  """
  x1 = np.asarray(x1, np.float64)
  x2 = np.asarray(x2, np.float64)
  if x1.ndim != 2 or x2.ndim != 2 or x1.shape[1] != x2.shape[1]:
    raise ValueError(f"expected (n, d) feature arrays, got {x1.shape} and {x2.shape}")
  n1, n2, d = x1.shape[0], x2.shape[0], x1.shape[1]
  if min(n1, n2) < 2:
    raise ValueError("FID needs at least 2 samples in each set")
  if max(n1, n2) >= d:
    s1 = metrics.FeatureStats().update(x1).stats()
    s2 = metrics.FeatureStats().update(x2).stats()
    return metrics.frechet_distance(*s1, *s2)
  mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
  a = (x1 - mu1) / np.sqrt(n1 - 1)
  b = (x2 - mu2) / np.sqrt(n2 - 1)
  nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * nuclear)


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
      raise EvalError(f"the reference statistics have {real_stats[0].shape[0]}-d features, "
                      f"the Inception features are {mu.shape[0]}-d")
    return metrics.frechet_distance(mu, sigma, *real_stats)
  x_fake, x_real = fake.all_rows(), real.all_rows()
  if x_fake is not None and x_real is not None:
    return frechet_distance_from_features(x_fake, x_real)
  return metrics.frechet_distance(*fake.stats.stats(), *real.stats.stats())


def _load_reference_stats(path: Optional[str]):
  if not path:
    return None
  return metrics.load_stats(path)  # errors name the file


def val_batches(data_config, mesh, batch_size: int, num_batches: int = 0):
  """Global val batches (with 'mask') for this process's share of the split."""
  iterator = data.make_eval_iterator(data_config, batch_size=batch_size // jax.process_count(),
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
  for i, batch in enumerate(iterator):
    if num_batches and i >= num_batches:
      break
    yield sharding.global_batch(batch, mesh)


def _check_batch_size(batch_size: int, mesh, what: str = "--batch_size") -> None:
  """EvalError (naming `what`, both numbers and the nearest valid size) unless the batch
  splits over the mesh's data x fsdp shards and the processes."""
  try:
    sharding.check_batch_size(batch_size, mesh, what=what)
  except ValueError as e:
    raise EvalError(str(e)) from None


def _batch_setting(batch_size: Optional[int]) -> str:
  return "--batch_size" if batch_size else "config.eval_batch_size"


# ------------------------------------------------------------------------ stage 1


def _input_kind(config_dict: Dict[str, Any]) -> str:
  return config_dict.get("data", {}).get("input", "image")


def make_stage1_eval_step(frozen, *, use_ssim: bool, use_lpips: bool) -> Callable:
  """jitted (params, lpips_params, batch) -> (per-example metrics, indices, x, x_rec)."""
  inputs = export_tokens._model_inputs_fn(frozen.config)  # pylint: disable=protected-access
  segmentation = _input_kind(frozen.metadata["config"]) == "segmentation"
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
    raise EvalError(f"evaluate_stage1 needs a stage-1 config, got config.stage={config.stage!r}")
  step, meta = check_stage(config, workdir, step)
  checkpointing.check_same_model(meta["config"]["model"],
                                 checkpointing.config_to_dict(config)["model"], workdir,
                                 force=bool(config.get("force_resume", False)))
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  what = _batch_setting(batch_size)
  batch_size = int(batch_size or config.eval_batch_size)
  _check_batch_size(batch_size, mesh, what)
  rgb = _input_kind(meta["config"]) == "image"
  size = int(config.data.image_size)

  # Everything that can fail on a user-given file, before any work or output.
  weights_path = resolve_inception_weights(inception_weights)
  fid_skipped, feature_dim = None, None
  if not rgb:
    fid_skipped = FID_SKIPPED_NOT_RGB
  elif feature_fn is None and weights_path is None:
    fid_skipped = FID_SKIPPED_NO_WEIGHTS
  elif feature_fn is None:
    feature_fn = make_inception_feature_fn(load_inception(weights_path, inception_sha256), mesh)
    feature_dim = _inception_feature_dim()
  ref_stats = _load_reference_stats(reference_stats)
  if ref_stats is not None and feature_dim is not None and ref_stats[0].shape != (feature_dim,):
    raise EvalError(f"--reference_stats {reference_stats} holds {ref_stats[0].shape[0]}-d "
                    f"features; the Inception pool features are {feature_dim}-d")

  frozen = checkpointing.load_stage1(workdir, step, sharding=sharding.replicated(mesh))
  lpips_params, lpips_skipped = None, None
  if not use_lpips:
    lpips_skipped = "disabled (--nolpips)"
  elif not rgb:
    lpips_skipped = FID_SKIPPED_NOT_RGB
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
  for batch in val_batches(config.data, mesh, batch_size, num_batches):
    per, indices, x, x_rec = eval_step(frozen.params, lpips_params, batch)
    mask = gather(batch["mask"]).astype(bool)
    for k, v in per.items():
      sums[k] = sums.get(k, 0.0) + float(np.sum(gather(v).astype(np.float64)[mask]))
    count += int(mask.sum())
    hist.update(gather(indices)[mask])
    if feature_fn is not None and fid_skipped is None:
      fake_features.update(gather(feature_fn(x_rec)["pool"])[mask])
      if ref_stats is None:
        real_features.update(gather(feature_fn(x)["pool"])[mask])
    if sum(len(a) for a in shown_x) < num_grid_images:
      shown_x.append(gather(x)[mask])
      shown_rec.append(gather(x_rec)[mask])
  if count == 0:
    raise EvalError("the val split is empty: nothing to evaluate")

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
    results["eval_seconds"] = time.time() - start
    results["json"] = os.path.join(out_dir, f"stage1_step{frozen.step}.json")
    _write_json(results["json"], results)
    if output_json:
      _write_json(output_json, results)
  else:
    results["eval_seconds"] = time.time() - start
  return results


def _colorize(onehot_like: np.ndarray) -> np.ndarray:
  """Segmentation maps (B, H, W, K) -> RGB in [-1, 1] with a fixed palette."""
  palette = np.random.default_rng(0).uniform(-1, 1, (256, 3)).astype(np.float32)
  return palette[np.argmax(onehot_like, axis=-1) % 256]


def compute_reference_stats(config, output: str, *, inception_weights: Optional[str] = None,
                            inception_sha256: Optional[str] = None,
                            batch_size: Optional[int] = None, num_batches: int = 0,
                            feature_fn: Optional[Callable] = None, mesh=None) -> Dict[str, Any]:
  """Inception mu/sigma of the val split images of config.data, saved as an .npz."""
  sharding.maybe_initialize_distributed()
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  what = _batch_setting(batch_size)
  batch_size = int(batch_size or config.get("eval_batch_size", 32))
  _check_batch_size(batch_size, mesh, what)
  if feature_fn is None:
    weights_path = resolve_inception_weights(inception_weights)
    if weights_path is None:
      raise EvalError("--compute_reference_stats needs Inception weights "
                      f"(--inception_weights or {INCEPTION_ENV}); see README")
    feature_fn = make_inception_feature_fn(load_inception(weights_path, inception_sha256), mesh)
  stats = metrics.FeatureStats()
  for batch in val_batches(config.data, mesh, batch_size, num_batches):
    mask = gather(batch["mask"]).astype(bool)
    stats.update(gather(feature_fn(batch["image"])["pool"])[mask])
  mu, sigma = stats.stats()
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    metrics.save_stats(output, mu, sigma)
  return {"reference_stats": os.path.abspath(output), "num_images": stats.n,
          "feature_dim": int(mu.shape[0])}


# ------------------------------------------------------------------------ stage 2 plumbing


@functools.lru_cache(maxsize=None)
def _nll_sums_fn():

  @jax.jit
  def nll_sums(logits, targets, weights):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    # Per-token values; the host sums them in float64 (a float32 sum over many tokens
    # drifts by ~1e-6 relative).
    return nll * weights, weights

  return nll_sums


def token_nll_sums(logits, targets, weights=None) -> Tuple[float, float]:
  """(sum of -log p(target) in nats, sum of weights) for logits (..., V), targets (...)."""
  targets = jnp.asarray(targets)
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else jnp.asarray(weights)
  nll, weights = _nll_sums_fn()(jnp.asarray(logits), targets, weights)
  return (float(np.sum(gather(nll), dtype=np.float64)),
          float(np.sum(gather(weights), dtype=np.float64)))


def bits_per_token(logits_fn: Callable, batches: Iterable[Any]) -> Dict[str, float]:
  """Mean negative log-likelihood of the target tokens, in bits (and nats, perplexity).

  `logits_fn(batch) -> (logits (B, L, V), targets (B, L), weights (B, L) or None)`;
  weights (e.g. 0 on padding examples) weight each token's loss.
  """
  total, count = 0.0, 0.0
  for batch in batches:
    logits, targets, weights = logits_fn(batch)
    t, n = token_nll_sums(logits, targets, weights)
    total += t
    count += n
  if count <= 0:
    raise EvalError("bits_per_token: no tokens (all weights zero or no batches)")
  nats = total / count
  return {"bits_per_token": nats / math.log(2.0), "nll_nats_per_token": nats,
          "token_perplexity": math.exp(nats), "num_tokens": int(round(count))}


def collect_features(feature_fn: Callable, image_batches: Iterable[Any],
                     max_images: Optional[int] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Runs `feature_fn` over batches of images -> (pool (N, D), logits (N, C) or None).

  A batch is an image array, or a dict with 'image' and optionally 'mask'.
  """
  pools, logits, n = [], [], 0
  for batch in image_batches:
    if isinstance(batch, dict):
      images, mask = batch["image"], batch.get("mask")
    else:
      images, mask = batch, None
    out = feature_fn(images)
    keep = np.ones(len(gather(out["pool"])), bool) if mask is None else gather(mask).astype(bool)
    pools.append(gather(out["pool"])[keep])
    if out.get("logits") is not None:
      logits.append(gather(out["logits"])[keep])
    n += int(keep.sum())
    if max_images is not None and n >= max_images:
      break
  if not pools:
    raise EvalError("collect_features: no images")
  pool = np.concatenate(pools)
  logit = np.concatenate(logits) if len(logits) == len(pools) else None
  if max_images is not None:
    pool = pool[:max_images]
    logit = logit[:max_images] if logit is not None else None
  return pool, logit


def generated_image_metrics(fake_pool: np.ndarray, fake_logits: Optional[np.ndarray] = None, *,
                            real_pool: Optional[np.ndarray] = None, real_stats=None,
                            is_splits: int = 10, kid_subsets: int = 100,
                            kid_subset_size: int = 1000, pr_k: int = 3,
                            seed: int = 0) -> Dict[str, Any]:
  """FID, IS, KID and precision/recall of generated samples' Inception features.

  FID compares with `real_stats` (mu, sigma) if given, else with `real_pool`; KID and
  precision/recall need `real_pool` (skipped with a reason otherwise); IS needs
  `fake_logits`.
  """
  fake_pool = np.asarray(fake_pool, np.float64)
  out: Dict[str, Any] = {"num_samples": int(fake_pool.shape[0])}
  if real_stats is None and real_pool is None:
    raise EvalError("generated_image_metrics needs real_stats or real_pool")
  if real_stats is not None:
    mu_fake, sigma_fake = metrics.FeatureStats().update(fake_pool).stats()
    out["fid"] = metrics.frechet_distance(mu_fake, sigma_fake, *real_stats)
  else:
    out["fid"] = frechet_distance_from_features(fake_pool, real_pool)
  if fake_logits is not None:
    # Each split needs enough samples for its p(y) to mean something (the usual 10
    # splits are of 5000 samples each); small sets are scored as one split.
    splits = max(1, min(is_splits, fake_pool.shape[0] // 100))
    out["inception_score"], out["inception_score_std"] = metrics.inception_score(
        fake_logits, from_logits=True, splits=splits)
  else:
    out["inception_score_skipped"] = "no Inception logits"
  if real_pool is not None:
    out["kid"], out["kid_std"] = metrics.kid(real_pool, fake_pool, num_subsets=kid_subsets,
                                             subset_size=kid_subset_size, seed=seed)
    if min(len(real_pool), len(fake_pool)) > pr_k:
      out["precision"], out["recall"] = metrics.precision_recall(real_pool, fake_pool, k=pr_k)
    else:
      out["precision_recall_skipped"] = f"needs more than k={pr_k} samples per set"
  else:
    out["kid_skipped"] = "needs real features; reference statistics hold only mu/sigma"
    out["precision_recall_skipped"] = out["kid_skipped"]
  return out


class Stage2Adapter:
  """Gives a `handoff.Stage2Model` the interface `evaluate_stage2` uses.

  Bits/token use the trainer's own sequence construction (condition prefix, the fixed
  pseudo-random eval crop of `crop_tokens` models, keys as in Stage2Runner.evaluate), so
  the number matches the trainer's val_bits_per_token on the same batches. Samples are
  drawn with `sample.token_batches` (the checkpoint's `sampling` options: temperature,
  top-k/p, guidance) for unconditional and class-conditional models (labels cycled over
  the classes), on every device of the mesh, and decoded there; spatial and coordinate
  conditioning sample from the val split's condition maps and from uniformly drawn crop
  origins (see condition_prefix).
  """

  def __init__(self, loaded, mesh):
    self.loaded = loaded
    self.step = int(loaded.step)
    self.mesh = mesh
    self._setup = None
    self._logits_fn = None
    self._calls = 0

  def _prepare(self):
    if self._setup is not None:
      return
    loaded = self.loaded
    setup = handoff.Stage2Sequences(loaded.config, loaded.first_stage, loaded.cond_stage,
                                 num_classes=loaded.layout.num_classes)
    repl = sharding.replicated(self.mesh)
    self._frozen = {"first": jax.device_put(loaded.first_stage.params, repl)}
    if loaded.cond_stage is not None:
      self._frozen["cond"] = jax.device_put(loaded.cond_stage.params, repl)
    self._params = jax.device_put(loaded.params, repl)

    def logits_fn(params, batch, frozen, key):
      tokens = setup.sequence(frozen, batch, key, train=False)
      logits = setup.gpt.apply({"params": params}, tokens[:, :-1], train=False)
      weights = setup.loss_mask[None, :] & batch["mask"].astype(bool)[:, None]
      return logits, tokens[:, 1:], weights.astype(jnp.float32)

    self._setup = setup
    self._logits_fn = jax.jit(logits_fn)
    self._base_key = jax.random.PRNGKey(loaded.config.seed + 1)

  def eval_token_batches(self, batch_size: int):
    """Global val batches with the keys the GPT's sequence needs, and 'mask'."""
    self._prepare()
    keys = self._setup.batch_keys() + ("mask",)
    for batch in val_batches(self.loaded.config.data, self.mesh, batch_size):
      yield {k: batch[k] for k in keys}

  def token_logits(self, batch):
    self._prepare()
    key = jax.random.fold_in(self._base_key, self._calls)
    self._calls += 1
    return self._logits_fn(self._params, batch, self._frozen, key)

  def condition_prefix(self, num_samples: int, seed: int = 0) -> np.ndarray:
    """(num_samples, P) condition tokens to sample from, per conditioning kind:
    unconditional: the start token; class: labels cycled over the classes; spatial: the
    val split's condition maps (cycled), centre window, encoded by the conditioning
    VQGAN; coord: crop origins drawn uniformly over the token grid (seeded)."""
    loaded, layout = self.loaded, self.loaded.layout
    if layout.kind == "none":
      return np.asarray(conditioning.condition_tokens(layout, num_samples))
    if layout.kind == "class":
      labels = (np.arange(num_samples) % layout.num_classes).astype(np.int32)
      return np.asarray(conditioning.condition_tokens(layout, num_samples, labels=labels))
    if layout.kind == "spatial":
      data_config = loaded.config.data
      codes = []
      while sum(len(c) for c in codes) < num_samples:
        before = len(codes)
        for batch in data.make_eval_iterator(data_config, batch_size=16):
          keep = np.asarray(batch["mask"], bool)
          grid = sample.encode_inputs(loaded.cond_stage,
                                      {"segmentation": batch["segmentation"][keep]})
          codes.append(sample.center_crop_tokens(grid, loaded.window)[0])
          if sum(len(c) for c in codes) >= num_samples:
            break
        if len(codes) == before:
          raise EvalError("the val split has no condition maps to sample from")
      cond = np.concatenate(codes)[:num_samples]
      return np.asarray(conditioning.condition_tokens(layout, num_samples, cond_codes=cond))
    grid, window = loaded.token_grid, loaded.window
    spans = (grid[0] - window[0], grid[1] - window[1])
    rng = np.random.default_rng(seed)
    origins = tuple(jnp.asarray(rng.integers(0, s + 1, num_samples)) for s in spans)
    return np.asarray(conditioning.condition_tokens(layout, num_samples, origins=origins,
                                                    spans=spans))

  def generate_images(self, rng, num_samples: int, batch_size: int):
    """Yields {"image": global (batch, H, W, 3) images split over the mesh's batch axes,
    "mask": (batch,) real samples (the last batch is padded)}, for every kind of
    conditioning (see condition_prefix)."""
    loaded = self.loaded
    self._prepare()
    opts = sample.SamplingOptions.from_config(loaded.config.get("sampling", {}),
                                              batch_size=batch_size)
    prefix = self.condition_prefix(num_samples)
    for tokens, real in sample.token_batches(loaded, prefix, rng, opts, self.mesh,
                                             params=self._params):
      images = sample.decode_rows(loaded.first_stage, self._frozen["first"], tokens,
                                  loaded.window)
      yield {"image": images, "mask": np.arange(images.shape[0]) < real}


def evaluate_stage2(config, workdir: str, *, step: Optional[int] = None,
                    num_samples: int = 1000, inception_weights: Optional[str] = None,
                    inception_sha256: Optional[str] = None,
                    reference_stats: Optional[str] = None, output_json: Optional[str] = None,
                    batch_size: Optional[int] = None, seed: int = 0,
                    feature_fn: Optional[Callable] = None, mesh=None,
                    write: bool = True, model=None,
                    first_stage_workdir: Optional[str] = None,
                    cond_stage_workdir: Optional[str] = None) -> Dict[str, Any]:
  """Bits/token on val tokens and sample metrics of a stage-2 workdir (see module doc).

  `model`: an object with Stage2Adapter's interface (step, eval_token_batches,
  token_logits, generate_images) to evaluate instead of the workdir's checkpoint.
  """
  start = time.time()
  sharding.maybe_initialize_distributed()
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  what = _batch_setting(batch_size)
  batch_size = int(batch_size or config.get("eval_batch_size", 16))
  _check_batch_size(batch_size, mesh, what)
  if num_samples < 0:
    raise EvalError(f"--num_samples={num_samples} must be >= 0 (0: no sample metrics)")

  weights_path = resolve_inception_weights(inception_weights)
  if feature_fn is None and weights_path is not None and num_samples > 0:
    feature_fn = make_inception_feature_fn(load_inception(weights_path, inception_sha256), mesh)
  ref_stats = _load_reference_stats(reference_stats)

  if model is None:
    model = Stage2Adapter(handoff.load_stage2(
        workdir, step=step, first_stage_workdir=first_stage_workdir,
        cond_stage_workdir=cond_stage_workdir), mesh)
  step = int(model.step)
  results: Dict[str, Any] = {"stage": "transformer", "step": step,
                             "workdir": os.path.abspath(workdir)}
  results.update(bits_per_token(model.token_logits, model.eval_token_batches(batch_size)))

  samples = []
  if num_samples > 0:
    rng = jax.random.PRNGKey(seed)
    batches = model.generate_images(rng, num_samples, batch_size)
    try:
      batches = _peek(batches)
    except NotImplementedError as e:
      results["samples_skipped"] = f"not supported: {e}"
      batches = None
    if batches is None:
      pass
    elif feature_fn is None:
      results["fid_skipped"] = FID_SKIPPED_NO_WEIGHTS
      for batch in batches:  # still draw a few for the sample grid
        samples.append(_real_images(batch))
        break
    else:
      def keep_first(batches):
        for batch in batches:
          if sum(len(s) for s in samples) < 16:
            samples.append(_real_images(batch))
          yield batch
      fake_pool, fake_logits = collect_features(feature_fn, keep_first(batches), num_samples)
      real_pool = None
      if "data" in config and config.data.get("name"):
        real_pool, _ = collect_features(
            feature_fn, (b for b in val_batches(config.data, mesh, batch_size)))
      if ref_stats is None and real_pool is None:
        raise EvalError("FID needs --reference_stats or a config.data val split")
      results.update(generated_image_metrics(fake_pool, fake_logits, real_pool=real_pool,
                                             real_stats=ref_stats, seed=seed))
      results["fid_reference"] = (os.path.abspath(reference_stats) if ref_stats is not None
                                  else "val images")
  elif num_samples > 0:
    results["samples_skipped"] = "the stage-2 model has no generate_images"

  if write and jax.process_index() == 0:
    out_dir = os.path.join(workdir, "eval")
    if samples:
      grid = visualize.square_grid(np.concatenate(samples)[:64])
      results["sample_grid"] = visualize.save_png(
          os.path.join(out_dir, f"stage2_step{step}_samples.png"), grid)
    results["eval_seconds"] = time.time() - start
    results["json"] = os.path.join(out_dir, f"stage2_step{step}.json")
    _write_json(results["json"], results)
    if output_json:
      _write_json(output_json, results)
  else:
    results["eval_seconds"] = time.time() - start
  return results


def _real_images(batch) -> np.ndarray:
  """The images of a generated batch (array or {"image", "mask"}) as numpy on every
  process, padding rows dropped (a collective with several processes)."""
  if not isinstance(batch, dict):
    return gather(batch)
  images = gather(batch["image"])
  return images if batch.get("mask") is None else images[gather(batch["mask"]).astype(bool)]


def _peek(iterable):
  """Starts a generator (so errors raised before its first item surface here)."""
  iterator = iter(iterable)
  try:
    first = next(iterator)
  except StopIteration:
    return iter(())
  return itertools.chain([first], iterator)


def evaluate(config, workdir: str, **kwargs) -> Dict[str, Any]:
  """Checks config vs checkpoint stage, then runs the stage's evaluation."""
  sharding.maybe_initialize_distributed()  # before anything touches the JAX backend
  check_stage(config, workdir, kwargs.get("step"))
  if config.stage == "vqgan":
    kwargs.pop("num_samples", None)
    kwargs.pop("seed", None)
    return evaluate_stage1(config, workdir, **kwargs)
  kwargs.pop("num_batches", None)
  kwargs.pop("use_lpips", None)
  return evaluate_stage2(config, workdir, **kwargs)


# ------------------------------------------------------------------------ CLI


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "The config the workdir was trained with.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The run to evaluate.")
  flags.DEFINE_integer("step", -1, "Checkpoint step (-1: newest).")
  flags.DEFINE_integer("num_samples", 1000, "Stage 2: samples for FID/IS/KID/PR.")
  flags.DEFINE_string("inception_weights", None,
                      f"Converted FID Inception weights (.npz); default ${INCEPTION_ENV}.")
  flags.DEFINE_string("inception_sha256", None, "Expected SHA-256 of the weights file.")
  flags.DEFINE_string("reference_stats", None, "Precomputed mu/sigma (.npz) for FID.")
  flags.DEFINE_string("compute_reference_stats", None,
                      "Write the val split's Inception mu/sigma to this .npz and exit.")
  flags.DEFINE_string("output_json", None, "Also write the results here.")
  flags.DEFINE_integer("batch_size", 0, "Global eval batch size (0: config.eval_batch_size).")
  flags.DEFINE_integer("num_batches", 0, "Stage 1: evaluate only this many batches (0: all).")
  flags.DEFINE_bool("lpips", True, "Stage 1: compute LPIPS.")
  flags.DEFINE_integer("seed", 0, "Stage 2: sampling seed.")
  flags.DEFINE_string("first_stage_workdir", None, "Stage 2: the VQGAN's workdir when it is "
                      "neither where training recorded it nor beside the run (moved runs).")
  flags.DEFINE_string("cond_stage_workdir", None, "Stage 2, spatial: the conditioning "
                      "VQGAN's workdir, likewise.")
  flags.mark_flag_as_required("config")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.compute_reference_stats:
    out = compute_reference_stats(f.config, f.compute_reference_stats,
                                  inception_weights=f.inception_weights,
                                  inception_sha256=f.inception_sha256,
                                  batch_size=f.batch_size or None, num_batches=f.num_batches)
    print(json.dumps(out, indent=2))
    return
  if not f.workdir:
    raise EvalError("--workdir is required (except with --compute_reference_stats)")
  results = evaluate(
      f.config, f.workdir, step=None if f.step < 0 else f.step, num_samples=f.num_samples,
      inception_weights=f.inception_weights, inception_sha256=f.inception_sha256,
      reference_stats=f.reference_stats, output_json=f.output_json,
      batch_size=f.batch_size or None, num_batches=f.num_batches, use_lpips=f.lpips,
      seed=f.seed, **({"first_stage_workdir": f.first_stage_workdir,
                       "cond_stage_workdir": f.cond_stage_workdir}
                      if f.config.get("stage") == "transformer" else {}))
  print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

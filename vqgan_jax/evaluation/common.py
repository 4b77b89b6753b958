"""What both evaluators share: Inception features, checkpoint and stage checks, val
batches, FID/IS/KID plumbing, reference statistics and the results JSON.

The metric maths (Fréchet distance of (mu, sigma), IS, KID, precision/recall, streaming
feature statistics) is `vqgan_jax.metrics`; this module feeds it. The stage-independent
pieces that the tests exercise with known inputs are pure functions:
`frechet_distance_from_features`, `collect_features`, `generated_image_metrics`.
`compute_reference_stats` (the CLI's --compute_reference_stats) needs no checkpoint.
"""

import json
import os
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import numpy as np

from vqgan_jax import checkpointing, convert_inception, data, metrics, sharding
from vqgan_jax.models import inception

INCEPTION_ENV = "VQGAN_INCEPTION_WEIGHTS"
FID_SKIPPED_NO_WEIGHTS = ("no Inception weights given (--inception_weights or "
                          "VQGAN_INCEPTION_WEIGHTS); see README")
FID_SKIPPED_NOT_RGB = "the model encodes segmentation maps, not RGB images"
STAGES = ("vqgan", "transformer")


class EvalError(ValueError):
  """An evaluation that cannot run as asked (raised before anything is written)."""


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


def inception_feature_dim() -> int:
  """Width of the Inception pool features (checked against --reference_stats)."""
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


def write_json(path: str, values: Dict[str, Any]) -> str:
  """Writes `values` as sorted, indented JSON atomically (temporary file, rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(values, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path


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


def load_reference_stats(path: Optional[str]):
  """(mu, sigma) from a reference-statistics .npz, or None without a path."""
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


def check_batch_size(batch_size: int, mesh, what: str = "--batch_size") -> None:
  """EvalError (naming `what`, both numbers and the nearest valid size) unless the batch
  splits over the mesh's data x fsdp shards and the processes."""
  try:
    sharding.check_batch_size(batch_size, mesh, what=what)
  except ValueError as e:
    raise EvalError(str(e)) from None


def batch_setting(batch_size: Optional[int]) -> str:
  """The setting a batch size came from, for error messages."""
  return "--batch_size" if batch_size else "config.eval_batch_size"


def compute_reference_stats(config, output: str, *, inception_weights: Optional[str] = None,
                            inception_sha256: Optional[str] = None,
                            batch_size: Optional[int] = None, num_batches: int = 0,
                            feature_fn: Optional[Callable] = None, mesh=None) -> Dict[str, Any]:
  """Inception mu/sigma of the val split images of config.data, saved as an .npz."""
  sharding.maybe_initialize_distributed()
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  what = batch_setting(batch_size)
  batch_size = int(batch_size or config.get("eval_batch_size", 32))
  check_batch_size(batch_size, mesh, what)
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


def finish_results(results: Dict[str, Any], start: float, json_path: Optional[str],
                   output_json: Optional[str] = None) -> Dict[str, Any]:
  """Adds eval_seconds and, with `json_path` (process 0 writing), writes the results there
  (and to `output_json`); returns them."""
  results["eval_seconds"] = time.time() - start
  if json_path:
    results["json"] = json_path
    write_json(json_path, results)
    if output_json:
      write_json(output_json, results)
  return results

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

Stage 1, over the whole val split (or --num_batches batches):
  l1, mse, psnr (per image, then averaged; data range 2 on [-1, 1]), ssim (skimage
  conventions, see metrics.ssim), lpips (VGG LPIPS v0.1), codebook usage (% of codes
  hit by the val indices), code perplexity and entropy (bits) of the val indices, and
  rFID of the reconstructions against the val images (or --reference_stats) when
  Inception weights are given; otherwise the JSON says why under "fid_skipped". The
  results go to DIR/eval/stage1_step{N}.json (and --output_json) with a grid of
  originals over reconstructions in DIR/eval/stage1_step{N}_reconstructions.png.

Stage 2 loads the workdir's GPT with its VQGAN as recorded in training (or
--first_stage_workdir; --cond_stage_workdir for the conditioning VQGAN of spatial
models) and reports bits/token on the val tokens and, from --num_samples samples (0:
none; drawn with --seed), FID, Inception Score, KID and precision/recall against the
val images (or --reference_stats) when Inception weights are given ("fid_skipped"
otherwise). The results go to DIR/eval/stage2_step{N}.json (and --output_json) with a
sample grid in DIR/eval/stage2_step{N}_samples.png.
The samples are drawn on every device of the mesh (`config.mesh`, every process);
sample n is keyed by its index, so the samples do not depend on the device count.
--batch_size is global and is checked against the mesh (a multiple of data x fsdp and
of the process count) before anything is restored or compiled.

Everything that can fail (workdir without a checkpoint, a stage mismatch, an Inception
weights file of the wrong shape or checksum, a bad reference-statistics file) fails
before anything is written.
"""

import json
from typing import Any, Dict

from absl import flags
from ml_collections import config_flags

from vqgan_jax import cli, sharding
# The evaluator API, re-exported so that `vqgan_jax.eval.evaluate_stage1` etc. keep
# working; library code imports vqgan_jax.evaluation. The shared pieces that tests
# replace (make_inception_feature_fn, ...) are left out on purpose: patching a copy here
# would change nothing, patch them in vqgan_jax.evaluation.common.
from vqgan_jax.evaluation import (  # pylint: disable=unused-import
    INCEPTION_ENV, EvalError, Stage2Adapter, bits_per_token, check_stage,
    collect_features, compute_reference_stats, evaluate_stage1, evaluate_stage2,
    frechet_distance_from_features, gather, generated_image_metrics, token_nll_sums,
    val_batches)


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

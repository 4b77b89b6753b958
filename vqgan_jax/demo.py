"""`make demo`: both stages end to end on the bundled photos, on a 2-core CPU.

  python -m vqgan_jax.demo --workdir runs/demo

1. stage 1: the demo VQGAN on 32x32 crops (configs/vqgan_demo.py)        -> vqgan/
2. a conditioning VQGAN on the crops' segmentation maps (vqgan_demo_seg)  -> vqgan_seg/
3. stage 2: class-conditional, unconditional and segmentation-conditioned
   GPTs over the demo VQGAN's 8x8 token grids                             -> gpt_class/, gpt_uncond/, gpt_seg/
4. samples: a grid per class, segmentation-conditioned samples, and
   sliding-window images of 2x the trained grid per side (4x the area)    -> samples/
5. the measured figures                                                   -> summary.json

Every step resumes: rerunning the command after an interruption continues where it
stopped, and a finished step is only re-evaluated.
"""

import json
import os
import time

from absl import flags, logging

from configs import (transformer_demo, transformer_demo_seg,
                     transformer_demo_uncond, vqgan_demo, vqgan_demo_seg)
from vqgan_jax import checkpointing, cli, sample
from vqgan_jax.training import stage1 as stage1_trainer
from vqgan_jax.training import stage2 as stage2_trainer

FLAGS = flags.FLAGS


def _define_flags():
  # Defined when run as a command only, so that importing this module (tests) does not
  # claim --workdir, which other modules' flags use too.
  flags.DEFINE_string("workdir", "runs/demo", "Where all demo runs and images go.")


def _previous_summary(workdir: str) -> dict:
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def train_part(name, config, train_fn, workdir, summary, previous):
  """Trains one part; a part that was already finished keeps its measured seconds."""
  run_dir = os.path.join(workdir, name)
  finished = checkpointing.latest_step(run_dir) == config.num_train_steps
  start = time.time()
  metrics = train_fn(config, run_dir)
  seconds = round(time.time() - start, 1)
  if finished and "seconds" in previous.get(name, {}):
    seconds = previous[name]["seconds"]
  summary[name] = dict(metrics, seconds=seconds)


def run_demo(workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  previous = _previous_summary(workdir)
  summary = {}
  begin = time.time()
  for name, module in (("vqgan", vqgan_demo), ("vqgan_seg", vqgan_demo_seg)):
    train_part(name, module.get_config(), stage1_trainer.train_and_evaluate, workdir, summary,
           previous)
  vq_dir, seg_dir = os.path.join(workdir, "vqgan"), os.path.join(workdir, "vqgan_seg")
  for name, module in (("gpt_class", transformer_demo), ("gpt_uncond", transformer_demo_uncond),
                       ("gpt_seg", transformer_demo_seg)):
    config = module.get_config()
    config.first_stage.workdir = vq_dir
    if config.cond.kind == "spatial":
      config.cond.cond_stage_workdir = seg_dir
    train_part(name, config, stage2_trainer.train_and_evaluate, workdir, summary, previous)
  start = time.time()
  written = {}
  for name in ("gpt_class", "gpt_uncond", "gpt_seg"):
    out = os.path.join(workdir, "samples", name.replace("gpt_", ""))
    written.update({f"{name}/{k}": v for k, v in
                    sample.run_sampling(os.path.join(workdir, name), out).items()})
  summary["samples"] = {"files": written, "seconds": round(time.time() - start, 1)}
  # total_seconds: training (as first measured, for parts finished by an earlier run) plus
  # this run's sampling; this_run_seconds: what this invocation took.
  summary["total_seconds"] = round(sum(
      summary[k]["seconds"] for k in ("vqgan", "vqgan_seg", "gpt_class", "gpt_uncond",
                                      "gpt_seg", "samples")), 1)
  summary["this_run_seconds"] = round(time.time() - begin, 1)
  path = os.path.join(workdir, "summary.json")
  with open(path, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  return summary


def _report(summary: dict, workdir: str) -> str:
  vq, cls, unc, seg = (summary.get(k, {}) for k in ("vqgan", "gpt_class", "gpt_uncond", "gpt_seg"))
  lines = [
      "",
      "vqgan_jax demo: %.0f s of training and sampling (this run %.0f s). Results under %s:" % (
          summary["total_seconds"], summary["this_run_seconds"], workdir),
      "  stage 1 (val): PSNR %.2f dB, L1 %.4f, LPIPS %.4f, codebook usage %.1f%%" % (
          vq.get("val_psnr", float("nan")), vq.get("val_l1", float("nan")),
          vq.get("val_lpips", float("nan")), vq.get("val_codebook_usage", float("nan"))),
      "  stage 2 (val bits/token): class-conditional %.3f, unconditional %.3f, "
      "segmentation-conditioned %.3f; unigram entropy %.3f" % (
          cls.get("val_bits_per_token", float("nan")), unc.get("val_bits_per_token", float("nan")),
          seg.get("val_bits_per_token", float("nan")),
          cls.get("unigram_entropy_bits", float("nan"))),
      "  reconstructions: %s" % os.path.join(workdir, "vqgan", "images"),
  ]
  for name, path in sorted(summary["samples"]["files"].items()):
    lines.append(f"  {name}: {path}")
  lines.append("  figures: %s" % os.path.join(workdir, "summary.json"))
  lines.append("  curves:  tensorboard --logdir %s" % workdir)
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  summary = run_demo(FLAGS.workdir)
  print(_report(summary, FLAGS.workdir), flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

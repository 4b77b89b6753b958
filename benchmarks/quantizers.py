r"""The quantizer bake-off: every stage-1 quantizer at an equal ~10-bit budget, then stage 2.

  python benchmarks/quantizers.py --out runs/quantizers [--steps 600] [--gpt_steps 300] \
      [--seeds 0,1,2] [--quantizers vq,vq_ema,fsq,lfq,simvq] [--export_crops 128]

For each quantizer and seed, on the bundled photos:
  1. stage 1: configs/vqgan_demo.py (32x32 crops, f = 4, 8x8 token grids) with the
     quantizer swapped, `--steps` steps (the GAN starts at 2/3 of them, as the demo's
     400 of 600), evaluated on the whole val split;        -> OUT/<quantizer>_s<seed>/vqgan
  2. token export of both splits (train: base crops + `--export_crops` random crops per
     photo + flipped copies, as docs/data.md recommends) -> OUT/<quantizer>_s<seed>/tokens
  3. stage 2: configs/transformer_demo.py (class-conditional GPT) on those tokens,
     `--gpt_steps` steps, val bits per token               -> OUT/<quantizer>_s<seed>/gpt
and writes OUT/results.json (every run, and per quantizer the mean and spread over seeds)
and OUT/results.md (the table).

Budgets (all ~10 bits a token):
  vq      1024 codes     (the demo's lookup: 8-dim, l2-normalised)
  vq_ema  1024 codes     (same lookup, EMA codebook)
  simvq   1024 codes     (same lookup, frozen basis @ learned W)
  fsq     [8, 5, 5, 5] = 1000 codes (log2 = 9.97 bits)
  lfq     10 bits = 1024 codes
With `--plain_lookup` vq, vq_ema and simvq look codes up in embed_dim (64) without
normalisation instead.

Columns: val PSNR / L1 / LPIPS of the reconstructions, codebook usage (% of codes used on
the val split) and perplexity (exp of the code-frequency entropy), stage-2 val bits per
token, and the time of one training step of each stage (stage 1 before and after the GAN
starts): the median over the steps after the first 10 (and after the GAN's first) of
the wall time of each step call, waited for; data loading is not in it. Waiting for each
step keeps the host from running ahead, so a whole run is slightly slower than without
this script.

A finished run (OUT/<run>/result.json) is not trained again: rerun the same command to
resume after an interruption, or delete that file to redo a run.
"""

import json
import math
import os
import statistics
import sys
import time
from typing import Optional

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vqgan_jax  # pylint: disable=unused-import,g-import-not-at-top  (sets XLA:CPU flags first)
import jax  # pylint: disable=g-import-not-at-top
from configs import transformer_demo, vqgan_demo  # pylint: disable=g-import-not-at-top
from vqgan_jax import export_tokens  # pylint: disable=g-import-not-at-top
from vqgan_jax.models import quantizer as quantizers  # pylint: disable=g-import-not-at-top
from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
from vqgan_jax.training import stage2 as stage2_trainer  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 600, "Stage-1 training steps per run (the demo's 600).")
flags.DEFINE_integer("gpt_steps", 300, "Stage-2 training steps per run (the demo's 300).")
flags.DEFINE_list("seeds", ["0"], "Seeds; each quantizer trains once per seed (both stages).")
flags.DEFINE_list("quantizers", list(quantizers.QUANTIZERS), "Quantizers to compare.")
flags.DEFINE_string("out", "runs/quantizers", "Output folder (runs, results.json, results.md).")
flags.DEFINE_integer("export_crops", 128, "Random crops per photo in the train-token export.")
flags.DEFINE_bool("plain_lookup", False, "vq, vq_ema, simvq: look up in embed_dim, no l2.")

# The ~10-bit budget: model keys per quantizer (on top of configs/vqgan_demo.py).
BUDGET = {
    "vq": {"n_embed": 1024},
    "vq_ema": {"n_embed": 1024},
    "simvq": {"n_embed": 1024},
    "fsq": {"n_embed": 1000, "fsq_levels": (8, 5, 5, 5), "codebook_dim": 0,
            "l2_normalize": False},
    "lfq": {"n_embed": 1024, "lfq_bits": 10, "codebook_dim": 0, "l2_normalize": False},
}
SKIP_STEPS = 10  # first steps left out of the step times (compilation, warm-up)
COLUMNS = (  # (result key, header, format)
    ("codes", "codes", "{:.0f}"),
    ("val_psnr", "val PSNR (dB)", "{:.2f}"),
    ("val_l1", "val L1", "{:.4f}"),
    ("val_lpips", "val LPIPS", "{:.4f}"),
    ("val_codebook_usage", "usage (%)", "{:.1f}"),
    ("val_code_perplexity", "perplexity", "{:.1f}"),
    ("val_bits_per_token", "GPT val bits/token", "{:.3f}"),
    ("stage1_step_ms", "stage-1 step (ms)", "{:.0f}"),
    ("stage1_gan_step_ms", "stage-1 GAN step (ms)", "{:.0f}"),
    ("stage2_step_ms", "stage-2 step (ms)", "{:.0f}"),
)


def stage1_config(kind: str, seed: int, steps: int, plain_lookup: bool = False):
  config = vqgan_demo.get_config()
  m = config.model
  m.quantizer = kind
  for key, value in BUDGET[kind].items():
    m[key] = value
  m.restart_dead_codes = kind == "vq"  # the demo's restarts exist for vq's codebook only
  if plain_lookup and kind in ("vq", "vq_ema", "simvq"):
    m.codebook_dim, m.l2_normalize = 0, False
  config.seed = seed
  config.num_train_steps = steps
  config.loss.disc_start = round(steps * 400 / 600)  # the demo's 400 of 600
  config.log_every_steps = max(1, min(config.log_every_steps, steps))
  config.eval_every_steps = config.checkpoint_every_steps = max(1, steps)
  return config


def stage2_config(vq_dir: str, tokens_dir: str, seed: int, steps: int):
  config = transformer_demo.get_config()
  config.first_stage.workdir = vq_dir
  config.tokens_dir = tokens_dir
  config.seed = seed
  config.num_train_steps = steps
  config.warmup_steps = min(config.warmup_steps, max(0, steps // 10))
  config.log_every_steps = max(1, min(config.log_every_steps, steps))
  config.eval_every_steps = config.checkpoint_every_steps = max(1, steps)
  return config


class StepTimer:
  """Times each call of a trainer's Runner.train_step (patched on the class while the
  `with` block runs), waiting for its result: the step's own compute, without data
  loading. `ms(start, stop)`: the median over the calls [start, stop), so that the one
  call that compiles (the first, and the first with the GAN) does not count."""

  def __init__(self, runner_class):
    self._cls, self.durations = runner_class, []

  def __enter__(self):
    original = self._original = self._cls.train_step
    durations = self.durations

    def timed(runner, *args, **kwargs):
      begin = time.perf_counter()
      out = jax.block_until_ready(original(runner, *args, **kwargs))
      durations.append(time.perf_counter() - begin)
      return out

    self._cls.train_step = timed
    return self

  def __exit__(self, *exc):
    self._cls.train_step = self._original
    return False

  def ms(self, start: int = SKIP_STEPS, stop: Optional[int] = None) -> float:
    kept = self.durations[start:stop]
    return 1000.0 * statistics.median(kept) if kept else float("nan")


def run_one(kind: str, seed: int, out: str) -> dict:
  run_dir = os.path.join(out, f"{kind}_s{seed}")
  result_path = os.path.join(run_dir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  vq_dir, tokens_dir, gpt_dir = (os.path.join(run_dir, n) for n in ("vqgan", "tokens", "gpt"))
  begin = time.time()
  config = stage1_config(kind, seed, FLAGS.steps, FLAGS.plain_lookup)
  with StepTimer(stage1_trainer.Stage1Runner) as timer1:
    vq_metrics = stage1_trainer.train_and_evaluate(config, vq_dir)
  stage1_seconds = time.time() - begin

  gpt_config = stage2_config(vq_dir, tokens_dir, seed, FLAGS.gpt_steps)
  start = time.time()
  export_tokens.export_tokens(gpt_config, vq_dir, tokens_dir, split="train", overwrite=True,
                              flip_copies=True, num_crops=FLAGS.export_crops, seed=seed)
  export_tokens.export_tokens(gpt_config, vq_dir, tokens_dir, split="validation",
                              overwrite=True)
  export_seconds = time.time() - start
  start = time.time()
  with StepTimer(stage2_trainer.Stage2Runner) as timer2:
    gpt_metrics = stage2_trainer.train_and_evaluate(gpt_config, gpt_dir)
  result = {
      "quantizer": kind, "seed": seed, "codes": int(config.model.n_embed),
      "stage1_steps": FLAGS.steps, "stage2_steps": FLAGS.gpt_steps,
      **{k: float(v) for k, v in vq_metrics.items()},
      "val_bits_per_token": float(gpt_metrics.get("val_bits_per_token", float("nan"))),
      "unigram_entropy_bits": float(gpt_metrics.get("unigram_entropy_bits", float("nan"))),
      # stage 1: steps before the GAN starts, and with it
      "stage1_step_ms": timer1.ms(SKIP_STEPS, config.loss.disc_start),
      "stage1_gan_step_ms": timer1.ms(max(SKIP_STEPS, config.loss.disc_start)),
      "stage2_step_ms": timer2.ms(),
      "seconds": {"stage1": round(stage1_seconds, 1), "export": round(export_seconds, 1),
                  "stage2": round(time.time() - start, 1),
                  "total": round(time.time() - begin, 1)},
  }
  result = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in result.items()}  # NaN (e.g. no step after the GAN) -> null
  with open(result_path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  return result


def summarise(runs) -> dict:
  """Per quantizer: mean and (with several seeds) sample standard deviation of each column."""
  summary = {}
  for kind in dict.fromkeys(r["quantizer"] for r in runs):
    mine = [r for r in runs if r["quantizer"] == kind]
    entry = {"seeds": [r["seed"] for r in mine]}
    for key, _, _ in COLUMNS:
      values = [r[key] for r in mine
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
      if values:
        entry[key] = statistics.fmean(values)
        if len(values) > 1:
          entry[key + "_std"] = statistics.stdev(values)
    summary[kind] = entry
  return summary


def markdown(summary: dict) -> str:
  lines = ["| quantizer | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 1) + "|"]
  for kind, entry in summary.items():
    cells = []
    for key, _, fmt in COLUMNS:
      if key not in entry:
        cells.append("-")
        continue
      cell = fmt.format(entry[key])
      if key + "_std" in entry:
        cell += " ± " + fmt.format(entry[key + "_std"])
      cells.append(cell)
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [q for q in FLAGS.quantizers if q not in quantizers.QUANTIZERS]
  if unknown:
    raise app.UsageError(f"--quantizers: unknown {unknown}; choose from {quantizers.QUANTIZERS}")
  logging.set_verbosity(logging.WARNING)
  os.makedirs(FLAGS.out, exist_ok=True)
  begin = time.time()
  runs = []
  for seed in (int(s) for s in FLAGS.seeds):
    for kind in FLAGS.quantizers:
      runs.append(run_one(kind, seed, FLAGS.out))
      print(f"{kind} seed {seed}: " + ", ".join(
          f"{h} {fmt.format(runs[-1][k])}" for k, h, fmt in COLUMNS
          if runs[-1].get(k) is not None),
            flush=True)
  summary = summarise(runs)
  table = markdown(summary)
  settings = {"steps": FLAGS.steps, "gpt_steps": FLAGS.gpt_steps, "seeds": FLAGS.seeds,
              "quantizers": FLAGS.quantizers, "export_crops": FLAGS.export_crops,
              "plain_lookup": FLAGS.plain_lookup}
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump({"settings": settings, "summary": summary, "runs": runs,
               "seconds": round(time.time() - begin, 1)}, f, indent=2, sort_keys=True)
  header = (f"Quantizer bake-off on the bundled photos: {FLAGS.steps} stage-1 steps, "
            f"{FLAGS.gpt_steps} stage-2 steps, seeds {','.join(FLAGS.seeds)} "
            f"(mean ± std over seeds).\n\n")
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write(header + table + "\n")
  print("\n" + table)
  print(f"\nwritten: {os.path.join(FLAGS.out, 'results.json')}, "
        f"{os.path.join(FLAGS.out, 'results.md')}")


if __name__ == "__main__":
  app.run(main)

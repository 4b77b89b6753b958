r"""Ablations of the demo VQGAN's recipe: one change at a time, same seed, same steps.

  python benchmarks/demo_ablation.py --out runs/ablation [--variants demo,groups32,...] \
      [--steps 600] [--seed 0]

Each variant is configs/vqgan_demo.py with the config changes listed in VARIANTS, trained
for `--steps` steps into OUT/<variant>/ and evaluated on the whole val split. OUT/results.md
is the table: val PSNR, L1, LPIPS, codebook usage and the border ratio (mean L1 on the
2-pixel ring of each crop over the mean inside it, `vqgan_jax.metrics.border_ratio`: ~1
without a fringe), and the training seconds. A finished variant (OUT/<variant>/result.json)
is not trained again.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vqgan_jax  # pylint: disable=unused-import,g-import-not-at-top  (sets XLA:CPU flags first)
from configs import vqgan_demo  # pylint: disable=g-import-not-at-top
from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top

# name -> {config key path: value}, each on top of configs/vqgan_demo.py.
VARIANTS = {
    "demo": {},
    # The reference's LPIPS (no padding), then each other change on top of it.
    "lpips_pad0": {"loss.perceptual_pad": 0},
    "lpips_pad4": {"loss.perceptual_pad": 4},
    "no_lpips": {"loss.perceptual_weight": 0.0},
    # The reference GroupNorm (32 groups): at ch = 32 each group is one channel, so every
    # feature map is normalised per image on its own (an instance norm).
    "groups32_pad0": {"model.norm_groups": 32, "loss.perceptual_pad": 0},
    "no_restarts": {"model.restart_dead_codes": False},
    "plain_lookup": {"model.codebook_dim": 0, "model.l2_normalize": False},
    # The GAN for the last 200 steps, the discriminator trained on the updated generator's
    # reconstructions (the reference's order, the default) or on the step's first ones.
    "gan_at_400_pad0": {"loss.disc_start": 400, "loss.perceptual_pad": 0},
    "gan_at_400_stale_pad0": {"loss.disc_start": 400, "loss.perceptual_pad": 0,
                              "loss.disc_on_stale_reconstructions": True},
    "lr_1e-4": {"learning_rate": 1e-4},
}
COLUMNS = (("val_psnr", "val PSNR (dB)", "{:.2f}"), ("val_l1", "val L1", "{:.4f}"),
           ("val_lpips", "val LPIPS", "{:.4f}"), ("val_codebook_usage", "usage (%)", "{:.1f}"),
           ("val_border_ratio", "border ratio", "{:.2f}"), ("seconds", "seconds", "{:.0f}"))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/ablation", "Output folder.")
flags.DEFINE_list("variants", list(VARIANTS), "Variants to train (names of VARIANTS).")
flags.DEFINE_integer("steps", 600, "Training steps per variant (the demo's 600).")
flags.DEFINE_integer("seed", 0, "config.seed of every variant.")


def variant_config(name: str, steps: int, seed: int):
  config = vqgan_demo.get_config()
  for path, value in VARIANTS[name].items():
    *parents, leaf = path.split(".")
    target = config
    for p in parents:
      target = target[p]
    target[leaf] = value
  config.seed = seed
  config.num_train_steps = steps
  config.eval_every_steps = config.checkpoint_every_steps = steps
  return config


def run_variant(name: str) -> dict:
  run_dir = os.path.join(FLAGS.out, name)
  result_path = os.path.join(run_dir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  begin = time.time()
  metrics = stage1_trainer.train_and_evaluate(variant_config(name, FLAGS.steps, FLAGS.seed),
                                              run_dir)
  result = {"variant": name, "changes": {k: str(v) for k, v in VARIANTS[name].items()},
            "steps": FLAGS.steps, "seed": FLAGS.seed, "seconds": round(time.time() - begin, 1),
            **{k: float(v) for k, v in metrics.items()}}
  with open(result_path, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  return result


def markdown(results) -> str:
  lines = ["| variant | change | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
           "|---" * (len(COLUMNS) + 2) + "|"]
  for r in results:
    change = ", ".join(f"`{k}={v}`" for k, v in r["changes"].items()) or "(configs/vqgan_demo.py)"
    cells = [fmt.format(r[k]) if k in r else "-" for k, _, fmt in COLUMNS]
    lines.append(f"| {r['variant']} | {change} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [v for v in FLAGS.variants if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
  logging.set_verbosity(logging.WARNING)
  os.makedirs(FLAGS.out, exist_ok=True)
  results = [run_variant(name) for name in FLAGS.variants]
  table = markdown(results)
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)

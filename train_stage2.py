"""Stage 2: train the GPT over a frozen VQGAN's tokens.

  python train_stage2.py --config configs/transformer_demo.py --workdir runs/demo/gpt_class \
      [--config.first_stage.workdir=runs/demo/vqgan --config.num_train_steps=100 ...]
"""

from absl import flags
from ml_collections import config_flags

from vqgan_jax import cli
from vqgan_jax.training import stage2 as stage2_trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Stage-2 config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard logs go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  stage2_trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)

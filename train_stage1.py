"""Stage 1: train a VQGAN.

  python train_stage1.py --config configs/vqgan_demo.py --workdir runs/demo/vqgan \
      [--config.num_train_steps=100 --config.batch_size=8 ...]
"""

from absl import flags
from ml_collections import config_flags

from vqgan_jax import cli
from vqgan_jax.training import stage1 as stage1_trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Stage-1 config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and images go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  stage1_trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main)

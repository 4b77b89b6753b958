"""A tiny class-conditional GPT for tests and smoke runs (pair it with configs/vqgan_tiny.py).

  python train_stage1.py --config configs/vqgan_tiny.py --workdir /tmp/tiny_vq
  python train_stage2.py --config configs/transformer_tiny.py --workdir /tmp/tiny_gpt \
      --config.first_stage.workdir=/tmp/tiny_vq
"""

from configs import transformer_default


def get_config():
  c = transformer_default.get_config()
  c.model.n_layer, c.model.n_head, c.model.n_embd = 1, 2, 32
  c.cond.kind = "class"
  c.cond.cfg_dropout = 0.1
  c.data.image_size = 16
  c.data.photos.photo_short_side = 128
  c.data.photos.train_examples_per_epoch = 64
  c.batch_size, c.learning_rate, c.pkeep = 4, 1e-3, 0.9
  c.num_train_steps = 3
  c.log_every_steps = 1
  c.eval_every_steps = c.checkpoint_every_steps = 3
  c.num_eval_batches, c.eval_batch_size = 1, 4
  c.unigram_batches = 1
  c.eval_samples = 0                 # no sampler compile in every test run
  c.sampling.num_samples = 2
  c.sampling.num_samples_per_class = 1
  return c

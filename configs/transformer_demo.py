"""Demo class-conditional stage-2 GPT on the bundled photos (7 classes, one per photo).

Needs the demo VQGAN (configs/vqgan_demo.py: 32x32 crops -> 8x8 grids of 128 codes):

  python train_stage1.py --config configs/vqgan_demo.py --workdir runs/demo/vqgan
  python train_stage2.py --config configs/transformer_demo.py --workdir runs/demo/gpt_class \
      --config.first_stage.workdir=runs/demo/vqgan
  python -m vqgan_jax.sample --workdir runs/demo/gpt_class --output runs/demo/samples_class

Sized to train in about a minute and a half on a 2-core CPU (compilation included).
"""

from configs import transformer_default


def get_config():
  config = transformer_default.get_config()
  config.first_stage.workdir = "runs/demo/vqgan"
  m = config.model
  m.n_layer = 2
  m.n_head = 4
  m.n_embd = 128
  config.cond.kind = "class"
  config.cond.num_classes = 0          # from the dataset: 7 photos
  config.cond.cfg_dropout = 0.1        # learn a null class too: classifier-free guidance
  config.data.name = "photos"
  config.data.image_size = 32
  config.data.photos.photo_short_side = 128
  config.batch_size = 16
  config.learning_rate = 1e-3
  config.warmup_steps = 20
  config.grad_clip_norm = 1.0
  config.num_train_steps = 300
  config.log_every_steps = 50
  config.eval_every_steps = 150
  config.num_eval_batches = 0          # the whole val split (a few batches)
  config.eval_batch_size = 32
  config.unigram_batches = 8
  config.checkpoint_every_steps = 150
  config.sampling.num_samples_per_class = 8
  config.sampling.num_samples = 8
  config.sampling.top_k = 64
  return config

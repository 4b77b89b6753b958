"""Default stage-2 (transformer) config: every field, commented. Other configs override it.

The GPT keys carry minGPT's names (`n_layer`, `n_embd`, ...) as in taming-transformers'
yaml. Defaults are a mid-size unconditional model on 16 x 16 token grids; the paper's
models are in transformer_ffhq.py, transformer_imagenet_cond.py, transformer_sflckr_seg.py.

Vocabulary (see vqgan_jax/stage2_trainer.py): image codes [0, n_codes), then the ids of
the conditioning kind in use (start token | classes (+ null class) | codes of the
conditioning VQGAN | coordinate bins) in their own ranges above the image codes.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = "transformer"  # which trainer/loader this config belongs to

  # --- The frozen stage-1 VQGAN that turns images into tokens ---
  fs = config.first_stage = ml_collections.ConfigDict()
  fs.workdir = ""               # stage-1 workdir (train_stage1.py --workdir); required
  fs.step = -1                  # checkpoint step to load; -1 = newest (pinned on resume)
  fs.n_embed = 0                # expected codebook size; 0 = take it from the checkpoint
  fs.latent_grid = (0, 0)       # expected latent grid (h, w) of the stage-1 model at its
                                # training resolution; (0, 0) = take it from the checkpoint

  # --- GPT (minGPT keys) ---
  m = config.model = ml_collections.ConfigDict()
  m.vocab_size = 0              # 0 = derived: n_codes + number of condition ids
  m.block_size = 0              # 0 = derived: condition tokens + image tokens
  m.n_layer = 24                # transformer blocks
  m.n_head = 16                 # attention heads (n_embd must be divisible by it)
  m.n_embd = 1024               # width
  m.embd_pdrop = 0.0            # dropout after token + position embedding
  m.resid_pdrop = 0.0           # dropout on each residual branch
  m.attn_pdrop = 0.0            # dropout on attention probabilities (softmax only)
  m.attention = "softmax"       # "softmax" | "linear" (elu+1 kernel, O(N))
  m.linear_chunk_size = 64      # chunk length of the chunked linear-attention scan
  m.remat = "none"              # backward pass: "none" | "full" (recompute each block) |
                                # "dots" (keep matmul outputs, recompute the rest)
  m.scan_layers = False         # stack the blocks and run them with one lax.scan (compile
                                # time and program size independent of depth; params
                                # "blocks/..." with a leading layer axis)

  # --- Conditioning ---
  c = config.cond = ml_collections.ConfigDict()
  c.kind = "none"               # "none" (a single start token) | "class" | "spatial" | "coord"
  c.cond_stage_workdir = ""     # spatial: workdir of the conditioning VQGAN (a stage-1 model
                                # trained with data.input="segmentation")
  c.cond_stage_step = -1        # spatial: its checkpoint step; -1 = newest (pinned on resume)
  c.n_embed = 0                 # spatial: expected codebook size of the conditioning VQGAN;
                                # 0 = take it from the checkpoint
  c.latent_grid = (0, 0)        # spatial: expected latent grid of the conditioning VQGAN;
                                # (0, 0) = take it from the checkpoint
  c.num_classes = 0             # class: number of classes; 0 = from data.dataset_info
  c.cfg_dropout = 0.0           # class: prob. of replacing a label by the "null class" id
                                # while training (classifier-free guidance); 0 = no null class
  c.coord_grid = 16             # coord: bins per axis of the crop origin (needs crop_tokens)

  # --- Training inputs ---
  config.pkeep = 1.0            # 1.0 = off; else each input image token is replaced by a
                                # random code with prob. 1 - pkeep (reference), targets kept
  config.crop_tokens = 0        # 0 = off; >0: train on random crop_tokens x crop_tokens crops
                                # of the token grid (high-resolution training; sample larger
                                # grids with the sliding window)
  config.tokens_dir = ""        # "" = tokenise on the fly with the frozen encoder(s); else
                                # the --output folder of vqgan_jax.export_tokens: train on
                                # its train/ split (and evaluate on validation/ if exported),
                                # made with the same stage-1 (and conditioning) checkpoints

  # --- Data (see vqgan_jax/data.py) ---
  from vqgan_jax import data  # local import keeps config files cheap to read
  config.data = data.default_data_config()
  config.data.image_size = 256
  config.data.photos.photo_short_side = 512  # the bundled photos need room for 256 crops

  # --- Optimisation (minGPT / taming) ---
  config.batch_size = 8                # global batch size (all processes)
  config.grad_accum_steps = 1          # micro-batches per update: batch_size / grad_accum_steps
                                       # examples per forward pass, gradients averaged (a
                                       # paper's global batch on any slice)
  config.base_learning_rate = 4.5e-6   # lr = base_learning_rate * batch_size ...
  config.learning_rate = 0.0           # ... unless this is > 0
  config.warmup_steps = 0              # linear warm-up from 0; 0 = constant lr (reference)
  config.adam_b1 = 0.9                 # AdamW betas (minGPT)
  config.adam_b2 = 0.95
  config.weight_decay = 0.01           # on Dense kernels only (not embeddings, biases,
                                       # LayerNorm, position embedding), as minGPT
  config.grad_clip_norm = 0.0          # 0: no clipping (reference)
  config.num_train_steps = 500_000
  config.seed = 0

  # --- Numerics / performance ---
  config.compute_dtype = "float32"     # "bfloat16": GPT in mixed precision (params stay f32)
  config.nonfinite_policy = "error"    # "error" | "skip": what to do on a NaN/Inf loss

  # --- Mesh (see vqgan_jax/sharding.py) ---
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                # -1: all remaining devices
  config.mesh.fsdp = 1
  config.mesh.tensor = 1               # model parallel inside attention / MLP layers

  # --- Logging, evaluation, checkpoints ---
  config.log_every_steps = 50
  # > 0: write a profiler trace of that many steps (after step 10) for TensorBoard.
  config.profile_steps = 0
  config.eval_every_steps = 1000
  config.num_eval_batches = 8          # 0: the whole val split
  config.eval_batch_size = 16
  # GPT samples written to TensorBoard at each evaluation (`val_samples`: the val tokens'
  # own images over samples drawn after their condition prefixes); 0 = none.
  config.eval_samples = 8
  config.unigram_batches = 8           # train batches for the unigram-entropy baseline; 0 = off
  config.checkpoint_every_steps = 1000
  config.max_checkpoints_to_keep = 3
  config.async_checkpointing = True
  config.force_resume = False          # resume even if the workdir's model config differs

  # --- Sampling defaults (python -m vqgan_jax.sample) ---
  s = config.sampling = ml_collections.ConfigDict()
  s.temperature = 1.0                  # 0 = greedy
  s.top_k = 0                          # 0 = off
  s.top_p = 0.0                        # 0 = off (nucleus sampling otherwise)
  s.cfg_scale = 1.0                    # class: classifier-free guidance scale; 1 = off
                                       # (needs cond.cfg_dropout > 0 at training time)
  s.num_samples_per_class = 4          # class: samples in each class's grid
  s.num_samples = 8                    # unconditional / spatial / coord samples
  s.sliding_window_factor = 2          # sliding-window image: this many times the trained
                                       # token window per side (2 = 4x the area)
  s.batch_size = 64                    # samples drawn per compiled sampler call
  return config

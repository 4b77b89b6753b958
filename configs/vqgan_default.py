"""Default stage-1 (VQGAN) config: every field, commented. Other configs override it.

Model keys carry the names of taming-transformers' yaml (`ch`, `ch_mult`, ...), so a
reference config ports by hand. Defaults are the reference's f16 ImageNet model.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.stage = "vqgan"  # which trainer/loader this config belongs to

  # --- Model (reference yaml names) ---
  m = config.model = ml_collections.ConfigDict()
  m.ch = 128                    # base channel count
  m.ch_mult = (1, 1, 2, 2, 4)   # channel multiplier per level; f = 2**(len-1)
  m.num_res_blocks = 2          # ResnetBlocks per level (decoder uses one more)
  m.attn_resolutions = (16,)    # resolutions (in pixels of the feature map) with AttnBlocks
  m.dropout = 0.0
  m.resolution = 256            # training image size; fixes where attention sits
  m.in_channels = 3
  m.out_ch = 3
  m.z_channels = 256            # encoder output channels
  m.embed_dim = 256             # code dimension (quant_conv output)
  m.n_embed = 1024              # codebook size K
  m.beta = 0.25                 # commitment weight
  m.legacy_beta = True          # True: reference placement of beta; False: VQ-VAE placement
  m.codebook_dim = 0            # >0: look codes up in this low dimension (ViT-VQGAN/LlamaGen)
  m.l2_normalize = False        # compare l2-normalised latents and codes
  # Quantizer (vqgan_jax/models/quantizer.py). n_embed must equal the codebook size:
  # prod(fsq_levels) for fsq, 2**lfq_bits for lfq.
  m.quantizer = "vq"            # "vq" (paper) | "vq_ema" (EMA codebook, VQ-VAE-2) | "fsq"
                                # (finite scalar quantization) | "lfq" (lookup-free,
                                # MAGVIT-v2) | "simvq" (frozen random basis @ learned W)
  m.ema_decay = 0.99            # vq_ema: EMA decay of cluster sizes and code sums
  m.ema_eps = 1e-5              # vq_ema: Laplace smoothing of cluster sizes
  m.fsq_levels = (8, 5, 5, 5)   # fsq: levels per latent channel (here 1000 codes)
  m.lfq_bits = 10               # lfq: latent channels = bits (here 1024 codes)
  m.lfq_entropy_weight = 0.1    # lfq: weight of (per-sample - codebook) entropy in q_loss
  m.lfq_commit_weight = 0.25    # lfq: weight of the commitment loss in q_loss
  m.lfq_temperature = 0.01      # lfq: softmax temperature of the soft code assignment
  m.lfq_entropy_group_bits = 10  # lfq: entropy over bit groups of at most this many bits
  m.restart_dead_codes = False  # vq only: replace codes unused for a while by batch latents
  m.dead_code_decay = 0.99      # EMA decay of per-code usage counts
  m.dead_code_threshold = 0.03  # restart a code when its EMA count per step falls below this
  m.norm_groups = 32            # GroupNorm groups (reference: 32; with ch=32 that is an
                                # InstanceNorm, which cannot pass an image's colour on)
  m.remat = False               # recompute each ResnetBlock/AttnBlock in the backward pass

  # --- Loss (reference `VQLPIPSWithDiscriminator`) ---
  l = config.loss = ml_collections.ConfigDict()
  l.pixel_loss = "l1"           # "l1" (reference) | "l2"
  l.perceptual_weight = 1.0     # LPIPS weight; 0 disables LPIPS
  # Training LPIPS on both images reflect-padded by this many pixels (0 = the reference).
  # On small crops VGG16's receptive fields mostly see its zero padding (docs/stage1.md).
  l.perceptual_pad = 0
  l.codebook_weight = 1.0
  l.disc_start = 250001         # step at which the GAN terms switch on
  l.disc_weight = 0.8           # multiplies the adaptive weight lambda
  l.disc_factor = 1.0
  l.disc_loss = "hinge"         # "hinge" | "vanilla"
  l.disc_num_layers = 3
  l.disc_ndf = 64
  l.disc_norm = "batch"         # "batch" (reference) | "group" | "none"
  l.adaptive_weight = True      # False: lambda = disc_weight (for ablations)
  l.disc_on_stale_reconstructions = False  # True: D on the pre-update x_rec (1 forward less)

  # --- Data (see vqgan_jax/data.py) ---
  from vqgan_jax import data  # local import keeps config files cheap to read
  config.data = data.default_data_config()
  config.data.image_size = 256
  config.data.photos.photo_short_side = 512  # the bundled photos need room for 256 crops

  # --- Optimisation ---
  config.batch_size = 12               # global batch size (all processes)
  config.grad_accum_steps = 1          # micro-batches per update: batch_size / grad_accum_steps
                                       # examples per forward pass, gradients averaged (a
                                       # paper's global batch on any slice)
  config.base_learning_rate = 4.5e-6   # lr = base_learning_rate * batch_size ...
  config.learning_rate = 0.0           # ... unless this is > 0
  config.adam_b1 = 0.5
  config.adam_b2 = 0.9
  config.grad_clip_norm = 0.0          # 0: no clipping (reference)
  config.num_train_steps = 500_000
  config.seed = 0

  # --- Numerics / performance ---
  config.compute_dtype = "float32"     # "bfloat16" for mixed precision (params stay f32)
  config.nonfinite_policy = "error"    # "error" | "skip": what to do on a NaN/Inf loss

  # --- Mesh (see vqgan_jax/sharding.py) ---
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                # -1: all remaining devices
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  # --- Logging, evaluation, checkpoints ---
  config.log_every_steps = 50
  # > 0: write a profiler trace of that many steps (after step 10) for TensorBoard.
  config.profile_steps = 0
  config.eval_every_steps = 1000      # val metrics + reconstruction grid (PNG + TensorBoard)
  config.num_eval_batches = 8          # 0: the whole val split
  config.eval_batch_size = 16
  config.checkpoint_every_steps = 1000
  config.max_checkpoints_to_keep = 3
  config.async_checkpointing = True
  config.force_resume = False          # resume even if the workdir's model config differs
  return config

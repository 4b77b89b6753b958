"""Stage-2 trainer: the GPT over frozen-VQGAN token grids, and its loader.

`train_and_evaluate(config, workdir)` is the whole job: load the frozen stage-1 VQGAN
(and, for spatial conditioning, the conditioning VQGAN) with `checkpointing.load_stage1`,
check them against the config before anything is compiled, then train the GPT with one
jitted step that tokenises the batch with the frozen encoder(s) on the fly, evaluate
val bits per token, and save checkpoints that `load_stage2` reads back for sampling.

Vocabulary layout (one id space, disjoint ranges, in this order; unused ranges are empty):
  image       [0, n_codes)                      codes of the stage-1 VQGAN
  start       1 id                              cond.kind="none": the start token
  class       num_classes ids                   cond.kind="class": one id per label
  null_class  1 id if cond.cfg_dropout > 0      "no label" (classifier-free guidance)
  spatial     n_cond_codes ids                  cond.kind="spatial": codes of the
                                                conditioning VQGAN (e.g. segmentations)
  coord       2 * coord_grid ids                cond.kind="coord": coord_grid bins of the
                                                crop origin's row, then of its column
The layout is written to every checkpoint's metadata ("vocab"). Unlike the reference
(where condition ids share the image ids), no condition id can be mistaken for an image
code, and samplers draw image tokens from [0, n_codes) only.

Sequence = [condition tokens (P), image tokens (N, row-major)]; the GPT reads the first
P + N - 1 and the loss (next-token cross-entropy) covers only the N positions that
predict image tokens. P is 1 (start or class), h*w (spatial: the condition's token
window) or 2 (coord: row bin, column bin). With `crop_tokens` = c > 0, the image (and a
spatial condition) is a random c x c crop of the token grid (a fixed pseudo-random crop
for evaluation), so N = c * c.

Training-time corruption: with pkeep < 1 each *input* image token is replaced by a
uniformly random image code with probability 1 - pkeep (targets stay clean; condition
tokens are never touched). With cfg_dropout > 0 a label becomes the null-class id with
that probability.

Tokens: by default the frozen encoders run inside the jitted train step, their
parameters passed as a separate replicated argument (never in the train state or the
checkpoint). With `config.tokens_dir` set to the output of vqgan_jax.export_tokens, the
steps read the exported indices instead ('tokens', and 'cond_tokens' for spatial
conditioning): training uses the train/ split, evaluation the validation/ split when it
was exported (else the images of config.data). The export's metadata (stage-1 step,
codebook size, token grid, conditioning VQGAN) must match the frozen checkpoints, which
are still loaded (sampling and the checkpoint record need them). Everything after
tokenisation (crops, corruption, loss) is the same code either way.
"""

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from vqgan_jax import checkpointing, config_lib, data, losses, sharding, train_loop, train_utils
from vqgan_jax import stage1_trainer
from vqgan_jax import tokens as tokens_lib
from vqgan_jax.models import transformer
from vqgan_jax.models import vqgan

LN2 = math.log(2.0)
RANGE_ORDER = ("image", "start", "class", "null_class", "spatial", "coord")

# Tensor-parallel placement of GPT weights (the `tensor` mesh axis): see sharding.GPT_RULES.
GPT_SHARDING_RULES = sharding.GPT_RULES


# ---------------------------------------------------------------------------------------
# Vocabulary and sequences
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  """Disjoint id ranges of the stage-2 vocabulary (see the module docstring)."""
  kind: str
  sizes: Tuple[Tuple[str, int], ...]   # (range name, size) in RANGE_ORDER
  coord_grid: int = 0

  @classmethod
  def build(cls, kind: str, n_codes: int, num_classes: int = 0, null_class: bool = False,
            n_cond_codes: int = 0, coord_grid: int = 0) -> "VocabLayout":
    if kind not in config_lib.COND_KINDS:
      raise ValueError(f"unknown conditioning kind {kind!r}; one of {config_lib.COND_KINDS}")
    if n_codes < 1:
      raise ValueError(f"n_codes must be >= 1, got {n_codes}")
    sizes = {"image": n_codes, "start": int(kind == "none"),
             "class": num_classes if kind == "class" else 0,
             "null_class": int(kind == "class" and null_class),
             "spatial": n_cond_codes if kind == "spatial" else 0,
             "coord": 2 * coord_grid if kind == "coord" else 0}
    if kind == "class" and num_classes < 1:
      raise ValueError("class conditioning needs num_classes >= 1")
    if kind == "spatial" and n_cond_codes < 1:
      raise ValueError("spatial conditioning needs n_cond_codes >= 1")
    if kind == "coord" and coord_grid < 1:
      raise ValueError("coordinate conditioning needs coord_grid >= 1")
    return cls(kind, tuple((name, int(sizes[name])) for name in RANGE_ORDER),
               int(coord_grid if kind == "coord" else 0))

  def size(self, name: str) -> int:
    return dict(self.sizes)[name]

  def offset(self, name: str) -> int:
    total = 0
    for n, s in self.sizes:
      if n == name:
        return total
      total += s
    raise KeyError(name)

  def range(self, name: str) -> Tuple[int, int]:
    """[start, stop) of a range."""
    return self.offset(name), self.offset(name) + self.size(name)

  @property
  def vocab_size(self) -> int:
    return sum(s for _, s in self.sizes)

  @property
  def n_codes(self) -> int:
    return self.size("image")

  @property
  def num_classes(self) -> int:
    return self.size("class")

  @property
  def has_null_class(self) -> bool:
    return self.size("null_class") > 0

  @property
  def start_id(self) -> int:
    return self.offset("start")

  @property
  def null_id(self) -> int:
    if not self.has_null_class:
      raise ValueError("this model has no null class (trained with cond.cfg_dropout = 0)")
    return self.offset("null_class")

  def prefix_len(self, cond_window: Tuple[int, int] = (0, 0)) -> int:
    if self.kind == "spatial":
      return int(cond_window[0] * cond_window[1])
    return 2 if self.kind == "coord" else 1

  def to_dict(self) -> Dict[str, Any]:
    return {"kind": self.kind, "vocab_size": self.vocab_size, "coord_grid": self.coord_grid,
            "ranges": {n: [self.offset(n), self.offset(n) + s] for n, s in self.sizes}}

  @classmethod
  def from_dict(cls, d: Dict[str, Any]) -> "VocabLayout":
    sizes = tuple((n, int(d["ranges"][n][1] - d["ranges"][n][0])) for n in RANGE_ORDER)
    layout = cls(d["kind"], sizes, int(d.get("coord_grid", 0)))
    if layout.to_dict()["ranges"] != {k: list(v) for k, v in d["ranges"].items()}:
      raise ValueError(f"vocabulary ranges {d['ranges']} are not in the expected order")
    return layout


def coord_bins(origin, span: int, coord_grid: int):
  """Bin of a crop origin in [0, span] (span = grid - crop): round(origin/span * (G-1))."""
  if coord_grid <= 1 or span <= 0:
    return jnp.zeros_like(jnp.asarray(origin), jnp.int32)
  u = jnp.asarray(origin, jnp.float32) / float(span)
  return jnp.clip(jnp.round(u * (coord_grid - 1)), 0, coord_grid - 1).astype(jnp.int32)


def condition_tokens(layout: VocabLayout, batch_size: int, labels=None, cond_codes=None,
                     origins=None, spans=(0, 0)) -> jax.Array:
  """The (B, P) condition prefix in the model's id space.

  none: the start token. class: labels (B,) (already null-replaced where wanted).
  spatial: cond_codes (B, h, w) of the conditioning VQGAN. coord: origins = (oy, ox)
  (each (B,)) of the crop in a grid where origins range over [0, spans].
  """
  if layout.kind == "none":
    return jnp.full((batch_size, 1), layout.start_id, jnp.int32)
  if layout.kind == "class":
    return (jnp.asarray(labels, jnp.int32) + layout.offset("class"))[:, None]
  if layout.kind == "spatial":
    codes = jnp.asarray(cond_codes, jnp.int32).reshape(batch_size, -1)
    return codes + layout.offset("spatial")
  oy, ox = origins
  g, base = layout.coord_grid, layout.offset("coord")
  by = coord_bins(oy, spans[0], g) + base
  bx = coord_bins(ox, spans[1], g) + base + g
  return jnp.stack([by, bx], axis=1).astype(jnp.int32)


def loss_mask(prefix_len: int, num_image_tokens: int) -> jax.Array:
  """(P + N - 1,) bool over the GPT's input positions: True where the next token is an
  image token (positions P-1 .. P+N-2), False where it is a condition token."""
  return jnp.arange(prefix_len + num_image_tokens - 1) >= prefix_len - 1


def sequence_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Mean cross-entropy (nats) over masked positions and the count."""
  return losses.token_cross_entropy(logits, targets, mask)


def corrupt_image_tokens(tokens: jax.Array, prefix_len: int, n_codes: int, pkeep: float,
                         rng: jax.Array) -> jax.Array:
  """Replaces each image token (positions >= prefix_len) by a random code in [0, n_codes)
  with probability 1 - pkeep (the reference's pkeep); condition tokens are kept."""
  if pkeep >= 1.0:
    return tokens
  keep_key, code_key = jax.random.split(rng)
  keep = jax.random.bernoulli(keep_key, pkeep, tokens.shape)
  keep = keep | (jnp.arange(tokens.shape[1]) < prefix_len)[None, :]
  random_codes = jax.random.randint(code_key, tokens.shape, 0, n_codes, dtype=tokens.dtype)
  return jnp.where(keep, tokens, random_codes)


def crop_grids(grids: Sequence[Optional[jax.Array]], origins, size: Tuple[int, int]):
  """Crops every (B, H, W) grid at per-example origins (oy, ox) to size (h, w)."""
  oy, ox = origins

  def crop(g):
    if g is None:
      return None
    return jax.vmap(lambda x, y0, x0: lax.dynamic_slice(x, (y0, x0), size))(g, oy, ox)

  return [crop(g) for g in grids]


# ---------------------------------------------------------------------------------------
# Config-derived pieces (no checkpoint access: usable for parameter counts)
# ---------------------------------------------------------------------------------------


def compute_dtype(config) -> jnp.dtype:
  return jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32


def learning_rate(config) -> float:
  """lr = base_learning_rate x global batch (the reference's scaling) unless given directly."""
  if config.learning_rate > 0:
    return float(config.learning_rate)
  return float(config.base_learning_rate) * config.batch_size


def lr_at(config, step: int) -> float:
  lr = learning_rate(config)
  if config.warmup_steps > 0:
    return lr * min(1.0, step / config.warmup_steps)
  return lr


def decay_mask(params) -> Any:
  """True for Dense kernels (weight decay), False for embeddings, biases, LayerNorm, wpe."""
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(config) -> optax.GradientTransformation:
  lr = learning_rate(config)
  if config.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, lr, config.warmup_steps)
  tx = optax.adamw(lr, b1=config.adam_b1, b2=config.adam_b2,
                   weight_decay=config.weight_decay, mask=decay_mask)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def layout_for(config, n_codes: int, n_cond_codes: int = 0,
               num_classes: Optional[int] = None) -> VocabLayout:
  c = config.cond
  if num_classes is None:
    num_classes = c.num_classes
  return VocabLayout.build(c.kind, n_codes, num_classes=num_classes,
                           null_class=c.cfg_dropout > 0, n_cond_codes=n_cond_codes,
                           coord_grid=c.coord_grid)


def build_gpt(config, layout: VocabLayout, prefix_len: int, num_image_tokens: int,
              dtype=None) -> transformer.GPT:
  """The GPT of `config.model`, with vocab/block size derived (0) or checked (> 0)."""
  m = config.model
  vocab = m.vocab_size or layout.vocab_size
  if vocab < layout.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={m.vocab_size} is smaller than the {layout.vocab_size} ids "
        f"the vocabulary needs ({layout.to_dict()['ranges']}); use 0 to derive it")
  needed = prefix_len + num_image_tokens - 1
  block = m.block_size or prefix_len + num_image_tokens
  if block < needed:
    raise config_lib.ConfigError(
        f"config.model.block_size={m.block_size} is smaller than the {needed} positions the "
        f"GPT reads ({prefix_len} condition + {num_image_tokens} image tokens - 1); use 0")
  return transformer.GPT(
      vocab_size=int(vocab), block_size=int(block), n_layer=m.n_layer, n_head=m.n_head,
      n_embd=m.n_embd, embd_pdrop=m.embd_pdrop, resid_pdrop=m.resid_pdrop,
      attn_pdrop=m.attn_pdrop, attention=m.attention, linear_chunk_size=m.linear_chunk_size,
      dtype=dtype if dtype is not None else compute_dtype(config), remat=m.remat,
      scan_layers=bool(m.get("scan_layers", False)))


def stated_model(config, latent_grid: Optional[Tuple[int, int]] = None):
  """(GPT, layout, prefix_len, num_image_tokens) from the config's stated expectations
  alone (first_stage.n_embed, latent grid, cond.n_embed, cond.num_classes) — no
  checkpoints; for parameter counts of the paper configs."""
  grid = tuple(latent_grid or config.first_stage.latent_grid)
  if config.first_stage.n_embed <= 0 or min(grid) <= 0:
    raise config_lib.ConfigError("stated_model needs first_stage.n_embed and a latent grid")
  window = (config.crop_tokens,) * 2 if config.crop_tokens else grid
  n_cond = config.cond.n_embed if config.cond.kind == "spatial" else 0
  layout = layout_for(config, config.first_stage.n_embed, n_cond)
  prefix = layout.prefix_len(window)
  n = window[0] * window[1]
  return build_gpt(config, layout, prefix, n), layout, prefix, n


# ---------------------------------------------------------------------------------------
# Loading and checking the frozen VQGANs
# ---------------------------------------------------------------------------------------


def _check_expectation(stated, actual, key: str, what: str, workdir: str, step: int):
  if stated and tuple(np.atleast_1d(stated)) != tuple(np.atleast_1d(actual)):
    raise config_lib.ConfigError(
        f"config.{key}={stated!r} but the {what} checkpoint {workdir} (step {step}) has "
        f"{actual!r}; fix config.{key} (0 = take it from the checkpoint) or point to "
        "another workdir")


def _default_input(frozen):
  """Stage-1 checkpoints written before `data.input` existed encode RGB images."""
  if "input" not in frozen.config.data:
    with frozen.config.unlocked():
      frozen.config.data.input = "image"
  return frozen


def load_frozen_stages(config, mesh=None, first_step: Optional[int] = None,
                       cond_step: Optional[int] = None):
  """Loads and validates the frozen VQGAN(s) named by the config (nothing is compiled).

  Returns (first_stage, cond_stage or None), both `checkpointing.FrozenStage1` with
  parameters replicated over `mesh` (or on the first local device without a mesh).
  """
  repl = sharding.replicated(mesh) if mesh is not None else None
  fs = config.first_stage
  step = fs.step if first_step is None else first_step
  first = _default_input(
      checkpointing.load_stage1(fs.workdir, None if step < 0 else step, sharding=repl))
  _check_expectation(fs.n_embed, first.n_embed, "first_stage.n_embed", "stage-1",
                     fs.workdir, first.step)
  _check_expectation(tuple(fs.latent_grid) if min(fs.latent_grid) > 0 else None,
                     tuple(first.metadata["latent_grid"]), "first_stage.latent_grid",
                     "stage-1", fs.workdir, first.step)
  if first.config.data.input != "image":
    raise config_lib.ConfigError(
        f"the stage-1 model in {fs.workdir} encodes {first.config.data.input!r} inputs, not "
        "RGB images; config.first_stage.workdir must be an image VQGAN")
  token_grid(config, first)
  cond = None
  if config.cond.kind == "spatial":
    c = config.cond
    step = c.cond_stage_step if cond_step is None else cond_step
    cond = _default_input(checkpointing.load_stage1(
        c.cond_stage_workdir, None if step < 0 else step, sharding=repl))
    _check_expectation(c.n_embed, cond.n_embed, "cond.n_embed", "conditioning VQGAN",
                       c.cond_stage_workdir, cond.step)
    _check_expectation(tuple(c.latent_grid) if min(c.latent_grid) > 0 else None,
                       tuple(cond.metadata["latent_grid"]), "cond.latent_grid",
                       "conditioning VQGAN", c.cond_stage_workdir, cond.step)
    if cond.config.data.input != "segmentation":
      raise config_lib.ConfigError(
          f"the conditioning VQGAN in {c.cond_stage_workdir} was trained on "
          f"data.input={cond.config.data.input!r}; spatial conditioning needs "
          "one trained with data.input='segmentation'")
    segments = int(config.data.photos.num_segments)
    if cond.config.model.in_channels != segments:
      raise config_lib.ConfigError(
          f"the conditioning VQGAN in {c.cond_stage_workdir} takes "
          f"{cond.config.model.in_channels} segment channels but config.data.photos."
          f"num_segments={segments}")
    cond_grid = token_grid(config, cond, "conditioning VQGAN")
    if cond_grid != token_grid(config, first):
      raise config_lib.ConfigError(
          f"the conditioning VQGAN ({c.cond_stage_workdir}, f={cond.downsample_factor}) gives "
          f"a {cond_grid} token grid but the stage-1 model ({fs.workdir}, "
          f"f={first.downsample_factor}) gives {token_grid(config, first)} at "
          f"data.image_size={config.data.image_size}; they must match")
  return first, cond


def token_grid(config, frozen, what: str = "stage-1") -> Tuple[int, int]:
  """Token grid (h, w) of one data.image_size crop under a frozen VQGAN."""
  f = frozen.downsample_factor
  size = int(config.data.image_size)
  if size % f:
    raise config_lib.ConfigError(
        f"config.data.image_size={size} is not divisible by the {what} model's downsampling "
        f"factor {f}")
  grid = (size // f, size // f)
  if config.crop_tokens and config.crop_tokens > min(grid):
    raise config_lib.ConfigError(
        f"config.crop_tokens={config.crop_tokens} exceeds the {grid[0]}x{grid[1]} token grid "
        f"of data.image_size={size}")
  return grid


def encode(frozen_model: vqgan.VQModel, params, x: jax.Array) -> jax.Array:
  """Token indices (B, h, w) int32 of inputs x under a frozen VQGAN."""
  idx = frozen_model.apply({"params": params}, x, method=vqgan.VQModel.encode_to_indices)
  return lax.stop_gradient(idx).astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# Train state and pure steps
# ---------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainerState:
  step: jax.Array
  opt_state: Any
  nonfinite_steps: jax.Array


@flax.struct.dataclass
class Stage2State:
  params: Any
  trainer: TrainerState


class Stage2Setup:
  """GPT, optimiser and pure step functions for one config and its frozen VQGAN(s)."""

  def __init__(self, config, first, cond=None, num_classes: Optional[int] = None):
    self.config = config
    first = _default_input(first)
    self.first_model, self.first_config = first.model, first.config
    self.cond_model = cond.model if cond is not None else None
    self.cond_config = cond.config if cond is not None else None
    self.grid = token_grid(config, first)
    c = config.crop_tokens
    self.window = (c, c) if c else self.grid
    if num_classes is None:
      num_classes = resolve_num_classes(config)
    self.layout = layout_for(config, first.n_embed, cond.n_embed if cond is not None else 0,
                             num_classes)
    self.prefix_len = self.layout.prefix_len(self.window)
    self.num_image_tokens = self.window[0] * self.window[1]
    self.gpt = build_gpt(config, self.layout, self.prefix_len, self.num_image_tokens)
    self.tx = make_optimizer(config)
    self.rng = jax.random.PRNGKey(config.seed)
    self.loss_mask = loss_mask(self.prefix_len, self.num_image_tokens)

  @property
  def seq_len(self) -> int:
    """Length the GPT reads (condition + image tokens - 1)."""
    return self.prefix_len + self.num_image_tokens - 1

  def batch_keys(self, from_tokens: bool = False) -> Tuple[str, ...]:
    """Batch entries the steps read: images (encoded in the step) or exported tokens."""
    keys = ["tokens" if from_tokens else "image"]
    if self.layout.kind == "class":
      keys.append("label")
    if self.layout.kind == "spatial":
      keys.append("cond_tokens" if from_tokens else "segmentation")
    return tuple(keys)

  def init_state(self, rng: jax.Array) -> Stage2State:
    params = self.gpt.init(rng, jnp.zeros((1, self.seq_len), jnp.int32))["params"]
    return Stage2State(params=params, trainer=TrainerState(
        step=jnp.zeros((), jnp.int32), opt_state=self.tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32)))

  # ----------------------------------------------------------------- sequences
  def tokenize(self, frozen, batch) -> Tuple[jax.Array, Optional[jax.Array]]:
    """(image codes (B, h, w), condition codes (B, h, w) or None) of the full crop.

    A batch of exported tokens (key 'tokens', see vqgan_jax/tokens.py) is used as it is;
    a batch of images is encoded with the frozen VQGAN(s).
    """
    if "tokens" in batch:
      cond = batch["cond_tokens"].astype(jnp.int32) if self.layout.kind == "spatial" else None
      return batch["tokens"].astype(jnp.int32), cond
    image = encode(self.first_model, frozen["first"],
                   stage1_trainer.model_inputs(batch, self.first_config))
    cond = None
    if self.layout.kind == "spatial":
      cond = encode(self.cond_model, frozen["cond"],
                    stage1_trainer.model_inputs(batch, self.cond_config))
    return image, cond

  def sequence(self, frozen, batch, rng: jax.Array, train: bool) -> jax.Array:
    """Full token sequence (B, P + N): condition tokens then image tokens (clean)."""
    image, cond = self.tokenize(frozen, batch)
    b = image.shape[0]
    crop_key, drop_key = jax.random.split(rng)
    spans = (self.grid[0] - self.window[0], self.grid[1] - self.window[1])
    origins = (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
    if self.window != self.grid:
      ky, kx = jax.random.split(crop_key)
      origins = (jax.random.randint(ky, (b,), 0, spans[0] + 1),
                 jax.random.randint(kx, (b,), 0, spans[1] + 1))
      image, cond = crop_grids([image, cond], origins, self.window)
    labels = None
    if self.layout.kind == "class":
      labels = batch["label"].astype(jnp.int32)
      if train and self.config.cond.cfg_dropout > 0:
        dropped = jax.random.bernoulli(drop_key, self.config.cond.cfg_dropout, (b,))
        labels = jnp.where(dropped, self.layout.null_id - self.layout.offset("class"), labels)
    prefix = condition_tokens(self.layout, b, labels=labels, cond_codes=cond,
                              origins=origins, spans=spans)
    return jnp.concatenate([prefix, image.reshape(b, -1)], axis=1)

  # ----------------------------------------------------------------- steps
  def train_step(self, state: Stage2State, batch, frozen):
    """One optimiser update on `batch`, as config.grad_accum_steps micro-batches whose
    gradients are averaged (one micro-batch = the whole batch by default)."""
    trainer = state.trainer
    rng = jax.random.fold_in(self.rng, trainer.step)
    steps = int(self.config.get("grad_accum_steps", 1))

    def micro_step(micro_batch, index, carry):
      # One micro-batch keeps the step's key; several get keys of their own, drawn from
      # a branch that no other use of the step's key shares.
      key = rng if steps == 1 else jax.random.fold_in(jax.random.fold_in(rng, 7), index)
      seq_key, corrupt_key, dropout_key = jax.random.split(key, 3)
      tokens = self.sequence(frozen, micro_batch, seq_key, train=True)
      inputs = corrupt_image_tokens(tokens, self.prefix_len, self.layout.n_codes,
                                    self.config.pkeep, corrupt_key)[:, :-1]
      targets = tokens[:, 1:]
      mask = jnp.broadcast_to(self.loss_mask[None], targets.shape)

      def loss_fn(params):
        logits = self.gpt.apply({"params": params}, inputs, train=True,
                                rngs={"dropout": dropout_key})
        loss, _ = sequence_loss(logits, targets, mask)
        return loss

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      return grads, {"loss": loss}, carry, ()

    grads, micro_metrics, _, _ = train_utils.accumulate(micro_step, batch, steps)
    loss = micro_metrics["loss"]
    updates, opt_state = self.tx.update(grads, trainer.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = Stage2State(params=params, trainer=TrainerState(
        step=trainer.step + 1, opt_state=opt_state, nonfinite_steps=trainer.nonfinite_steps))
    # A non-finite step leaves parameters and optimiser state as they were.
    skipped = Stage2State(params=state.params, trainer=trainer.replace(
        step=trainer.step + 1, nonfinite_steps=trainer.nonfinite_steps + 1))
    new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new_state, skipped)
    metrics = {"loss": loss, "bits_per_token": loss / LN2, "grad_norm": grad_norm,
               "finite": finite}
    return new_state, metrics

  def eval_step(self, params, batch, frozen, key):
    """Masked sums of val cross-entropy (nats) and image-token counts per code."""
    tokens = self.sequence(frozen, batch, key, train=False)
    logits = self.gpt.apply({"params": params}, tokens[:, :-1], train=False)
    targets = tokens[:, 1:]
    example_mask = batch["mask"].astype(bool)
    mask = self.loss_mask[None, :] & example_mask[:, None]
    loss, count = sequence_loss(logits, targets, mask)
    image = tokens[:, self.prefix_len:]
    weights = jnp.broadcast_to(example_mask[:, None], image.shape).astype(jnp.float32)
    counts = jnp.zeros((self.layout.n_codes,), jnp.float32).at[image.reshape(-1)].add(
        weights.reshape(-1))
    return {"nll_sum": loss * count, "count": count}, counts

  def count_step(self, batch, frozen, key):
    """Per-code counts of the (cropped) training image tokens of one batch."""
    tokens = self.sequence(frozen, batch, key, train=False)
    return jnp.bincount(tokens[:, self.prefix_len:].reshape(-1), length=self.layout.n_codes)


def resolve_num_classes(config) -> int:
  if config.cond.kind != "class":
    return 0
  if config.cond.num_classes > 0:
    return int(config.cond.num_classes)
  return available_classes(config)


def available_classes(config) -> int:
  """Classes in the training data: the export's label count with tokens_dir, else the
  dataset's."""
  if config.tokens_dir:
    return int(exported_metadata(config, "train")["labels"]["num_classes"])
  return int(data.dataset_info(config.data)["num_classes"])


# ---------------------------------------------------------------------------------------
# Exported tokens (config.tokens_dir)
# ---------------------------------------------------------------------------------------


def exported_metadata(config, split: str) -> Optional[Dict[str, Any]]:
  """The metadata of `split` under config.tokens_dir; None for a validation split that was
  not exported (the train split must exist)."""
  try:
    return tokens_lib.read_metadata(config.tokens_dir, split)
  except tokens_lib.TokenFormatError as e:
    missing = not os.path.isfile(os.path.join(config.tokens_dir, split,
                                              tokens_lib.METADATA_FILE))
    if split == "validation" and missing:
      return None
    raise config_lib.ConfigError(f"config.tokens_dir={config.tokens_dir!r}: {e}") from e


def check_exported_tokens(config, first, cond=None) -> Dict[str, Optional[Dict[str, Any]]]:
  """Checks that the exported splits were made by the frozen checkpoints this config loads
  (step, codebook, grid, conditioning); returns {split: metadata or None}."""
  found = {}
  for split in ("train", "validation"):
    meta = exported_metadata(config, split)
    found[split] = meta
    if meta is None:
      continue
    where = os.path.join(config.tokens_dir, split, tokens_lib.METADATA_FILE)

    def mismatch(what, exported, expected, where=where):
      raise config_lib.ConfigError(
          f"{where}: the tokens were exported with {what} {exported!r}, but this config "
          f"uses {expected!r}; re-export them with the same checkpoint(s) and image size")

    record = meta.get("stage1") or {}
    if record.get("step") != first.step:
      mismatch(f"stage-1 step (from {record.get('workdir')})", record.get("step"), first.step)
    exported_from = record.get("workdir")
    if exported_from and os.path.abspath(config.first_stage.workdir) != exported_from:
      # Same step, codebook and grid but another folder: a moved workdir, or another run.
      logging.warning("%s was exported from %s, this config loads %s (same step %d)", where,
                      exported_from, os.path.abspath(config.first_stage.workdir), first.step)
    if meta["codebook_size"] != first.n_embed:
      mismatch("a codebook of size", meta["codebook_size"], first.n_embed)
    grid = list(token_grid(config, first))
    if meta["grid_shape"] != grid:
      mismatch("a token grid", meta["grid_shape"],
               f"{grid} (data.image_size={config.data.image_size})")
    if config.cond.kind == "spatial":
      exported_cond = meta.get("cond")
      if not exported_cond:
        raise config_lib.ConfigError(
            f"{where}: spatial conditioning needs condition tokens, but the export has none "
            "(export with --cond_workdir naming the conditioning VQGAN)")
      if exported_cond.get("step") != cond.step or exported_cond.get("codebook_size") != \
          cond.n_embed:
        mismatch("a conditioning VQGAN (step, codes)",
                 (exported_cond.get("step"), exported_cond.get("codebook_size")),
                 (cond.step, cond.n_embed))
  return found


def train_iterator(config, seed: int):
  """This process's share of the training stream: exported tokens or images."""
  kwargs = dict(batch_size=config.batch_size // jax.process_count(), seed=seed,
                process_index=jax.process_index(), process_count=jax.process_count())
  if config.tokens_dir:
    return tokens_lib.make_token_train_iterator(config.tokens_dir, split="train", **kwargs)
  return data.make_train_iterator(config.data, **kwargs)


# ---------------------------------------------------------------------------------------
# Runner: devices, compiled steps
# ---------------------------------------------------------------------------------------


class Stage2Runner:
  """A Stage2Setup placed on a mesh: compiled steps, shardings.

  abstract=True builds the same jitted steps without touching devices: the frozen
  VQGAN parameters are given as shapes (`first.params` may be ShapeDtypeStructs), for
  ahead-of-time compilation (`python -m vqgan_jax.dry_run --topology ...`).
  """

  def __init__(self, config, first, cond=None, mesh=None, num_classes=None,
               abstract: bool = False):
    self.config = config
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self.setup = Stage2Setup(config, first, cond, num_classes)
    abstract_state = jax.eval_shape(self.setup.init_state, self.setup.rng)
    self.state_shardings = sharding.tree_shardings(abstract_state, self.mesh,
                                                   GPT_SHARDING_RULES)
    self.abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        self.state_shardings)
    repl = sharding.replicated(self.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.frozen = {"first": stage1_trainer.place(first.params, repl, abstract)}
    if cond is not None:
      self.frozen["cond"] = stage1_trainer.place(cond.params, repl, abstract)
    traced = functools.partial(sharding.under_mesh, mesh=self.mesh)
    self._init = jax.jit(self.setup.init_state, out_shardings=self.state_shardings)
    # The jitted steps, public for ahead-of-time compilation (dry_run).
    self.jitted_train = jax.jit(traced(self.setup.train_step),
                                in_shardings=(self.state_shardings, self.batch_sharding, repl),
                                out_shardings=(self.state_shardings, repl),
                                donate_argnums=(0,))
    self.jitted_eval = jax.jit(traced(self.setup.eval_step),
                               in_shardings=(self.state_shardings.params, self.batch_sharding,
                                             repl, repl),
                               out_shardings=(repl, repl))
    self._count = jax.jit(traced(self.setup.count_step),
                          in_shardings=(self.batch_sharding, repl, repl), out_shardings=repl)

  def init_state(self) -> Stage2State:
    return self._init(self.setup.rng)

  def select(self, batch, eval_batch: bool = False):
    keys = self.setup.batch_keys("tokens" in batch) + (("mask",) if eval_batch else ())
    return sharding.global_batch({k: batch[k] for k in keys}, self.mesh)

  def train_step(self, state, batch):
    return self.jitted_train(state, self.select(batch), self.frozen)

  def evaluate(self, params, eval_batches) -> Tuple[Dict[str, float], np.ndarray]:
    """Val cross-entropy (nats and bits per image token) and val token counts."""
    nll, count, counts = 0.0, 0.0, None
    base = jax.random.PRNGKey(self.config.seed + 1)
    for i, batch in enumerate(eval_batches):
      sums, batch_counts = self.jitted_eval(params, self.select(batch, True), self.frozen,
                                      jax.random.fold_in(base, i))
      sums = jax.device_get(sums)
      nll += float(sums["nll_sum"])
      count += float(sums["count"])
      counts = batch_counts if counts is None else counts + batch_counts
    if counts is None or count == 0:
      raise ValueError("the val split is empty: nothing to evaluate")
    loss = nll / count
    return ({"val_loss": loss, "val_bits_per_token": loss / LN2},
            np.asarray(jax.device_get(counts), np.float64))

  def token_counts(self, batches) -> np.ndarray:
    counts = np.zeros((self.setup.layout.n_codes,), np.int64)
    base = jax.random.PRNGKey(self.config.seed + 2)
    for i, batch in enumerate(batches):
      counts += np.asarray(jax.device_get(
          self._count(self.select(batch), self.frozen, jax.random.fold_in(base, i))), np.int64)
    return counts


def unigram_bits(counts: np.ndarray) -> float:
  """Entropy (bits per token) of the empirical distribution of code counts."""
  counts = np.asarray(counts, np.float64)
  p = counts / max(counts.sum(), 1.0)
  p = p[p > 0]
  return float(-(p * np.log2(p)).sum())


def unigram_cross_entropy_bits(train_counts: np.ndarray, val_counts: np.ndarray,
                               alpha: float = 0.5) -> float:
  """Bits per val token of a unigram model fitted on train counts (add-alpha smoothing)."""
  train_counts = np.asarray(train_counts, np.float64) + alpha
  q = train_counts / train_counts.sum()
  val_counts = np.asarray(val_counts, np.float64)
  return float(-(val_counts * np.log2(q)).sum() / max(val_counts.sum(), 1.0))


def estimate_unigram_counts(config, runner: Stage2Runner, num_batches: int) -> np.ndarray:
  """Code counts of `num_batches` training batches (an iterator of its own, so the
  training iterator is untouched); the train split's unigram token distribution."""
  it = train_iterator(config, config.seed + 7919)
  return runner.token_counts(next(it) for _ in range(num_batches))


def _eval_batches(config, from_tokens: bool = False):
  kwargs = dict(batch_size=config.eval_batch_size // jax.process_count(),
                process_index=jax.process_index(), process_count=jax.process_count())
  if from_tokens:
    iterator = tokens_lib.make_token_eval_iterator(config.tokens_dir, split="validation",
                                                   **kwargs)
  else:
    iterator = data.make_eval_iterator(config.data, **kwargs)
  for i, batch in enumerate(iterator):
    if config.num_eval_batches and i >= config.num_eval_batches:
      break
    yield batch


# ---------------------------------------------------------------------------------------
# Checkpoint metadata, loader
# ---------------------------------------------------------------------------------------


def stage2_metadata(config, setup: Stage2Setup, step: int, first_record, cond_record):
  return {
      "format_version": checkpointing.FORMAT_VERSION,
      "stage": "transformer",
      "step": int(step),
      "config": checkpointing.config_to_dict(config),
      "vocab": setup.layout.to_dict(),
      "attention": config.model.attention,
      "sequence": {"prefix_len": setup.prefix_len, "window": list(setup.window),
                   "token_grid": list(setup.grid), "num_image_tokens": setup.num_image_tokens,
                   "vocab_size": setup.gpt.vocab_size, "block_size": setup.gpt.block_size},
      "first_stage": first_record,
      "cond_stage": cond_record,
  }


@dataclasses.dataclass(frozen=True)
class Stage2Model:
  """A restored stage-2 model with the frozen VQGAN(s) it needs to sample and decode."""
  model: transformer.GPT
  params: Any
  config: ml_collections.ConfigDict
  metadata: Dict[str, Any]
  step: int
  layout: VocabLayout
  first_stage: checkpointing.FrozenStage1
  cond_stage: Optional[checkpointing.FrozenStage1]

  @property
  def window(self) -> Tuple[int, int]:
    return tuple(self.metadata["sequence"]["window"])

  @property
  def token_grid(self) -> Tuple[int, int]:
    return tuple(self.metadata["sequence"]["token_grid"])

  @property
  def prefix_len(self) -> int:
    return int(self.metadata["sequence"]["prefix_len"])


def read_stage2_metadata(workdir: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], int]:
  """(metadata, step) of a stage-2 workdir's checkpoint (newest unless `step`)."""
  if not workdir or not os.path.isdir(workdir):
    raise checkpointing.CheckpointError(f"stage-2 workdir {workdir!r} does not exist")
  manager = checkpointing.make_manager(workdir, read_only=True)
  steps = manager.all_steps() if checkpointing.checkpoint_dir(workdir).exists() else []
  if not steps:
    raise checkpointing.CheckpointError(f"stage-2 workdir {workdir} holds no finished checkpoint")
  if step is None or step < 0:
    step = max(steps)
  elif step not in steps:
    raise checkpointing.CheckpointError(
        f"stage-2 workdir {workdir} has no step {step}; it has {sorted(steps)}")
  metadata = checkpointing.read_metadata(manager, step)
  if metadata.get("stage") != "transformer":
    raise checkpointing.CheckpointError(
        f"{workdir} step {step} is a {metadata.get('stage')!r} checkpoint, not a stage-2 "
        "transformer")
  return metadata, int(step)


def load_stage2(workdir: str, step: Optional[int] = None, attention: Optional[str] = None,
                first_stage_workdir: Optional[str] = None,
                cond_stage_workdir: Optional[str] = None) -> Stage2Model:
  """Restores a stage-2 GPT (newest step unless `step`) and the frozen VQGAN(s) it was
  trained with (the workdirs/steps recorded in its metadata, unless overridden).

  `attention`: the attention type the caller expects; a checkpoint of another type fails.
  """
  metadata, step = read_stage2_metadata(workdir, step)
  if attention is not None and attention != metadata["attention"]:
    raise checkpointing.CheckpointError(
        f"{workdir} step {step} holds a GPT trained with {metadata['attention']!r} attention "
        f"but {attention!r} was asked for (config.model.attention); use the checkpoint's type")
  config = checkpointing.config_from_dict(metadata["config"])
  layout = VocabLayout.from_dict(metadata["vocab"])
  fs = metadata["first_stage"]
  first = _default_input(
      checkpointing.load_stage1(first_stage_workdir or fs["workdir"], fs["step"]))
  if first.n_embed != fs["n_embed"]:
    raise checkpointing.CheckpointError(
        f"{workdir} was trained on a stage-1 model with {fs['n_embed']} codes but "
        f"{first_stage_workdir or fs['workdir']} step {fs['step']} has {first.n_embed}")
  cond = None
  if metadata.get("cond_stage"):
    cs = metadata["cond_stage"]
    cond = _default_input(
        checkpointing.load_stage1(cond_stage_workdir or cs["workdir"], cs["step"]))
  seq = metadata["sequence"]
  model_config = ml_collections.ConfigDict(config.to_dict())
  model_config.model.vocab_size = seq["vocab_size"]
  model_config.model.block_size = seq["block_size"]
  gpt = build_gpt(model_config, layout, seq["prefix_len"], seq["num_image_tokens"])
  abstract = jax.eval_shape(
      lambda: gpt.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
  single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract)
  manager = checkpointing.make_manager(workdir, read_only=True)
  restored = manager.restore(step, args=checkpointing.ocp.args.Composite(
      model=checkpointing.ocp.args.StandardRestore(abstract)))
  return Stage2Model(model=gpt, params=restored["model"], config=config, metadata=metadata,
                     step=step, layout=layout, first_stage=first, cond_stage=cond)


# ---------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------


def _resolve_steps(config, workdir: str, manager):
  """Which frozen-stage steps to load: the config's, or those a resumed run used."""
  start = manager.latest_step()
  if start is None:
    return None, None, None
  saved = checkpointing.read_metadata(manager, start)
  if saved.get("stage") != "transformer":
    raise checkpointing.CheckpointError(
        f"{workdir} holds a {saved.get('stage')!r} checkpoint, not a stage-2 transformer; "
        "use a new workdir")
  force = config.get("force_resume", False)
  first_step = saved["first_stage"]["step"]
  if config.first_stage.step >= 0 and config.first_stage.step != first_step and not force:
    raise checkpointing.CheckpointError(
        f"{workdir} was trained on stage-1 step {first_step} but config.first_stage.step="
        f"{config.first_stage.step}; use a new workdir (or force_resume=True)")
  cond_step = None
  if saved.get("cond_stage"):
    cond_step = saved["cond_stage"]["step"]
    if (config.cond.cond_stage_step >= 0 and config.cond.cond_stage_step != cond_step
        and not force):
      raise checkpointing.CheckpointError(
          f"{workdir} was trained on conditioning-VQGAN step {cond_step} but "
          f"config.cond.cond_stage_step={config.cond.cond_stage_step}; use a new workdir")
  if force:
    first_step = config.first_stage.step if config.first_stage.step >= 0 else first_step
  return saved, first_step, cond_step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains (or resumes) a stage-2 GPT in `workdir`; returns the last evaluation's metrics
  (val_loss, val_bits_per_token and, with unigram_batches > 0, unigram_entropy_bits and
  val_unigram_bits_per_token)."""
  config_lib.validate_transformer_config(config)
  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(config.mesh)
  config_lib.validate_batch_sizes(config, mesh)

  # Everything that can be checked without compiling comes first.
  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(workdir, config.max_checkpoints_to_keep,
                                       config.async_checkpointing)
  saved, first_step, cond_step = _resolve_steps(config, workdir, manager)
  first, cond = load_frozen_stages(config, mesh, first_step, cond_step)
  first_record = _frozen_record_from(config.first_stage.workdir, first)
  cond_record = (_frozen_record_from(config.cond.cond_stage_workdir, cond)
                 if cond is not None else None)
  exported = check_exported_tokens(config, first, cond) if config.tokens_dir else {}
  val_from_tokens = exported.get("validation") is not None
  if config.tokens_dir and not val_from_tokens:
    logging.warning("%s has no exported validation split: evaluating on the images of "
                    "config.data", config.tokens_dir)
  num_classes = resolve_num_classes(config)
  if config.cond.kind == "class" and (config.data.name != "tfds" or config.tokens_dir):
    available = available_classes(config)
    if available > num_classes:
      raise config_lib.ConfigError(
          f"config.cond.num_classes={num_classes} but the dataset has {available} classes")
  setup_layout = layout_for(config, first.n_embed, cond.n_embed if cond else 0, num_classes)
  if saved is not None:
    checkpointing.check_same_model(saved["config"]["model"],
                                   checkpointing.config_to_dict(config)["model"], workdir,
                                   force=config.get("force_resume", False))
    if saved["vocab"] != setup_layout.to_dict():
      raise checkpointing.CheckpointError(
          f"{workdir} holds a GPT with vocabulary {saved['vocab']} but this config and its "
          f"VQGAN(s) give {setup_layout.to_dict()}; use a new workdir")

  runner = Stage2Runner(config, first, cond, mesh, num_classes)
  setup = runner.setup
  logging.info("stage 2: %s conditioning, vocab %s, window %s, sequence %d, %d GPT params",
               setup.layout.kind, setup.layout.to_dict()["ranges"], setup.window,
               setup.seq_len, transformer.count_params(runner.abstract_state.params))
  state, start_step, train_iter, writer = train_loop.restore_or_start(
      config, manager, workdir, make_train_iter=lambda seed: train_iterator(config, seed),
      abstract_model=runner.abstract_state.params,
      abstract_trainer=runner.abstract_state.trainer, init_state=runner.init_state,
      make_state=lambda model, trainer: Stage2State(params=model, trainer=trainer))

  train_counts = None
  if config.unigram_batches > 0:
    train_counts = estimate_unigram_counts(config, runner, config.unigram_batches)

  def run_eval(step, state):
    metrics, val_counts = runner.evaluate(state.params,
                                          _eval_batches(config, val_from_tokens))
    if train_counts is not None:
      metrics["unigram_entropy_bits"] = unigram_bits(train_counts)
      metrics["val_unigram_bits_per_token"] = unigram_cross_entropy_bits(train_counts,
                                                                         val_counts)
    writer.write_scalars(step, metrics)
    logging.info("eval step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics

  def save_checkpoint(step, state, force=False):
    meta = stage2_metadata(config, setup, step, first_record, cond_record)
    checkpointing.guarded_save(manager, workdir, step, state.params, state.trainer, meta,
                               train_iter, force=force)

  def window_scalars(step, fetched, state):
    del fetched, state
    return {"learning_rate": lr_at(config, step)}

  _, last_eval = train_loop.run(
      config, workdir=workdir, manager=manager, writer=writer, state=state,
      start_step=start_step, train_step=lambda state, batch, _: runner.train_step(state, batch),
      train_iter=train_iter, run_eval=run_eval, save_checkpoint=save_checkpoint,
      window_scalars=window_scalars, log_keys=("loss",))
  return last_eval


def _frozen_record_from(workdir: str, frozen) -> Dict[str, Any]:
  return {"workdir": os.path.abspath(workdir), "step": int(frozen.step),
          "n_embed": frozen.n_embed, "latent_grid": list(frozen.metadata["latent_grid"]),
          "downsample_factor": frozen.downsample_factor}

"""Stage-2 trainer: the GPT over frozen-VQGAN token grids.

`train_and_evaluate(config, workdir)` is the whole job: load the frozen stage-1 VQGAN
(and, for spatial conditioning, the conditioning VQGAN) with `handoff.load_frozen_stages`,
check them against the config before anything is compiled, then train the GPT with one
jitted step that tokenises the batch with the frozen encoder(s) on the fly, evaluate
val bits per token, and save checkpoints that `handoff.load_stage2` reads back for
sampling. The vocabulary and sequence layout are `vqgan_jax.conditioning`'s.

With `crop_tokens` = c > 0, the image (and a spatial condition) is a random c x c crop
of the token grid (a fixed pseudo-random crop for evaluation), so N = c * c.

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
are still loaded (sampling and the checkpoint record need them).
"""

import functools
import logging
import math
import os
from typing import Any, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqgan_jax import (checkpointing, conditioning, config_lib, data, handoff,
                       generation, losses, sampling, visualize)
from vqgan_jax import metrics as metrics_lib
from vqgan_jax import sharding
from vqgan_jax.data import tokens as tokens_lib
from vqgan_jax.models import transformer
from vqgan_jax.training import loop as train_loop
from vqgan_jax.training import optim
from vqgan_jax.training import utils as train_utils

LN2 = math.log(2.0)

# Tensor-parallel placement of GPT weights (the `tensor` mesh axis): see sharding.GPT_RULES.
GPT_SHARDING_RULES = sharding.GPT_RULES


# ---------------------------------------------------------------------------------------
# Vocabulary and sequences
# ---------------------------------------------------------------------------------------


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


class Stage2Setup(handoff.Stage2Sequences):
  """GPT, optimiser and pure step functions for one config and its frozen VQGAN(s)."""

  def __init__(self, config, first, cond=None, num_classes: Optional[int] = None):
    super().__init__(config, first, cond, num_classes)
    self.tx = optim.make_optimizer(config)
    self.rng = jax.random.PRNGKey(config.seed)

  def init_state(self, rng: jax.Array) -> Stage2State:
    params = self.gpt.init(rng, jnp.zeros((1, self.seq_len), jnp.int32))["params"]
    return Stage2State(params=params, trainer=TrainerState(
        step=jnp.zeros((), jnp.int32), opt_state=self.tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32)))

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
      inputs = conditioning.corrupt_image_tokens(tokens, self.prefix_len, self.layout.n_codes,
                                    self.config.pkeep, corrupt_key)[:, :-1]
      targets = tokens[:, 1:]
      mask = jnp.broadcast_to(self.loss_mask[None], targets.shape)

      def loss_fn(params):
        logits = self.gpt.apply({"params": params}, inputs, train=True,
                                rngs={"dropout": dropout_key})
        loss, _ = losses.token_cross_entropy(logits, targets, mask)
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
    loss, count = losses.token_cross_entropy(logits, targets, mask)
    image = tokens[:, self.prefix_len:]
    weights = jnp.broadcast_to(example_mask[:, None], image.shape).astype(jnp.float32)
    counts = jnp.zeros((self.layout.n_codes,), jnp.float32).at[image.reshape(-1)].add(
        weights.reshape(-1))
    return {"nll_sum": loss * count, "count": count}, counts

  def count_step(self, batch, frozen, key):
    """Per-code counts of the (cropped) training image tokens of one batch."""
    tokens = self.sequence(frozen, batch, key, train=False)
    return jnp.bincount(tokens[:, self.prefix_len:].reshape(-1), length=self.layout.n_codes)


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
    self.first = first
    self.frozen = {"first": sharding.place(first.params, repl, abstract)}
    if cond is not None:
      self.frozen["cond"] = sharding.place(cond.params, repl, abstract)
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
    self._sequences = jax.jit(
        traced(lambda frozen_params, batch, key: self.setup.sequence(
            frozen_params, batch, key, train=False)),
        in_shardings=(repl, self.batch_sharding, repl), out_shardings=self.batch_sharding)

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

  def sample_images(self, params, batch, count: int, key) -> Tuple[np.ndarray, np.ndarray]:
    """(samples, originals), each (count, H, W, C) in [-1, 1]: the GPT's image tokens drawn
    after the condition prefixes of the first `count` examples of a val batch (their class,
    map codes or crop origin), decoded by the frozen VQGAN, with those examples' own
    images (decoded from their tokens). For TensorBoard at each evaluation."""
    setup = self.setup
    sequences = self._sequences(self.frozen, self.select(batch, True), key)
    rows = np.asarray(sharding.host_array(sequences))[:count]
    prefix = jnp.asarray(rows[:, :setup.prefix_len], jnp.int32)
    s = self.config.sampling
    tokens = sampling.sample({"params": params}, setup.gpt, prefix,
                             setup.window[0] * setup.window[1], jax.random.fold_in(key, 1),
                             temperature=float(s.temperature), top_k=int(s.top_k) or None,
                             top_p=float(s.top_p) or None, num_image_codes=setup.layout.n_codes)
    real = jnp.asarray(rows[:, setup.prefix_len:], jnp.int32)
    return tuple(np.asarray(generation.decode_rows(self.first, self.frozen["first"], t,
                                                   setup.window)) for t in (tokens, real))

  def token_counts(self, batches) -> np.ndarray:
    counts = np.zeros((self.setup.layout.n_codes,), np.int64)
    base = jax.random.PRNGKey(self.config.seed + 2)
    for i, batch in enumerate(batches):
      counts += np.asarray(jax.device_get(
          self._count(self.select(batch), self.frozen, jax.random.fold_in(base, i))), np.int64)
    return counts


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
  if not config.tokens_dir:
    data.dataset_info(config.data)  # a missing or empty source fails before the workdir
  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(workdir, config.max_checkpoints_to_keep,
                                       config.async_checkpointing)
  saved, first_step, cond_step = _resolve_steps(config, workdir, manager)
  first, cond = handoff.load_frozen_stages(config, mesh, first_step, cond_step)
  first_record = handoff.frozen_record(workdir, config.first_stage.workdir, first)
  cond_record = (handoff.frozen_record(workdir, config.cond.cond_stage_workdir, cond)
                 if cond is not None else None)
  exported = handoff.check_exported_tokens(config, first, cond) if config.tokens_dir else {}
  val_from_tokens = exported.get("validation") is not None
  if config.tokens_dir and not val_from_tokens:
    logging.warning("%s has no exported validation split: evaluating on the images of "
                    "config.data", config.tokens_dir)
  num_classes = handoff.resolve_num_classes(config)
  if config.cond.kind == "class" and (config.data.name != "tfds" or config.tokens_dir):
    available = handoff.available_classes(config)
    if available > num_classes:
      raise config_lib.ConfigError(
          f"config.cond.num_classes={num_classes} but the dataset has {available} classes")
  setup_layout = conditioning.layout_for(config, first.n_embed, cond.n_embed if cond else 0, num_classes)
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
      metrics["unigram_entropy_bits"] = metrics_lib.code_entropy(train_counts)
      metrics["val_unigram_bits_per_token"] = metrics_lib.unigram_cross_entropy_bits(train_counts,
                                                                         val_counts)
    writer.write_scalars(step, metrics)
    logging.info("eval step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    # Single-process runs only: the sampler here takes host arrays (multi-host runs sample
    # with `python -m vqgan_jax.sample`, which splits the batch over the mesh).
    count = int(config.get("eval_samples", 0)) if jax.process_count() == 1 else 0
    if count > 0:
      batch = next(iter(_eval_batches(config, val_from_tokens)))
      count = min(count, int(batch["mask"].sum()))
      samples, originals = runner.sample_images(state.params, batch, count,
                                                jax.random.PRNGKey(config.seed + 3))
      if jax.process_index() == 0:
        grid = visualize.make_grid([originals, samples],
                                   row_labels=["val tokens", f"sample {step}"])
        writer.write_images(step, {"val_samples": grid[None]})
    return metrics

  def save_checkpoint(step, state, force=False):
    meta = stage2_metadata(config, setup, step, first_record, cond_record)
    checkpointing.guarded_save(manager, workdir, step, state.params, state.trainer, meta,
                               train_iter, force=force)

  def window_scalars(step, fetched, state):
    del fetched, state
    return {"learning_rate": float(optim.schedule(config)(step))}

  _, last_eval = train_loop.run(
      config, workdir=workdir, manager=manager, writer=writer, state=state,
      start_step=start_step, train_step=lambda state, batch, _: runner.train_step(state, batch),
      train_iter=train_iter, run_eval=run_eval, save_checkpoint=save_checkpoint,
      window_scalars=window_scalars, log_keys=("loss",))
  return last_eval



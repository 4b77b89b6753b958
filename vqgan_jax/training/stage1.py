"""Stage-1 trainer: the VQGAN (generator + PatchGAN discriminator) end to end.

`train_and_evaluate(config, workdir)` is the whole job: build the mesh and models,
resume from the newest checkpoint in `workdir` if there is one, train with one jitted
step per optimiser phase, log to TensorBoard, write reconstruction grids, evaluate on
the val split and save checkpoints that stage 2 loads with `checkpointing.load_stage1`.

The generator step makes one forward pass and one backward pass: `jax.vjp` of the model
gives the reconstruction and the decoder's last-layer input; the adaptive GAN weight
needs the gradients of the reconstruction loss and of the GAN loss at the decoder's
last layer, which are weight gradients of a single convolution given the two
cotangents, so they cost one small convolution each instead of two extra backward
passes through the whole decoder.

Training order (as the reference's two optimisers in one batch): the generator is
updated first, then the discriminator trains on a reconstruction of the *updated*
generator, a second forward pass without gradients. `loss.disc_on_stale_reconstructions`
trains it on the first pass's (pre-update) reconstruction instead, which saves that
forward pass (docs/stage1.md#training-order).
"""

# Over 500 lines on purpose: the stage-1 step (generator, adaptive weight, discriminator,
# dead-code restart), its runner and its loop are one trainer, as in flax's examples.

import functools
import os
from typing import Any, Dict

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vqgan_jax import checkpointing, config_lib, data, handoff, losses
from vqgan_jax import metrics as metrics_lib
from vqgan_jax import sharding, visualize
from vqgan_jax.models import discriminator as discriminator_lib
from vqgan_jax.models import lpips, vqgan
from vqgan_jax.training import loop as train_loop
from vqgan_jax.training import optim
from vqgan_jax.training import utils as train_utils


@flax.struct.dataclass
class TrainerState:
  """Everything but the generator parameters that an exact resume needs."""
  step: jax.Array
  g_opt_state: Any
  d_params: Any
  d_batch_stats: Any
  d_opt_state: Any
  code_usage_ema: jax.Array   # per-code EMA of hits per step (dead-code restarts)
  nonfinite_steps: jax.Array  # steps skipped because of a NaN/Inf


@flax.struct.dataclass
class Stage1State:
  g_params: Any
  trainer: TrainerState


# Path of the VQ codebook in the generator's params (the one row-wise trained table).
CODEBOOK_PATH = ("quantize", "embedding")


def _key_name(entry) -> Any:
  """The name of one entry of a pytree key path (dict key, attribute, sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def reset_optimizer_rows(opt_state, param_path, shape, rows: jax.Array):
  """The optimiser state with rows `rows` (bool, (shape[0],)) of one parameter's
  per-parameter statistics set to zero.

  optax keeps per-parameter statistics (Adam's mu and nu) as trees shaped like the
  params, nested in the state of a chain (a tuple), of optax.masked (inner_state) or
  clipping (whose state holds no param trees), so this does not look the leaf up by one
  fixed structure: it maps over the whole state and zeroes the rows of every leaf whose
  key path ends with `param_path` and whose shape is `shape`. Other leaves, among them
  Adam's scalar step count (shared by all parameters, so not reset: a reset row's first
  update is then (1 - b1) g / sqrt((1 - b2) g^2), about 1.6 x lr at b1 = 0.5,
  b2 = 0.9, instead of Adam's lr), pass unchanged.
  """
  param_path, shape = tuple(param_path), tuple(shape)

  def reset(path, leaf):
    names = tuple(_key_name(e) for e in path)
    if names[-len(param_path):] != param_path or getattr(leaf, "shape", None) != shape:
      return leaf
    mask = rows.reshape((-1,) + (1,) * (len(shape) - 1))
    return jnp.where(mask, jnp.zeros_like(leaf), leaf)

  return jax.tree_util.tree_map_with_path(reset, opt_state)


class Stage1Setup:
  """Models, optimisers and pure step functions for one config (no devices, no I/O)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    dtype = config_lib.compute_dtype(config)
    self.model = vqgan.vqmodel_from_config(config.model, dtype)
    self.disc = discriminator_lib.NLayerDiscriminator(
        ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers,
        norm=config.loss.disc_norm, dtype=dtype)
    lr = optim.learning_rate(config)
    self.g_tx = optim.make_adam(config, lr)
    self.d_tx = optim.make_adam(config, lr)
    self.rng = jax.random.PRNGKey(config.seed)
    # Set by Stage1Runner: with a batch split over several devices, code counts are
    # per-device bincounts added by one psum (sharding.sharded_code_counts).
    self.mesh = None

  def init_state(self, rng: jax.Array) -> Stage1State:
    size = self.config.model.resolution
    x = jnp.zeros((1, size, size, self.config.model.in_channels), jnp.float32)
    g_key, d_key = jax.random.split(rng)
    g_variables = self.model.init(g_key, x)
    # g_params is the stored tree: params plus, for vq_ema/simvq, the quantizer's
    # "vq_stats" collection (vqgan.split_state); the optimiser sees the params only.
    g_params = vqgan.stored_params(g_variables)
    d_vars = self.disc.init(d_key, x, train=False)
    trainer = TrainerState(
        step=jnp.zeros((), jnp.int32),
        g_opt_state=self.g_tx.init(g_variables["params"]),
        d_params=d_vars["params"],
        d_batch_stats=d_vars.get("batch_stats", {}),
        d_opt_state=self.d_tx.init(d_vars["params"]),
        code_usage_ema=jnp.full((self.config.model.n_embed,), 1.0, jnp.float32),
        nonfinite_steps=jnp.zeros((), jnp.int32))
    return Stage1State(g_params=g_params, trainer=trainer)

  # ------------------------------------------------------------------ losses
  def _disc_apply(self, d_params, batch_stats, images):
    variables = {"params": d_params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
      logits, updates = self.disc.apply(variables, images, train=True, mutable=["batch_stats"])
      return logits, updates["batch_stats"]
    return self.disc.apply(variables, images, train=True), batch_stats

  def generator_gradients(self, g_params, trainer: TrainerState, x, lpips_params, rng,
                          use_gan: bool):
    """Gradients of the generator's total loss and its parts (one forward, one backward).

    `g_params` is the stored tree (vqgan.split_state); the gradients are those of its
    trainable params only. With a quantizer state (vq_ema, simvq) the forward applies
    with the "vq_stats" collection mutable and `out["vq_stats"]` is the updated one.
    """
    cfg = self.config.loss
    g_params, vq_stats = vqgan.split_state(g_params)

    def forward(params):
      if not vq_stats:
        out = self.model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
      else:
        out, updated = self.model.apply({"params": params, vqgan.STATE_KEY: vq_stats}, x,
                                        train=True, rngs={"dropout": rng},
                                        mutable=[vqgan.STATE_KEY])
        out = dict(out, vq_stats=jax.lax.stop_gradient(updated[vqgan.STATE_KEY]))
      return (out["x_rec"], out["features"], out["q_loss"]), out

    (x_rec, features, q_loss), model_vjp, out = jax.vjp(forward, g_params, has_aux=True)

    def nll_fn(x_rec):
      rec = losses.pixel_loss(x, x_rec, cfg.pixel_loss)
      perceptual = jnp.zeros((), jnp.float32)
      if cfg.perceptual_weight > 0:
        pad = int(cfg.get("perceptual_pad", 0))
        if pad:  # reflect both images, so that VGG's zero padding lies outside them
          x_p, x_rec_p = (jnp.pad(a, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
                          for a in (x, x_rec))
        else:
          x_p, x_rec_p = x, x_rec
        perceptual = jnp.mean(lpips.lpips_distance(lpips_params, x_p, x_rec_p))
      return rec + cfg.perceptual_weight * perceptual, (rec, perceptual)

    nll, nll_vjp, (rec, perceptual) = jax.vjp(nll_fn, x_rec, has_aux=True)
    ct_nll, = nll_vjp(jnp.ones_like(nll))
    metrics = {"rec_loss": rec, "perceptual_loss": perceptual, "nll_loss": nll, "q_loss": q_loss}
    metrics.update(out.get("q_metrics", {}))  # lfq: commit_loss and the entropies
    ct_x = ct_nll
    total = nll + cfg.codebook_weight * q_loss
    if use_gan:
      def g_fn(x_rec):
        logits, _ = self._disc_apply(trainer.d_params, trainer.d_batch_stats, x_rec)
        return losses.generator_adversarial_loss(logits)

      g_loss, g_vjp = jax.vjp(g_fn, x_rec)
      ct_g, = g_vjp(jnp.ones_like(g_loss))
      conv_out = g_params["decoder"]["conv_out"]
      if cfg.adaptive_weight:
        _, kernel_vjp = jax.vjp(
            lambda k: vqgan.conv_out_apply(k, conv_out["bias"], features), conv_out["kernel"])
        d_weight = losses.adaptive_weight(kernel_vjp(ct_nll)[0], kernel_vjp(ct_g)[0],
                                          cfg.disc_weight)
      else:
        d_weight = jnp.asarray(cfg.disc_weight, jnp.float32)
      scale = d_weight * cfg.disc_factor
      ct_x = ct_nll + scale * ct_g
      total = total + scale * g_loss
      metrics.update(g_loss=g_loss, d_weight=d_weight)
    grads, = model_vjp((ct_x, jnp.zeros_like(features),
                        jnp.asarray(cfg.codebook_weight, q_loss.dtype)))
    metrics["total_loss"] = total
    return grads, x_rec, out, metrics

  def reconstruct(self, g_params, x, rng):
    """The generator's reconstruction of x as in a training forward, without gradients.

    For the discriminator step of the reference order (the updated generator's output).
    train=True as in the generator's pass (dropout with `rng`), but the quantizer state
    is read, not updated: vq_ema's EMA advances once per step, in the generator pass.
    """
    out = self.model.apply(vqgan.as_variables(g_params), x, train=True,
                           rngs={"dropout": rng})
    return jax.lax.stop_gradient(out["x_rec"])

  def discriminator_gradients(self, trainer: TrainerState, x, x_rec):
    cfg = self.config.loss

    def loss_fn(d_params):
      logits_real, stats = self._disc_apply(d_params, trainer.d_batch_stats, x)
      logits_fake, stats = self._disc_apply(d_params, stats, jax.lax.stop_gradient(x_rec))
      loss = cfg.disc_factor * losses.discriminator_loss(logits_real, logits_fake, cfg.disc_loss)
      return loss, (stats, jnp.mean(logits_real), jnp.mean(logits_fake))

    (d_loss, (stats, real, fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainer.d_params)
    return grads, stats, {"d_loss": d_loss, "logits_real": real, "logits_fake": fake}

  # ------------------------------------------------------------------ step
  def train_step(self, state: Stage1State, batch: Dict[str, jax.Array], lpips_params,
                 use_gan: bool):
    """One update of the generator (and of the discriminator once the GAN is on).

    Order: the generator's gradients (one forward, one backward), its Adam update and,
    if on, the dead-code restart; then, with the GAN on, the discriminator's gradients
    on a reconstruction of the generator as it leaves this step (a second, gradient-free
    forward pass with the new params and quantizer state): the reference's order, where
    Lightning runs optimizer_idx 0 (generator) and then 1 (discriminator, on a fresh
    `self(x)`) on the same batch. With loss.disc_on_stale_reconstructions the
    discriminator trains on the first pass's reconstruction instead, from before the
    update, which saves the second forward pass. `use_gan` is static (one compiled
    step per value), so before disc_start neither order costs anything extra.

    With config.grad_accum_steps = k > 1 the batch runs as k micro-batches: each computes
    its own losses and adaptive weight (as the reference does under gradient
    accumulation), the discriminator's BatchNorm statistics and the quantizer's state
    (vq_ema's EMA codebook) pass from one to the next, and the averaged gradients make
    one update of each network (in the reference order the discriminator's micro-batches
    are a second pass over the same k micro-batches, after the generator's update). The
    quantizer state is never seen by the optimiser: it takes the value the last
    micro-batch's forward left (on a skipped non-finite step, the old one).
    """
    trainer = state.trainer
    rng = jax.random.fold_in(self.rng, trainer.step)
    steps = int(self.config.get("grad_accum_steps", 1))
    params, vq_stats = vqgan.split_state(state.g_params)
    stale = bool(self.config.loss.get("disc_on_stale_reconstructions", False))

    def micro_key(index):
      # One micro-batch keeps the step's key; several get keys of their own, drawn from
      # a branch that no other use of the step's key shares.
      return rng if steps == 1 else jax.random.fold_in(jax.random.fold_in(rng, 7), index)

    def micro_step(micro_batch, index, carry):
      d_stats, vq_stats = carry
      key = micro_key(index)
      x = handoff.model_inputs(micro_batch, self.config)
      micro_trainer = trainer.replace(d_batch_stats=d_stats)
      g_grads, x_rec, out, metrics = self.generator_gradients(
          vqgan.with_state(params, vq_stats), micro_trainer, x, lpips_params, key, use_gan)
      vq_stats = out.get("vq_stats", vq_stats)
      grads = {"g": g_grads}
      if use_gan and stale:
        grads["d"], d_stats, d_metrics = self.discriminator_gradients(micro_trainer, x, x_rec)
        metrics.update(d_metrics)
      metrics["code_counts"] = sharding.sharded_code_counts(
          out["indices"], self.config.model.n_embed, self.mesh)
      return grads, metrics, (d_stats, vq_stats), out["z_lookup"]

    grads, metrics, (d_stats, vq_stats), z_lookup = train_utils.accumulate(
        micro_step, batch, steps, (trainer.d_batch_stats, vq_stats))
    g_grads = grads["g"]
    g_updates, g_opt_state = self.g_tx.update(g_grads, trainer.g_opt_state, params)
    g_params = optax.apply_updates(params, g_updates)

    counts = metrics.pop("code_counts")
    usage_ema = (self.config.model.dead_code_decay * trainer.code_usage_ema
                 + (1.0 - self.config.model.dead_code_decay) * counts.astype(jnp.float32))
    if self.config.model.restart_dead_codes:
      g_params, g_opt_state, usage_ema, restarted = self._restart_dead_codes(
          g_params, g_opt_state, usage_ema, z_lookup, jax.random.fold_in(rng, 1))
      metrics["codes_restarted"] = restarted
    g_params = vqgan.with_state(g_params, vq_stats)

    d_params, d_opt_state = trainer.d_params, trainer.d_opt_state
    finite_parts = [optax.global_norm(g_grads)]
    if use_gan:
      if not stale:
        def disc_micro_step(micro_batch, index, d_stats):
          x = handoff.model_inputs(micro_batch, self.config)
          # Its own dropout key (fold_in(key, 2): no other use of the step's keys).
          x_rec = self.reconstruct(g_params, x, jax.random.fold_in(micro_key(index), 2))
          d_grads, d_stats, d_metrics = self.discriminator_gradients(
              trainer.replace(d_batch_stats=d_stats), x, x_rec)
          return d_grads, d_metrics, d_stats, ()

        grads["d"], d_metrics, d_stats, _ = train_utils.accumulate(
            disc_micro_step, batch, steps, d_stats)
        metrics.update(d_metrics)
      d_updates, d_opt_state = self.d_tx.update(grads["d"], trainer.d_opt_state,
                                                trainer.d_params)
      d_params = optax.apply_updates(trainer.d_params, d_updates)
      finite_parts.append(optax.global_norm(grads["d"]))

    finite = jnp.all(jnp.isfinite(jnp.stack(
        [metrics["total_loss"]] + finite_parts + ([metrics["d_loss"]] if use_gan else []))))
    new_state = Stage1State(
        g_params=g_params,
        trainer=TrainerState(step=trainer.step + 1, g_opt_state=g_opt_state, d_params=d_params,
                             d_batch_stats=d_stats, d_opt_state=d_opt_state,
                             code_usage_ema=usage_ema, nonfinite_steps=trainer.nonfinite_steps))
    # A non-finite step leaves parameters and optimiser states as they were, so nothing
    # non-finite can reach a checkpoint; the host decides whether to stop or go on.
    skipped = Stage1State(
        g_params=state.g_params,
        trainer=trainer.replace(step=trainer.step + 1, nonfinite_steps=trainer.nonfinite_steps + 1))
    new_state = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new_state, skipped)
    metrics["finite"] = finite
    metrics["code_counts"] = counts
    return new_state, metrics

  def _restart_dead_codes(self, g_params, g_opt_state, usage_ema, z_lookup, rng):
    """Replaces codes whose usage EMA fell below the threshold by distinct batch latents.

    Runs after the Adam update. Each dead code gets the latent (in lookup space) of its
    own batch position: the positions are a random permutation of all the step's latent
    positions (every micro-batch's), so no two codes restarted together start from the
    same position, and two restarted codes are equal only if the batch holds equal
    latents at two positions (say, a flat image region). With fewer latent positions
    than dead codes, a random subset of as many dead codes as there are positions
    restarts; the others keep their low usage EMA and restart at a later step.

    A restarted row's Adam moments are reset to zero (`reset_optimizer_rows`): they are
    the statistics of the gradients of the abandoned code, and kept they would push the
    new one along the old code's drift for the next ~1 / (1 - b1) steps.

    Returns (params, optimiser state, usage EMA, number of codes restarted).
    """
    m = self.config.model
    candidates = z_lookup.reshape(-1, z_lookup.shape[-1]).astype(jnp.float32)
    n = candidates.shape[0]
    code_key, latent_key = jax.random.split(rng)
    dead = usage_ema < m.dead_code_threshold
    # Rank of each dead code in a random order of the codes: dead codes 0, 1, 2, ... in
    # that order take permuted positions 0, 1, 2, ...; ranks >= n wait.
    order = jax.random.permutation(code_key, m.n_embed)
    rank = jnp.zeros((m.n_embed,), jnp.int32).at[order].set(
        jnp.cumsum(dead[order].astype(jnp.int32)) - 1)
    restart = dead & (rank < n)
    positions = jax.random.permutation(latent_key, n)[jnp.clip(rank, 0, n - 1)]
    codebook = g_params["quantize"]["embedding"]
    new_codebook = jnp.where(restart[:, None], candidates[positions], codebook)
    # A restarted code gets a fresh usage estimate so it is not restarted again at once.
    usage_ema = jnp.where(restart, 1.0, usage_ema)
    g_params = flax.core.copy(g_params, {}) if isinstance(g_params, flax.core.FrozenDict) else dict(g_params)
    quantize = dict(g_params["quantize"])
    quantize["embedding"] = new_codebook.astype(codebook.dtype)
    g_params["quantize"] = quantize
    g_opt_state = reset_optimizer_rows(g_opt_state, CODEBOOK_PATH, codebook.shape, restart)
    return g_params, g_opt_state, usage_ema, jnp.sum(restart)

  def eval_step(self, g_params, batch, lpips_params):
    """Per-example reconstruction metrics (masked sums) and code counts on a val batch."""
    x = handoff.model_inputs(batch, self.config)
    mask = batch.get("mask", jnp.ones(x.shape[:1], bool)).astype(jnp.float32)
    out = self.model.apply(vqgan.as_variables(g_params), x, train=False)
    x_rec = jnp.clip(out["x_rec"], -1.0, 1.0)
    diff = x - x_rec
    l1 = jnp.mean(jnp.abs(diff), axis=(1, 2, 3))
    mse = jnp.mean(diff * diff, axis=(1, 2, 3))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))  # data range 2 for [-1, 1]
    sums = {"l1": l1, "mse": mse, "psnr": psnr}
    if min(x.shape[1:3]) > 4:
      sums["border_ratio"] = metrics_lib.border_ratio(x, x_rec)
    if lpips_params is not None:
      sums["lpips"] = lpips.lpips_distance(lpips_params, x, x_rec)
    sums = {k: jnp.sum(v * mask) for k, v in sums.items()}
    sums["count"] = jnp.sum(mask)
    weights = jnp.broadcast_to(mask[:, None, None], out["indices"].shape).reshape(-1)
    counts = jnp.zeros((self.config.model.n_embed,), jnp.float32).at[
        out["indices"].reshape(-1)].add(weights)
    return sums, counts, x_rec


def gan_active(config, step: int) -> bool:
  """The GAN terms (generator's and discriminator's) are on from step disc_start."""
  return step >= config.loss.disc_start


def _lpips_params(config):
  if config.loss.perceptual_weight <= 0:
    return None
  return lpips.load_lpips_params()


class Stage1Runner:
  """A Stage1Setup placed on a mesh: compiled steps, shardings, checkpoint I/O.

  abstract=True builds the same jitted steps without touching devices or weight files
  (frozen LPIPS parameters as shapes), for `python -m vqgan_jax.dry_run --topology ...`.
  """

  def __init__(self, config, mesh=None, abstract: bool = False):
    self.setup = Stage1Setup(config)
    self.config = config
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self.setup.mesh = self.mesh
    abstract_state = jax.eval_shape(self.setup.init_state, self.setup.rng)
    self.state_shardings = sharding.tree_shardings(abstract_state, self.mesh,
                                                   sharding.VQGAN_RULES)
    self.abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        self.state_shardings)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    replicated = sharding.replicated(self.mesh)
    self.lpips_params = None
    if config.loss.perceptual_weight > 0:
      self.lpips_params = sharding.place(lpips.abstract_params() if abstract else _lpips_params(config),
                                replicated, abstract)
    traced = functools.partial(sharding.under_mesh, mesh=self.mesh)
    self._init = jax.jit(self.setup.init_state, out_shardings=self.state_shardings)
    # The jitted steps, public for ahead-of-time compilation (dry_run): train[use_gan]
    # (state, batch, lpips_params) and eval (g_params, batch, lpips_params).
    self.jitted_train = {
        use_gan: jax.jit(traced(functools.partial(self.setup.train_step, use_gan=use_gan)),
                         in_shardings=(self.state_shardings, self.batch_sharding, replicated),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
        for use_gan in (False, True)}
    self.jitted_eval = jax.jit(traced(self.setup.eval_step),
                               in_shardings=(self.state_shardings.g_params, self.batch_sharding,
                                             replicated),
                               out_shardings=(replicated, replicated, self.batch_sharding))

  def init_state(self) -> Stage1State:
    return self._init(self.setup.rng)

  def train_step(self, state, batch, step: int):
    return self.jitted_train[gan_active(self.config, step)](state, batch, self.lpips_params)

  def evaluate(self, g_params, eval_batches, keep_images: int = 16):
    """Mean val metrics over the given global batches, plus a few reconstructions."""
    totals, counts, shown = None, None, ([], [])
    for batch in eval_batches:
      sums, batch_counts, x_rec = self.jitted_eval(g_params, batch, self.lpips_params)
      sums = jax.device_get(sums)
      totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
      counts = batch_counts if counts is None else counts + batch_counts
      if sum(len(a) for a in shown[0]) < keep_images:  # same answer on every process
        shown[0].append(sharding.host_array(handoff.model_inputs(batch, self.config)))
        shown[1].append(sharding.host_array(x_rec))
    if totals is None:
      raise ValueError("the val split is empty: nothing to evaluate")
    n = max(float(totals.pop("count")), 1.0)
    metrics = {f"val_{k}": float(v) / n for k, v in totals.items()}
    counts = np.asarray(jax.device_get(counts))
    metrics.update(metrics_lib.code_statistics(counts, prefix="val_"))
    originals = np.concatenate(shown[0])[:keep_images] if shown[0] else None
    recons = np.concatenate(shown[1])[:keep_images] if shown[1] else None
    return metrics, originals, recons


def eval_batches(config, mesh, batch_size: int):
  """Global val batches of `config.data` (at most config.num_eval_batches; 0 = all)."""
  per_process = batch_size // jax.process_count()
  iterator = data.make_eval_iterator(config.data, batch_size=per_process,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
  for i, batch in enumerate(iterator):
    if config.num_eval_batches and i >= config.num_eval_batches:
      break
    yield sharding.global_batch(batch, mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains (or resumes) a VQGAN in `workdir`; returns the last evaluation's metrics."""
  config_lib.validate_vqgan_config(config)
  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(config.mesh)
  config_lib.validate_batch_sizes(config, mesh)
  data.dataset_info(config.data)  # a missing or empty source fails before the workdir is touched
  runner = Stage1Runner(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(workdir, config.max_checkpoints_to_keep,
                                       config.async_checkpointing)
  start_step = manager.latest_step()
  if start_step is not None:
    saved = checkpointing.read_metadata(manager, start_step)
    checkpointing.check_same_model(saved["config"]["model"],
                                   checkpointing.config_to_dict(config)["model"], workdir,
                                   force=config.get("force_resume", False))

  def make_train_iter(seed):
    return data.make_train_iterator(
        config.data, batch_size=config.batch_size // jax.process_count(), seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  state, start_step, train_iter, writer = train_loop.restore_or_start(
      config, manager, workdir, make_train_iter=make_train_iter,
      abstract_model=runner.abstract_state.g_params,
      abstract_trainer=runner.abstract_state.trainer, init_state=runner.init_state,
      make_state=lambda model, trainer: Stage1State(g_params=model, trainer=trainer))
  is_main = jax.process_index() == 0

  def save_checkpoint(step, state, force=False):
    meta = checkpointing.stage1_metadata(config, step)
    checkpointing.guarded_save(manager, workdir, step, state.g_params, state.trainer, meta,
                               train_iter, force=force)

  def run_eval(step, state):
    metrics, originals, recons = runner.evaluate(state.g_params, eval_batches(
        config, mesh, config.eval_batch_size))
    writer.write_scalars(step, metrics)
    if originals is not None and is_main:
      grid = visualize.make_grid([originals, np.clip(recons, -1, 1)],
                                 row_labels=["original", f"step {step}"])
      visualize.save_png(os.path.join(workdir, "images", f"reconstructions_{step:07d}.png"), grid)
      writer.write_images(step, {"val_reconstructions": grid[None]})
    return metrics

  code_counts = np.zeros((config.model.n_embed,), np.int64)

  def step_fn(state, batch, step):
    return runner.train_step(state, sharding.global_batch(batch, mesh), step)

  def window_scalars(step, fetched, state):
    del step, state
    for m in fetched:
      code_counts[:] += np.asarray(m["code_counts"], np.int64)
    scalars = metrics_lib.code_statistics(code_counts, prefix="train_")
    code_counts[:] = 0
    scalars["learning_rate"] = optim.learning_rate(config)
    return scalars

  _, last_eval = train_loop.run(
      config, workdir=workdir, manager=manager, writer=writer, state=state,
      start_step=start_step, train_step=step_fn, train_iter=train_iter, run_eval=run_eval,
      save_checkpoint=save_checkpoint, window_scalars=window_scalars,
      log_keys=("rec_loss",) + (("perceptual_loss",) if config.loss.perceptual_weight > 0
                                else ()) + ("q_loss", "g_loss", "d_loss"))
  return last_eval

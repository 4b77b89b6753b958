"""Stage-2 evaluation: bits/token on the val tokens and metrics of generated samples.

`evaluate_stage2` loads the workdir with `vqgan_jax.handoff.load_stage2` (its VQGAN as
recorded, or first_stage_workdir) and evaluates, through `Stage2Adapter`, any object with
this interface (the tests pass stand-ins as `model=`):
  .step                                  int
  .eval_token_batches(batch_size)        iterable of val token batches
  .token_logits(batch)                   -> (logits (B, L, V), targets (B, L), weights
                                            (B, L) or None): bits/token on the val tokens
  .generate_images(rng, num_samples, batch_size)
                                         iterable of (b, H, W, 3) images in [-1, 1], or
                                            of {"image": ..., "mask": (b,)} (padding
                                            rows masked out): FID, IS, KID,
                                            precision/recall
On a stage-2 checkpoint the samples are drawn on every device of the mesh
(`config.mesh`; with several processes each draws its devices' rows): each batch of
batch_size samples is one global array split over data x fsdp, decoded and fed to
Inception where it lies, and only the Inception features are gathered for FID/IS/KID.
Sample n is keyed by its index, so the samples do not depend on the device count.
The batch size is checked against the mesh (a multiple of data x fsdp and of the process
count) before anything is restored or compiled.
"""

import functools
import itertools
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import conditioning, data, generation, handoff, sharding, visualize
from vqgan_jax.evaluation import common


@functools.lru_cache(maxsize=None)
def _nll_sums_fn():

  @jax.jit
  def nll_sums(logits, targets, weights):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    weights = weights.astype(jnp.float32)
    # Per-token values; the host sums them in float64 (a float32 sum over many tokens
    # drifts by ~1e-6 relative).
    return nll * weights, weights

  return nll_sums


def token_nll_sums(logits, targets, weights=None) -> Tuple[float, float]:
  """(sum of -log p(target) in nats, sum of weights) for logits (..., V), targets (...)."""
  targets = jnp.asarray(targets)
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else jnp.asarray(weights)
  nll, weights = _nll_sums_fn()(jnp.asarray(logits), targets, weights)
  return (float(np.sum(common.gather(nll), dtype=np.float64)),
          float(np.sum(common.gather(weights), dtype=np.float64)))


def bits_per_token(logits_fn: Callable, batches: Iterable[Any]) -> Dict[str, float]:
  """Mean negative log-likelihood of the target tokens, in bits (and nats, perplexity).

  `logits_fn(batch) -> (logits (B, L, V), targets (B, L), weights (B, L) or None)`;
  weights (e.g. 0 on padding examples) weight each token's loss.
  """
  total, count = 0.0, 0.0
  for batch in batches:
    logits, targets, weights = logits_fn(batch)
    t, n = token_nll_sums(logits, targets, weights)
    total += t
    count += n
  if count <= 0:
    raise common.EvalError("bits_per_token: no tokens (all weights zero or no batches)")
  nats = total / count
  return {"bits_per_token": nats / math.log(2.0), "nll_nats_per_token": nats,
          "token_perplexity": math.exp(nats), "num_tokens": int(round(count))}


class Stage2Adapter:
  """Gives a `handoff.Stage2Model` the interface `evaluate_stage2` uses.

  Bits/token use the trainer's own sequence construction (condition prefix, the fixed
  pseudo-random eval crop of `crop_tokens` models, keys as in Stage2Runner.evaluate), so
  the number matches the trainer's val_bits_per_token on the same batches. Samples are
  drawn with `generation.token_batches` (the checkpoint's `sampling` options: temperature,
  top-k/p, guidance) for unconditional and class-conditional models (labels cycled over
  the classes), on every device of the mesh, and decoded there; spatial and coordinate
  conditioning sample from the val split's condition maps and from uniformly drawn crop
  origins (see condition_prefix).
  """

  def __init__(self, loaded, mesh):
    self.loaded = loaded
    self.step = int(loaded.step)
    self.mesh = mesh
    self._setup = None
    self._logits_fn = None
    self._calls = 0

  def _prepare(self):
    if self._setup is not None:
      return
    loaded = self.loaded
    setup = handoff.Stage2Sequences(loaded.config, loaded.first_stage, loaded.cond_stage,
                                 num_classes=loaded.layout.num_classes)
    repl = sharding.replicated(self.mesh)
    self._frozen = {"first": jax.device_put(loaded.first_stage.params, repl)}
    if loaded.cond_stage is not None:
      self._frozen["cond"] = jax.device_put(loaded.cond_stage.params, repl)
    self._params = jax.device_put(loaded.params, repl)

    def logits_fn(params, batch, frozen, key):
      tokens = setup.sequence(frozen, batch, key, train=False)
      logits = setup.gpt.apply({"params": params}, tokens[:, :-1], train=False)
      weights = setup.loss_mask[None, :] & batch["mask"].astype(bool)[:, None]
      return logits, tokens[:, 1:], weights.astype(jnp.float32)

    self._setup = setup
    self._logits_fn = jax.jit(logits_fn)
    self._base_key = jax.random.PRNGKey(loaded.config.seed + 1)

  def eval_token_batches(self, batch_size: int):
    """Global val batches with the keys the GPT's sequence needs, and 'mask'."""
    self._prepare()
    keys = self._setup.batch_keys() + ("mask",)
    for batch in common.val_batches(self.loaded.config.data, self.mesh, batch_size):
      yield {k: batch[k] for k in keys}

  def token_logits(self, batch):
    self._prepare()
    key = jax.random.fold_in(self._base_key, self._calls)
    self._calls += 1
    return self._logits_fn(self._params, batch, self._frozen, key)

  def condition_prefix(self, num_samples: int, seed: int = 0) -> np.ndarray:
    """(num_samples, P) condition tokens to sample from, per conditioning kind:
    unconditional: the start token; class: labels cycled over the classes; spatial: the
    val split's condition maps (cycled), centre window, encoded by the conditioning
    VQGAN; coord: crop origins drawn uniformly over the token grid (seeded)."""
    loaded, layout = self.loaded, self.loaded.layout
    if layout.kind == "none":
      return np.asarray(conditioning.condition_tokens(layout, num_samples))
    if layout.kind == "class":
      labels = (np.arange(num_samples) % layout.num_classes).astype(np.int32)
      return np.asarray(conditioning.condition_tokens(layout, num_samples, labels=labels))
    if layout.kind == "spatial":
      data_config = loaded.config.data
      codes = []
      while sum(len(c) for c in codes) < num_samples:
        before = len(codes)
        for batch in data.make_eval_iterator(data_config, batch_size=16):
          keep = np.asarray(batch["mask"], bool)
          grid = generation.encode_inputs(loaded.cond_stage,
                                          {"segmentation": batch["segmentation"][keep]})
          codes.append(generation.center_crop_tokens(grid, loaded.window)[0])
          if sum(len(c) for c in codes) >= num_samples:
            break
        if len(codes) == before:
          raise common.EvalError("the val split has no condition maps to sample from")
      cond = np.concatenate(codes)[:num_samples]
      return np.asarray(conditioning.condition_tokens(layout, num_samples, cond_codes=cond))
    grid, window = loaded.token_grid, loaded.window
    spans = (grid[0] - window[0], grid[1] - window[1])
    rng = np.random.default_rng(seed)
    origins = tuple(jnp.asarray(rng.integers(0, s + 1, num_samples)) for s in spans)
    return np.asarray(conditioning.condition_tokens(layout, num_samples, origins=origins,
                                                    spans=spans))

  def generate_images(self, rng, num_samples: int, batch_size: int):
    """Yields {"image": global (batch, H, W, 3) images split over the mesh's batch axes,
    "mask": (batch,) real samples (the last batch is padded)}, for every kind of
    conditioning (see condition_prefix)."""
    loaded = self.loaded
    self._prepare()
    opts = generation.SamplingOptions.from_config(loaded.config.get("sampling", {}),
                                                  batch_size=batch_size)
    prefix = self.condition_prefix(num_samples)
    for tokens, real in generation.token_batches(loaded, prefix, rng, opts, self.mesh,
                                                 params=self._params):
      images = generation.decode_rows(loaded.first_stage, self._frozen["first"], tokens,
                                      loaded.window)
      yield {"image": images, "mask": np.arange(images.shape[0]) < real}


def evaluate_stage2(config, workdir: str, *, step: Optional[int] = None,
                    num_samples: int = 1000, inception_weights: Optional[str] = None,
                    inception_sha256: Optional[str] = None,
                    reference_stats: Optional[str] = None, output_json: Optional[str] = None,
                    batch_size: Optional[int] = None, seed: int = 0,
                    feature_fn: Optional[Callable] = None, mesh=None,
                    write: bool = True, model=None,
                    first_stage_workdir: Optional[str] = None,
                    cond_stage_workdir: Optional[str] = None) -> Dict[str, Any]:
  """Bits/token on val tokens and sample metrics of a stage-2 workdir (see module doc).

  `model`: an object with Stage2Adapter's interface (step, eval_token_batches,
  token_logits, generate_images) to evaluate instead of the workdir's checkpoint.
  """
  start = time.time()
  sharding.maybe_initialize_distributed()
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  what = common.batch_setting(batch_size)
  batch_size = int(batch_size or config.get("eval_batch_size", 16))
  common.check_batch_size(batch_size, mesh, what)
  if num_samples < 0:
    raise common.EvalError(f"--num_samples={num_samples} must be >= 0 (0: no sample metrics)")

  weights_path = common.resolve_inception_weights(inception_weights)
  if feature_fn is None and weights_path is not None and num_samples > 0:
    feature_fn = common.make_inception_feature_fn(
        common.load_inception(weights_path, inception_sha256), mesh)
  ref_stats = common.load_reference_stats(reference_stats)

  if model is None:
    model = Stage2Adapter(handoff.load_stage2(
        workdir, step=step, first_stage_workdir=first_stage_workdir,
        cond_stage_workdir=cond_stage_workdir), mesh)
  step = int(model.step)
  results: Dict[str, Any] = {"stage": "transformer", "step": step,
                             "workdir": os.path.abspath(workdir)}
  results.update(bits_per_token(model.token_logits, model.eval_token_batches(batch_size)))

  samples = []
  if num_samples > 0:
    rng = jax.random.PRNGKey(seed)
    batches = model.generate_images(rng, num_samples, batch_size)
    try:
      batches = _peek(batches)
    except NotImplementedError as e:
      results["samples_skipped"] = f"not supported: {e}"
      batches = None
    if batches is None:
      pass
    elif feature_fn is None:
      results["fid_skipped"] = common.FID_SKIPPED_NO_WEIGHTS
      for batch in batches:  # still draw a few for the sample grid
        samples.append(_real_images(batch))
        break
    else:
      def keep_first(batches):
        for batch in batches:
          if sum(len(s) for s in samples) < 16:
            samples.append(_real_images(batch))
          yield batch
      fake_pool, fake_logits = common.collect_features(feature_fn, keep_first(batches), num_samples)
      real_pool = None
      if "data" in config and config.data.get("name"):
        real_pool, _ = common.collect_features(
            feature_fn, (b for b in common.val_batches(config.data, mesh, batch_size)))
      if ref_stats is None and real_pool is None:
        raise common.EvalError("FID needs --reference_stats or a config.data val split")
      results.update(common.generated_image_metrics(fake_pool, fake_logits,
                                                    real_pool=real_pool,
                                                    real_stats=ref_stats, seed=seed))
      results["fid_reference"] = (os.path.abspath(reference_stats) if ref_stats is not None
                                  else "val images")
  elif num_samples > 0:
    results["samples_skipped"] = "the stage-2 model has no generate_images"

  if write and jax.process_index() == 0:
    out_dir = os.path.join(workdir, "eval")
    if samples:
      grid = visualize.square_grid(np.concatenate(samples)[:64])
      results["sample_grid"] = visualize.save_png(
          os.path.join(out_dir, f"stage2_step{step}_samples.png"), grid)
    return common.finish_results(results, start,
                                 os.path.join(out_dir, f"stage2_step{step}.json"), output_json)
  return common.finish_results(results, start, None)


def _real_images(batch) -> np.ndarray:
  """The images of a generated batch (array or {"image", "mask"}) as numpy on every
  process, padding rows dropped (a collective with several processes)."""
  if not isinstance(batch, dict):
    return common.gather(batch)
  images = common.gather(batch["image"])
  return (images if batch.get("mask") is None
          else images[common.gather(batch["mask"]).astype(bool)])


def _peek(iterable):
  """Starts a generator (so errors raised before its first item surface here)."""
  iterator = iter(iterable)
  try:
    first = next(iterator)
  except StopIteration:
    return iter(())
  return itertools.chain([first], iterator)

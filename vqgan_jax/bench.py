r"""Benchmarks: step times, throughput, analytic FLOPs and MFU, printed as ONE JSON line.

  python -m vqgan_jax.bench --task stage1_step --config configs/vqgan_demo.py [--gan] [--steps 10] \
      [--[no]disc_on_stale_reconstructions] [--compare_disc_orders]
  python -m vqgan_jax.bench --task stage2_step [--config configs/transformer_default.py] \
      [--vocab_size 1024 --block_size 256 --n_layer 8 --n_head 8 --n_embd 512 --batch_size 8]
  python -m vqgan_jax.bench --task sample   [GPT flags as stage2_step]
  python -m vqgan_jax.bench --task conv
  python -m vqgan_jax.bench --task attention [--attention_length 256 --batch_size 8]
  python -m vqgan_jax.bench --task data [--config configs/vqgan_imagenet_f16_16384.py] \
      [--data_sources photos,folder,tfds --num_workers 0,2,8 --image_size 256] \
      [--data_folder DIR] [--tfds_name NAME --tfds_data_dir DIR] \
      [--global_batch B --step_seconds S --num_hosts H | --dry_run_json FILE] [--json OUT]

Config overrides use ml_collections syntax (`--config.batch_size=4`); the config is locked,
so a misspelt key is an error rather than a silently ignored field.

Every task prints one JSON object on stdout (logs go to stderr). Common fields:
  task, backend, device_kind, num_devices, jax_version, loadavg_start / loadavg_end
    (/proc/loadavg 1-min figure; timings taken under load > ~1 on a 2-core CPU are not
    representative), peak_flops_per_s, peak_source ("measured: f32 matmul NxN" on CPU,
    "table: ..." on accelerators; the tables hold dense bf16 peaks).
stage1_step / stage2_step add:
  compile_s (lower + compile), steps, warmup, step_s_median / step_s_min / step_s_max,
  examples_per_s, tokens_per_s (stage 2), flops_per_step (vqgan_jax.flops, analytic),
  achieved_flops_per_s = flops_per_step / step_s_median, mfu = achieved / peak.
stage1_step --gan adds disc_on_stale_reconstructions (the order timed); with
  --compare_disc_orders also `disc_orders`: {"updated": ..., "stale": ...} (median, min,
  max of step seconds, the two steps alternating) and "updated_over_stale".
sample adds `kv_vs_naive`, `per_token`, `long_sampling`, `batch_scaling`, `sliding_window`
and `train_steps` sections,
conv adds `shapes`; attention adds `kernels` (forward and gradient seconds of one layer's
causal attention per implementation); data adds `rows` (images/s per host of each input
source and worker count, through `data.make_train_iterator`) and `needed` (the images/s
per host the training step consumes on a target slice), and also prints them as a table on
stderr; see the functions below for their fields.

Timing: each step is dispatched, then blocked on (jax.block_until_ready) before the clock
stops; the first `warmup` executions are dropped. Train steps donate their state
(donate_argnums=0) and reuse one synthetic on-device batch, so data loading is excluded.
"""

# Over 500 lines on purpose: one command whose tasks share the timing, FLOP and JSON
# plumbing; each task is one banner section.

import contextlib
import copy
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from jax import lax
from ml_collections import config_flags
from PIL import Image

from vqgan_jax import cli
from vqgan_jax import config_lib, data
from vqgan_jax import flops as flops_lib
from vqgan_jax import handoff, sampling
from vqgan_jax.models import attention, layers, lpips
from vqgan_jax.models.transformer import GPT
from vqgan_jax.training import optim
from vqgan_jax.training import stage1 as stage1_trainer

FLAGS = flags.FLAGS
TASKS = ("stage1_step", "stage2_step", "sample", "conv", "attention", "data")

flags.DEFINE_enum("task", "stage1_step", TASKS, "What to time.")
config_flags.DEFINE_config_file(
    "config", None, "Stage-1 config (stage1_step) or transformer config (stage2_step, "
    "sample; optional there: GPT flags are used without one); data: any training config, "
    "whose config.data is timed (default: data.default_data_config()).", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed executions (after warm-up); data: timed batches "
                     "per repeat.")
flags.DEFINE_integer("warmup", 2, "Untimed executions after compilation; data: untimed "
                     "batches (the first one includes starting the pipeline).")
flags.DEFINE_bool("gan", False, "stage1_step: include the GAN terms and discriminator update.")
flags.DEFINE_bool("disc_on_stale_reconstructions", None, "stage1_step --gan: train the "
                  "discriminator on the pre-update reconstruction (True) or on the updated "
                  "generator's (False, the reference's order); unset: the config's "
                  "loss.disc_on_stale_reconstructions.")
flags.DEFINE_bool("compare_disc_orders", False, "stage1_step --gan: time both discriminator "
                  "orders in this run, alternating step by step (`disc_orders` in the JSON).")
# GPT without a config (the reference configuration (b) is the default).
flags.DEFINE_integer("vocab_size", 1024, "GPT vocabulary.")
flags.DEFINE_integer("block_size", 256, "GPT context; stage2_step trains on this many tokens.")
flags.DEFINE_integer("n_layer", 8, "GPT blocks.")
flags.DEFINE_integer("n_head", 8, "GPT heads.")
flags.DEFINE_integer("n_embd", 512, "GPT width.")
flags.DEFINE_integer("batch_size", 8, "stage2_step batch (sequences) without a config.")
flags.DEFINE_enum("attention", "softmax", ["softmax", "linear"], "stage2_step attention kernel.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "GPT compute dtype without a config.")
flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate without a config.")
# sample task
flags.DEFINE_integer("sample_batch", 1, "sample: sequences decoded in parallel.")
flags.DEFINE_list("sample_lengths", ["256", "1024"], "sample: KV cache vs recompute lengths.")
flags.DEFINE_integer("naive_steps", 8, "sample: recomputation steps timed per length; the "
                     "full time is extrapolated (every recompute step costs the same).")
flags.DEFINE_list("positions", ["256", "1024", "4096"], "sample: per-token decode positions.")
flags.DEFINE_integer("decode_steps", 64, "sample: decode steps per timed scan.")
flags.DEFINE_integer("kv_rounds", 3, "sample: alternating timed runs of the cached and the "
                     "recomputing sampler per --sample_lengths entry.")
flags.DEFINE_list("scaling_batches", ["1", "4", "16"], "sample: batch sizes of the KV-cache "
                  "batch-scaling runs (empty: skip).")
flags.DEFINE_integer("scaling_length", 256, "sample: tokens per sequence in batch scaling.")
flags.DEFINE_integer("window", 16, "sample: side of the sliding-window sampler's window (the "
                     "GPT sees 1 condition token + window^2 tokens); 0 skips it.")
flags.DEFINE_integer("sliding_grid", 20, "sample: side of the token grid the sliding-window "
                     "sampler fills (one full window forward per grid position).")
flags.DEFINE_integer("decode_rounds", 7, "sample: timed scans per position (interleaved).")
flags.DEFINE_integer("long_length", 4096, "sample: tokens of the long sampling comparison.")
flags.DEFINE_bool("full_long_sampling", True, "sample: really sample long_length tokens with "
                  "linear and softmax-cache decoding (else: estimate from per-token times).")
flags.DEFINE_list("train_lengths", ["256", "1024", "4096"], "sample: train-step lengths.")
flags.DEFINE_integer("train_batch", 1, "sample: sequences per train step.")
flags.DEFINE_integer("train_steps", 3, "sample: timed train steps per length and kernel.")
flags.DEFINE_integer("linear_chunk_size", 64, "Chunk length of linear attention.")
# attention task
flags.DEFINE_integer("attention_length", 256, "attention: sequence length.")
flags.DEFINE_integer("attention_rounds", 7, "attention: interleaved timing rounds.")
# conv task
flags.DEFINE_integer("conv_batch", 8, "conv: batch of every shape.")
# data task
flags.DEFINE_list("data_sources", ["photos", "folder", "tfds"], "data: input sources to time.")
flags.DEFINE_integer("image_size", 256, "data: side of the training crops (data.image_size).")
flags.DEFINE_list("num_workers", ["0", "2"], "data: grain worker processes (data.num_workers) "
                  "to time, one row each; 0 = the main process with its reader threads.")
flags.DEFINE_integer("data_batch_size", 16, "data: images per batch (per host).")
flags.DEFINE_integer("repeats", 3, "data: timed repeats of --steps batches; the median "
                     "images/s is reported.")
flags.DEFINE_string("data_folder", None, "data: image folder to time (default: the config's "
                    "folder_path when it is set, else a generated temporary folder).")
flags.DEFINE_string("tfds_name", None, "data: TFDS dataset to time (default: the config's "
                    "tfds_name when it is set, else a small ArrayRecord dataset built in a "
                    "temporary dir from the generated images).")
flags.DEFINE_string("tfds_data_dir", None, "data: TFDS data_dir of --tfds_name.")
flags.DEFINE_integer("generated_images", 32, "data: images written when a folder or TFDS "
                     "dataset is generated.")
flags.DEFINE_string("generated_size", "500x375", "data: WIDTHxHEIGHT of generated images "
                    "(500x375: a typical ImageNet photo; FFHQ is 1024x1024).")
flags.DEFINE_list("generated_formats", ["jpeg", "png"], "data: file formats of the "
                  "generated images (alternating; the TFDS dataset stores the same files).")
flags.DEFINE_integer("global_batch", None, "data: global batch of the target training run.")
flags.DEFINE_float("step_seconds", None, "data: seconds per training step on the target.")
flags.DEFINE_integer("num_hosts", None, "data: hosts of the target slice.")
flags.DEFINE_string("dry_run_json", None, "data: JSON of `python -m vqgan_jax.dry_run "
                    "--compile`; its 'train' step gives global batch, step seconds and hosts.")
# peak
flags.DEFINE_integer("peak_size", 2048, "CPU: side of the f32 matmul measuring peak FLOP/s.")
flags.DEFINE_string("output", None, "Also write the JSON object to this file.")
flags.DEFINE_alias("json", "output")


# ------------------------------------------------------------------------------ helpers


def loadavg() -> Optional[float]:
  try:
    with open("/proc/loadavg") as fh:
      return float(fh.read().split()[0])
  except (OSError, ValueError, IndexError):
    return None


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> List[float]:
  """Seconds of each of `steps` calls of fn() (which must block), after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def summary(times: Sequence[float]) -> Dict[str, float]:
  return {"step_s_median": statistics.median(times), "step_s_min": min(times),
          "step_s_max": max(times), "steps": len(times)}


# Dense bf16 peaks per chip, matched against jax's device_kind (lower-case substrings, in
# order: the first match wins).
PEAK_TABLE = (
    ("v6 lite", 918e12, "TPU v6e"), ("v6e", 918e12, "TPU v6e"),
    ("v5 lite", 197e12, "TPU v5e"), ("v5e", 197e12, "TPU v5e"),
    ("v5p", 459e12, "TPU v5p"), ("tpu v4", 275e12, "TPU v4"),
    ("h200", 989e12, "H200 (as H100 SXM)"), ("h100 pcie", 756e12, "H100 PCIe"),
    ("h100", 989e12, "H100 SXM"), ("a100", 312e12, "A100"),
)


def measure_matmul_peak(size: int, repeats: int = 5) -> float:
  """FLOP/s of a jitted size x size x size f32 matmul (median of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  mm = jax.jit(jnp.matmul)
  times = time_calls(lambda: mm(a, b).block_until_ready(), repeats, 2)
  return 2.0 * size ** 3 / statistics.median(times)


def device_peak(size: Optional[int] = None) -> Dict[str, Any]:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    size = size or FLAGS.peak_size
    return {"peak_flops_per_s": measure_matmul_peak(size),
            "peak_source": f"measured: f32 matmul {size}x{size}, median of 5"}
  kind = dev.device_kind.lower()
  for key, peak, name in PEAK_TABLE:
    if key in kind:
      return {"peak_flops_per_s": peak, "peak_source": f"table: {name} dense bf16"}
  return {"peak_flops_per_s": None, "peak_source": f"unknown device_kind {dev.device_kind!r}"}


def environment() -> Dict[str, Any]:
  dev = jax.devices()[0]
  return {"backend": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "jax_version": jax.__version__}


def rates(result: Dict[str, Any], flops_per_step: Optional[float], peak: Optional[float]):
  median = result["step_s_median"]
  result["flops_per_step"] = flops_per_step
  achieved = flops_per_step / median if flops_per_step else None
  result["achieved_flops_per_s"] = achieved
  result["mfu"] = achieved / peak if achieved and peak else None
  return result


def compile_timed(jitted, *args, **kwargs):
  """(compiled executable, seconds spent lowering and compiling)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - start


# ------------------------------------------------------------------------------ stage 1


def _with_disc_order(config, stale: bool):
  """A copy of a stage-1 config with loss.disc_on_stale_reconstructions = stale."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.loss.disc_on_stale_reconstructions = bool(stale)
  return config


def _stage1_step(config, state, batch, lpips_params):
  """(call that runs one step on the state it holds and blocks, compile seconds)."""
  setup = stage1_trainer.Stage1Setup(config)
  step = jax.jit(functools.partial(setup.train_step, use_gan=FLAGS.gan), donate_argnums=0)
  compiled, compile_s = compile_timed(step, state, batch, lpips_params)
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch, lpips_params)
    jax.block_until_ready((holder["state"], metrics))

  return run, compile_s


def bench_stage1(config) -> Dict[str, Any]:
  if config is None:
    raise app.UsageError("--task stage1_step needs --config (e.g. configs/vqgan_demo.py)")
  stale = FLAGS.disc_on_stale_reconstructions
  if stale is None:
    stale = bool(config.loss.get("disc_on_stale_reconstructions", False))
  config = _with_disc_order(config, stale)
  setup = stage1_trainer.Stage1Setup(config)
  lpips_params = None
  if config.loss.perceptual_weight > 0:
    lpips_params = lpips.load_lpips_params()
  init = jax.jit(setup.init_state)
  b, size, m = config.batch_size, config.data.image_size, config.model
  key = jax.random.PRNGKey(1)
  if config.data.input == "segmentation":
    batch = {"segmentation": jax.random.randint(key, (b, size, size), 0, m.in_channels)}
  else:
    batch = {"image": jax.random.uniform(key, (b, size, size, m.in_channels), jnp.float32,
                                         -1.0, 1.0)}
  run, compile_s = _stage1_step(config, init(setup.rng), batch, lpips_params)
  orders = {}
  if FLAGS.gan and FLAGS.compare_disc_orders:
    other, _ = _stage1_step(_with_disc_order(config, not stale), init(setup.rng), batch,
                            lpips_params)
    calls = {"stale": run, "updated": other} if stale else {"updated": run, "stale": other}
    for call in calls.values():
      time_calls(call, 0, FLAGS.warmup)
    orders = _alternating(calls, FLAGS.steps)
    times = orders["stale" if stale else "updated"]
  else:
    times = time_calls(run, FLAGS.steps, FLAGS.warmup)
  result = {"compile_s": compile_s, **summary(times), "warmup": FLAGS.warmup,
            "batch_size": b, "image_size": size, "gan": FLAGS.gan,
            "perceptual": config.loss.perceptual_weight > 0,
            "compute_dtype": config.compute_dtype}
  if FLAGS.gan:
    result["disc_on_stale_reconstructions"] = stale
  if orders:
    result["disc_orders"] = {name: summary(t) for name, t in orders.items()}
    result["disc_orders"]["updated_over_stale"] = (
        statistics.median(orders["updated"]) / statistics.median(orders["stale"]))
  result["examples_per_s"] = b / result["step_s_median"]
  model_kwargs = flops_lib.model_kwargs(m)
  parts = flops_lib.stage1_train_step_breakdown(
      b, size, model_kwargs, perceptual=config.loss.perceptual_weight > 0, use_gan=FLAGS.gan,
      disc_ndf=config.loss.disc_ndf, disc_layers=config.loss.disc_num_layers)
  if FLAGS.gan and not stale:
    # The reference order's second, gradient-free generator forward (the discriminator's
    # input); vqgan_jax.flops counts the stale order's step.
    parts["generator_forward_for_discriminator"] = sum(
        flops_lib.vqgan_forward_breakdown(b, size, **model_kwargs).values())
  result["flops_breakdown"] = parts
  return result, sum(parts.values())


# ------------------------------------------------------------------------------ stage 2


def gpt_from_flags(block_size: Optional[int] = None, attention: Optional[str] = None):
  return GPT(vocab_size=FLAGS.vocab_size, block_size=block_size or FLAGS.block_size,
             n_layer=FLAGS.n_layer, n_head=FLAGS.n_head, n_embd=FLAGS.n_embd,
             attention=attention or FLAGS.attention, linear_chunk_size=FLAGS.linear_chunk_size,
             dtype=jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32)


def gpt_from_config(config):
  """(GPT, seq_len, batch, optimizer, description) for a transformer config.

  Uses `handoff.stated_model` (vocab and block size derived from first_stage.n_embed
  and first_stage.latent_grid, as training would) when those are stated; otherwise the GPT
  flags fill in vocab_size / block_size where the config leaves them 0.
  """
  m = config.model
  try:
    gpt, _, prefix, n = handoff.stated_model(config)
    seq_len = prefix + n - 1
    source = "handoff.stated_model"
  except Exception as err:  # pylint: disable=broad-except
    logging.info("stated_model unavailable (%s); vocab/block from config or flags", err)
    block = m.block_size or FLAGS.block_size
    gpt = GPT(vocab_size=m.vocab_size or FLAGS.vocab_size, block_size=block,
              n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, embd_pdrop=m.embd_pdrop,
              resid_pdrop=m.resid_pdrop, attn_pdrop=m.attn_pdrop, attention=m.attention,
              linear_chunk_size=m.linear_chunk_size,
              dtype=config_lib.compute_dtype(config), remat=m.remat)
    seq_len = block
    source = "config.model (+ flags for vocab/block)"
  return gpt, seq_len, config.batch_size, optim.make_optimizer(config), source


def gpt_train_step(gpt, tx):
  """(params, opt_state), tokens (B, T + 1) -> new state, loss: next-token CE + optimizer."""
  def step(state, tokens, key):
    params, opt_state = state

    def loss_fn(p):
      logits = gpt.apply({"params": p}, tokens[:, :-1], train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss
  return jax.jit(step, donate_argnums=0)


def time_gpt_train(gpt, tx, batch: int, seq_len: int, steps: int, warmup: int):
  params = jax.jit(gpt.init)(jax.random.PRNGKey(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
  state = (params, jax.jit(tx.init)(params))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq_len + 1), 0, gpt.vocab_size)
  key = jax.random.PRNGKey(2)
  compiled, compile_s = compile_timed(gpt_train_step(gpt, tx), state, tokens, key)
  holder = {"state": state}

  def run():
    holder["state"], loss = compiled(holder["state"], tokens, key)
    jax.block_until_ready((holder["state"], loss))

  times = time_calls(run, steps, warmup)
  return {"compile_s": compile_s, **summary(times), "warmup": warmup}


def gpt_flop_kwargs(gpt) -> Dict[str, Any]:
  return dict(vocab_size=gpt.vocab_size, n_layer=gpt.n_layer, n_embd=gpt.n_embd,
              n_head=gpt.n_head, attention=gpt.attention, linear_chunk_size=gpt.linear_chunk_size)


def bench_stage2(config) -> Dict[str, Any]:
  if config is not None:
    gpt, seq_len, batch, tx, source = gpt_from_config(config)
  else:
    gpt, seq_len, batch = gpt_from_flags(), FLAGS.block_size, FLAGS.batch_size
    tx, source = optax.adam(FLAGS.learning_rate), "flags"
  result = time_gpt_train(gpt, tx, batch, seq_len, FLAGS.steps, FLAGS.warmup)
  result.update(model_source=source, batch_size=batch, seq_len=seq_len,
                gpt=dict(gpt_flop_kwargs(gpt), block_size=gpt.block_size,
                         dtype=jnp.dtype(gpt.dtype).name))
  result["examples_per_s"] = batch / result["step_s_median"]
  result["tokens_per_s"] = batch * seq_len / result["step_s_median"]
  return result, flops_lib.gpt_train_step_flops(batch, seq_len, **gpt_flop_kwargs(gpt))


# ------------------------------------------------------------------------------ sampling


def _init_gpt(gpt):
  return jax.jit(gpt.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


def _sample_time(fn, compiled_args, repeats: int, warmup: int = 1):
  """(compile seconds, median run seconds, all run seconds) of a jitted sampler."""
  compiled, compile_s = compile_timed(fn, **compiled_args)
  dynamic = {k: v for k, v in compiled_args.items() if k not in ("model", "num_tokens")}
  times = time_calls(lambda: compiled(**dynamic).block_until_ready(), repeats, warmup)
  return compile_s, statistics.median(times), times


def _compiled_call(fn, static: Sequence[str], **args):
  """(call, compile seconds): `fn` (jitted) lowered and compiled for args, and a call
  that runs it on the non-static args and blocks on the result, which it returns."""
  compiled, compile_s = compile_timed(fn, **args)
  dynamic = {a: v for a, v in args.items() if a not in static}
  return (lambda: jax.block_until_ready(compiled(**dynamic))), compile_s


def _alternating(calls: Dict[Any, Callable[[], Any]], rounds: int) -> Dict[Any, List[float]]:
  """Seconds of `rounds` timed calls of each, the calls alternating round by round so that
  a drift in machine load hits all of them."""
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      times[name] += time_calls(call, 1, 0)
  return times


def kv_vs_naive(length: int, batch: int) -> Dict[str, Any]:
  """Sampling `length` tokens after one prefix token: KV cache (`sample`) vs recomputing the
  full forward pass per token (`sample_naive`). The naive figure is extrapolated from
  `naive_steps` steps over the same `length`-token buffer, which is exact up to noise
  because every naive step runs the same full-buffer forward. The two samplers run in
  alternation, `kv_rounds` times each after one warm-up call (none above 512 tokens, where
  the first call is timed too), so a drift in machine load hits both."""
  gpt = gpt_from_flags(block_size=length, attention="softmax")
  params = _init_gpt(gpt)
  key = jax.random.PRNGKey(3)
  k = min(FLAGS.naive_steps, length)
  calls, compile_s = {}, {}
  for name, fn, prefix_len, num_tokens in (("kv", sampling.sample, 1, length),
                                           ("naive", sampling.sample_naive, length - k + 1, k)):
    calls[name], compile_s[name] = _compiled_call(
        fn, ("model", "num_tokens"), params=params, model=gpt, key=key, num_tokens=num_tokens,
        prefix_tokens=jnp.zeros((batch, prefix_len), jnp.int32))
    if length <= 512:
      calls[name]()
  times = _alternating(calls, FLAGS.kv_rounds)
  (c_compile, c_all), (n_compile, n_all) = [(compile_s[n], times[n]) for n in ("kv", "naive")]
  c_time = statistics.median(c_all)
  naive_total = statistics.median(n_all) / k * length
  return {"tokens": length, "batch": batch,
          "kv_cache_s": c_time, "kv_cache_runs_s": c_all, "kv_cache_compile_s": c_compile,
          "kv_cache_tokens_per_s": batch * length / c_time,
          "naive_s": naive_total, "naive_runs_s": n_all,
          "naive_estimated_from_steps": k if k < length else None,
          "naive_compile_s": n_compile, "naive_tokens_per_s": batch * length / naive_total,
          "speedup": naive_total / c_time, "rounds": FLAGS.kv_rounds}


def _decode_scan(gpt, k: int, batch: int):

  def run(params, cache, start):
    def body(carry, i):
      token, cache = carry
      logits, cache = gpt.apply(params, token[:, None], start + i, cache, method=GPT.decode_step)
      return (jnp.argmax(logits, -1).astype(jnp.int32), cache), None
    (token, _), _ = lax.scan(body, (jnp.zeros((batch,), jnp.int32), cache),
                             jnp.arange(k, dtype=jnp.int32))
    return token
  return jax.jit(run)


def per_token_decode(positions: Sequence[int], batch: int) -> Dict[str, Any]:
  """Seconds per decoded token at each position: `decode_steps` steps ending at the
  position, in one compiled scan. Softmax: a cache of `position` slots, which is what
  `sample` allocates for that many tokens (its step attends over the whole buffer, masked);
  linear: the recurrent state (O(1) in the position)."""
  k = FLAGS.decode_steps
  longest = max(positions)
  out = {}
  for kind in ("softmax", "linear"):
    gpt = gpt_from_flags(block_size=longest, attention=kind)
    params = _init_gpt(gpt)
    fn = _decode_scan(gpt, k, batch)
    runs = {}
    for p in positions:
      cache = gpt.init_cache(batch, p)
      start = jnp.int32(p - k)
      compiled, _ = compile_timed(fn, params, cache, start)
      jax.block_until_ready(compiled(params, cache, start))  # warm-up
      runs[p] = (compiled, cache, start)
    # Positions interleaved round by round, so a drift in machine load hits all of them.
    times = {p: [] for p in positions}
    for _ in range(FLAGS.decode_rounds):
      for p, (compiled, cache, start) in runs.items():
        times[p] += time_calls(lambda: compiled(params, cache, start).block_until_ready(), 1, 0)
    rows = {}
    for p in positions:
      per_token = statistics.median(times[p]) / k
      rows[str(p)] = {"s_per_token": per_token, "tokens_per_s": batch / per_token,
                      "rounds": len(times[p]),
                      "flops_per_token": flops_lib.gpt_decode_step_flops(
                          batch, p, **gpt_flop_kwargs(gpt))}
    out[kind] = rows
  lo, hi = str(min(positions)), str(longest)
  out["linear_ratio_longest_to_shortest"] = (out["linear"][hi]["s_per_token"]
                                             / out["linear"][lo]["s_per_token"])
  out["softmax_ratio_longest_to_shortest"] = (out["softmax"][hi]["s_per_token"]
                                              / out["softmax"][lo]["s_per_token"])
  out["decode_steps"] = k
  return out


def long_sampling(length: int, batch: int, per_token: Dict[str, Any]) -> Dict[str, Any]:
  """Time to sample `length` tokens: linear (recurrent), softmax KV cache, softmax without a
  cache (always estimated: `naive_steps` full-buffer forwards, scaled to `length`)."""
  key = jax.random.PRNGKey(4)
  prefix = jnp.zeros((batch, 1), jnp.int32)
  out = {"tokens": length, "batch": batch}
  for kind in ("linear", "softmax"):
    name = f"{kind}_cache" if kind == "softmax" else "linear_recurrent"
    if FLAGS.full_long_sampling:
      gpt = gpt_from_flags(block_size=length, attention=kind)
      params = _init_gpt(gpt)
      compile_s, run_s, _ = _sample_time(
          sampling.sample, dict(params=params, model=gpt, prefix_tokens=prefix,
                                num_tokens=length, key=key), repeats=1, warmup=0)
      out[name] = {"s": run_s, "compile_s": compile_s,
                   "measured": "one full run (no warm-up run)"}
    else:
      if str(length) not in per_token[kind]:
        raise app.UsageError(f"--nofull_long_sampling estimates from the per-token time at "
                             f"--long_length={length}: add {length} to --positions "
                             f"(now {','.join(FLAGS.positions)})")
      est = per_token[kind][str(length)]["s_per_token"] * length
      out[name] = {"s": est, "measured": "per-token time at the last position x length"}
  gpt = gpt_from_flags(block_size=length, attention="softmax")
  params = _init_gpt(gpt)
  k = max(1, min(FLAGS.naive_steps // 4, length))
  _, n_time, _ = _sample_time(
      sampling.sample_naive, dict(params=params, model=gpt,
                                  prefix_tokens=jnp.zeros((batch, length - k + 1), jnp.int32),
                                  num_tokens=k, key=key), repeats=2)
  out["softmax_no_cache"] = {"s": n_time / k * length,
                             "measured": f"estimated from {k} full-buffer forward steps"}
  out["linear_speedup_vs_softmax_cache"] = out["softmax_cache"]["s"] / out["linear_recurrent"]["s"]
  return out


def train_lengths(lengths: Sequence[int], batch: int, peak) -> Dict[str, Any]:
  out = {}
  for kind in ("softmax", "linear"):
    rows = {}
    for t in lengths:
      gpt = gpt_from_flags(block_size=t, attention=kind)
      steps = FLAGS.train_steps
      try:
        r = time_gpt_train(gpt, optax.adam(FLAGS.learning_rate), batch, t, steps, 1)
      except Exception as err:  # pylint: disable=broad-except
        rows[str(t)] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        continue
      r["tokens_per_s"] = batch * t / r["step_s_median"]
      rates(r, flops_lib.gpt_train_step_flops(batch, t, **gpt_flop_kwargs(gpt)), peak)
      rows[str(t)] = r
    out[kind] = rows
  out["batch"] = batch
  return out


def batch_scaling(length: int, batches: Sequence[int]) -> Dict[str, Any]:
  """KV-cache sampling (`sampling.sample`) of `length` tokens after one prefix token at each
  batch size; the sizes alternate round by round (`kv_rounds` timed runs each, after one
  warm-up). At batch 1 a decoding step is bound by reading the weights, so larger batches
  add tokens almost for free until the matmuls become compute-bound."""
  gpt = gpt_from_flags(block_size=length, attention="softmax")
  params = _init_gpt(gpt)
  key = jax.random.PRNGKey(5)
  calls, compile_s = {}, {}
  for b in batches:
    calls[b], compile_s[b] = _compiled_call(
        sampling.sample, ("model", "num_tokens"), params=params, model=gpt, key=key,
        prefix_tokens=jnp.zeros((b, 1), jnp.int32), num_tokens=length)
    calls[b]()
  rows = {}
  for b, times in _alternating(calls, FLAGS.kv_rounds).items():
    t = statistics.median(times)
    rows[str(b)] = {"s": t, "runs_s": times, "compile_s": compile_s[b],
                    "tokens_per_s": b * length / t, "s_per_decoding_step": t / length}
  first = rows[str(batches[0])]["tokens_per_s"]
  for row in rows.values():
    row["tokens_per_s_vs_first"] = row["tokens_per_s"] / first
  return {"tokens": length, "rounds": FLAGS.kv_rounds, "batches": rows}


def sliding_window(window: int, grid: int, batch: int) -> Dict[str, Any]:
  """`sampling.sample_sliding_window` filling a grid x grid token grid with a GPT whose
  context is one condition token + a window x window grid, with the KV cache where the
  window origin repeats (`cached`) and with one full window forward per grid position, as
  the reference (`recomputed`). One timed run of each after compilation."""
  if grid < window:
    raise app.UsageError(f"--sliding_grid={grid} is smaller than --window={window}")
  gpt = gpt_from_flags(block_size=1 + window * window, attention="softmax")
  params = _init_gpt(gpt)
  positions = grid * grid
  out = {"window": window, "grid": grid, "batch": batch, "positions": positions,
         "flops_per_full_forward": flops_lib.gpt_forward_flops(batch, window * window,
                                                               **gpt_flop_kwargs(gpt))}
  for name, use_cache in (("cached", True), ("recomputed", False)):
    args = dict(params=params, model=gpt, cond_tokens=jnp.zeros((batch, 1), jnp.int32),
                grid_h=grid, grid_w=grid, window_h=window, window_w=window,
                key=jax.random.PRNGKey(6), use_cache=use_cache, return_info=True)
    call, compile_s = _compiled_call(
        sampling.sample_sliding_window,
        ("model", "grid_h", "grid_w", "window_h", "window_w", "use_cache", "return_info"), **args)
    start = time.perf_counter()
    _, info = call()
    t = time.perf_counter() - start
    out[name] = {"s": t, "compile_s": compile_s, "tokens_per_s": batch * positions / t,
                 "s_per_position": t / positions,
                 "cached_positions": int(info["cached"].sum())}
  out["cache_speedup"] = out["recomputed"]["s"] / out["cached"]["s"]
  return out


def bench_sample(config) -> Dict[str, Any]:
  del config  # sampling uses the GPT flags (several block sizes are needed)
  batch = FLAGS.sample_batch
  if FLAGS.long_length and not FLAGS.full_long_sampling and \
      str(FLAGS.long_length) not in [str(int(p)) for p in FLAGS.positions]:
    # Checked before any section runs (the estimate needs that position's timing).
    raise app.UsageError(f"--nofull_long_sampling estimates from the per-token time at "
                         f"--long_length={FLAGS.long_length}: add {FLAGS.long_length} to "
                         f"--positions (now {','.join(FLAGS.positions)})")
  peak = device_peak()
  result = {"gpt": dict(vocab_size=FLAGS.vocab_size, n_layer=FLAGS.n_layer, n_head=FLAGS.n_head,
                        n_embd=FLAGS.n_embd, dtype=FLAGS.dtype,
                        linear_chunk_size=FLAGS.linear_chunk_size), **peak}
  result["kv_vs_naive"] = {str(n): kv_vs_naive(int(n), batch) for n in FLAGS.sample_lengths}
  logging.info("kv_vs_naive done: %s", result["kv_vs_naive"])
  positions = sorted(int(p) for p in FLAGS.positions)
  result["per_token"] = per_token_decode(positions, batch)
  logging.info("per_token done: %s", result["per_token"])
  if FLAGS.long_length:
    result["long_sampling"] = long_sampling(FLAGS.long_length, batch, result["per_token"])
    logging.info("long_sampling done: %s", result["long_sampling"])
  if FLAGS.scaling_batches:
    result["batch_scaling"] = batch_scaling(FLAGS.scaling_length,
                                            [int(b) for b in FLAGS.scaling_batches])
    logging.info("batch_scaling done: %s", result["batch_scaling"])
  if FLAGS.window:
    result["sliding_window"] = sliding_window(FLAGS.window, FLAGS.sliding_grid, batch)
    logging.info("sliding_window done: %s", result["sliding_window"])
  lengths = [int(t) for t in FLAGS.train_lengths]
  if lengths:
    result["train_steps"] = train_lengths(lengths, FLAGS.train_batch, peak["peak_flops_per_s"])
  return result


# ------------------------------------------------------------------------------ conv

CONV_SHAPES = (
    # (height=width, cin, cout): VGG16 / LPIPS deep stages and the VQGAN's low levels
    (2, 512, 512), (4, 512, 512), (4, 256, 256), (8, 512, 512), (8, 128, 128),
    (16, 256, 256), (16, 128, 128), (32, 64, 64),
)


@contextlib.contextmanager
def _im2col_limit(value: int):
  saved = layers.IM2COL_MAX_POSITIONS
  layers.IM2COL_MAX_POSITIONS = value
  try:
    yield
  finally:
    layers.IM2COL_MAX_POSITIONS = saved


def bench_conv(config) -> Dict[str, Any]:
  """XLA's convolution vs the im2col lowering of `layers.conv2d` (3x3, stride 1, pad 1),
  forward and gradient (input + kernel), on the shapes where the switch matters."""
  del config
  pad = ((1, 1), (1, 1))
  batch = FLAGS.conv_batch
  rows = []
  for size, cin, cout in CONV_SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, cin), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, cin, cout), jnp.float32) * 0.02
    ct = jax.random.normal(jax.random.PRNGKey(2), (batch, size, size, cout), jnp.float32)
    f = flops_lib.conv_flops(batch, size, size, 3, 3, cin, cout)
    row = {"shape": f"{batch}x{size}x{size}x{cin}->{cout}", "positions": size * size,
           "uses_im2col": size * size <= layers.IM2COL_MAX_POSITIONS}
    for path, limit in (("xla", -1), ("im2col", 1 << 30)):
      # New functions per path: jax.jit caches traces per function object, so reusing one
      # would time the first path's trace twice.
      fwd = lambda x, w: layers.conv2d(x, w, (1, 1), pad)
      grad = jax.grad(lambda x, w: jnp.vdot(layers.conv2d(x, w, (1, 1), pad), ct),  # pylint: disable=cell-var-from-loop
                      argnums=(0, 1))
      for name, fn, mult in (("fwd", fwd, 1), ("grad", grad, 3)):
        with _im2col_limit(limit):
          compiled, _ = compile_timed(jax.jit(fn), x, w)
        times = time_calls(lambda: jax.block_until_ready(compiled(x, w)),
                           max(FLAGS.steps, 5), FLAGS.warmup)
        t = statistics.median(times)
        row[f"{path}_{name}_s"] = t
        row[f"{path}_{name}_gflops_per_s"] = mult * f / t / 1e9
    row["im2col_speedup_fwd"] = row["xla_fwd_s"] / row["im2col_fwd_s"]
    row["im2col_speedup_grad"] = row["xla_grad_s"] / row["im2col_grad_s"]
    rows.append(row)
    logging.info("conv %s", row)
  return {"im2col_max_positions": layers.IM2COL_MAX_POSITIONS, "shapes": rows}


# ------------------------------------------------------------------------------ attention


def bench_attention(config) -> Dict[str, Any]:
  """One layer's causal softmax attention, (B, T, H, D) in and out, forward and gradient
  (w.r.t. q, k, v): jax.nn.dot_product_attention against the head-major einsum form that
  `SoftmaxAttention.parallel` uses on CPU. Implementations interleaved round by round."""
  del config
  b, t, h = FLAGS.batch_size, FLAGS.attention_length, FLAGS.n_head
  d = FLAGS.n_embd // h
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, ct = (jax.random.normal(key, (b, t, h, d), jnp.float32) for key in keys)
  kernels = {"dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
                 q, k, v, is_causal=True),
             "head_major_einsum": attention.causal_softmax_attention}
  compiled = {}
  for name, fn in kernels.items():
    grad = jax.grad(lambda q, k, v, fn=fn: jnp.vdot(fn(q, k, v), ct), argnums=(0, 1, 2))
    compiled[name] = (compile_timed(jax.jit(fn), q, k, v)[0],
                      compile_timed(jax.jit(grad), q, k, v)[0])
  outs = [np.asarray(f(q, k, v)) for f, _ in compiled.values()]
  times = {name: {"fwd": [], "grad": []} for name in kernels}
  for _ in range(FLAGS.attention_rounds):
    for name, (fwd, grad) in compiled.items():
      times[name]["fwd"] += time_calls(lambda: jax.block_until_ready(fwd(q, k, v)), 1, 1)
      times[name]["grad"] += time_calls(lambda: jax.block_until_ready(grad(q, k, v)), 1, 1)
  rows = {name: {f"{part}_s_median": statistics.median(ts) for part, ts in parts.items()}
          for name, parts in times.items()}
  base, new = rows["dot_product_attention"], rows["head_major_einsum"]
  return {"shape": [b, t, h, d], "kernels": rows,
          "max_abs_diff": float(np.max(np.abs(outs[0] - outs[1]))),
          "speedup_fwd": base["fwd_s_median"] / new["fwd_s_median"],
          "speedup_grad": base["grad_s_median"] / new["grad_s_median"]}


# ------------------------------------------------------------------------------ data


def needed_images_per_s() -> Optional[Dict[str, Any]]:
  """Images/s per host the training step consumes on the target slice: global batch /
  step seconds / hosts, from --global_batch/--step_seconds/--num_hosts or from the 'train'
  step of a `dry_run --compile` JSON. None when neither is given."""
  given = {name: FLAGS[name].value for name in ("global_batch", "step_seconds", "num_hosts")
           if FLAGS[name].value is not None}
  if FLAGS.dry_run_json:
    if given:
      raise app.UsageError("give --dry_run_json or --global_batch/--step_seconds/--num_hosts, "
                           f"not both (also given: {sorted(given)})")
    with open(FLAGS.dry_run_json) as fh:
      report = json.load(fh)
    steps = report.get("steps") or {}
    if "train" not in steps:
      raise ValueError(f"{FLAGS.dry_run_json}: no 'train' step in 'steps' "
                       f"(found {sorted(steps)})")
    step = steps["train"]
    seconds = step.get("estimated_step_seconds")
    if not seconds:
      raise ValueError(f"{FLAGS.dry_run_json}: the 'train' step has no "
                       f"estimated_step_seconds ({seconds!r})")
    batch = step.get("global_batch", report.get("global_batch"))
    hosts = report.get("num_hosts")
    if not batch or not hosts:
      raise ValueError(f"{FLAGS.dry_run_json}: needs global_batch and num_hosts "
                       f"(got {batch!r}, {hosts!r})")
    source, topology = f"dry_run_json: {FLAGS.dry_run_json}", report.get("topology")
  elif given:
    missing = sorted({"global_batch", "step_seconds", "num_hosts"} - set(given))
    if missing:
      raise app.UsageError(f"the needed rate also needs --{', --'.join(missing)}")
    batch, seconds, hosts = given["global_batch"], given["step_seconds"], given["num_hosts"]
    if batch <= 0 or seconds <= 0 or hosts <= 0:
      raise app.UsageError("--global_batch, --step_seconds and --num_hosts must be positive")
    source, topology = "flags", None
  else:
    return None
  return {"images_per_s_per_host": float(batch) / float(seconds) / int(hosts),
          "global_batch": int(batch), "step_seconds": float(seconds), "num_hosts": int(hosts),
          "topology": topology, "source": source}


def _generated_size() -> Tuple[int, int]:
  try:
    width, height = (int(v) for v in FLAGS.generated_size.lower().split("x"))
  except ValueError:
    raise app.UsageError(f"--generated_size={FLAGS.generated_size!r} is not WIDTHxHEIGHT")
  if width <= 0 or height <= 0:
    raise app.UsageError(f"--generated_size={FLAGS.generated_size!r} must be positive")
  return width, height


def write_image_folder(root: str, count: int, size: Tuple[int, int],
                       formats: Sequence[str]) -> List[Tuple[str, int]]:
  """Writes `count` photo-like images of size (width, height) under root/<format>/ (one
  class sub-folder per format), cycling through `formats` ("jpeg" quality 90, "png").
  Content: crops of the bundled scikit-image photos (realistic entropy, so decoding costs
  what it does on real photos), else smooth random images. Returns [(path, label)]."""
  width, height = size
  rng = np.random.default_rng(0)
  sources = []
  try:
    import skimage.data  # pylint: disable=g-import-not-at-top  (optional; an ImportError falls back below)
    for name in data.PHOTO_NAMES:
      with contextlib.suppress(Exception):
        sources.append(data.to_rgb_uint8(getattr(skimage.data, name)()))
  except ImportError:
    pass
  files = []
  for i in range(count):
    fmt = formats[i % len(formats)].lower()
    if fmt not in ("jpeg", "png"):
      raise app.UsageError(f"--generated_formats: {fmt!r} is not jpeg or png")
    if sources:
      photo = sources[i % len(sources)]
      h, w = photo.shape[:2]
      # The largest window of the target aspect ratio, shrunk a random amount.
      scale = rng.uniform(0.6, 1.0) * min(h / height, w / width)
      ch, cw = max(1, int(height * scale)), max(1, int(width * scale))
      y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((width, height),
                                                                Image.Resampling.BICUBIC)
    else:
      small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), np.uint8)
      image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    folder = os.path.join(root, fmt)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}")
    if fmt == "jpeg":
      image.save(path, quality=90)
    else:
      image.save(path)
    files.append((path, sorted(set(f.lower() for f in formats)).index(fmt)))
  return files


def build_tfds_dataset(data_dir: str, files: Sequence[Tuple[str, int]], num_classes: int,
                       name: str = "vqgan_bench_images") -> str:
  """An ArrayRecord TFDS dataset `name` in data_dir holding the given image files as they
  are encoded (TFDS keeps a file's own JPEG/PNG bytes); train = all files, validation =
  the first few. Returns the name."""
  # tensorflow_datasets takes seconds to import; only the TFDS data benchmark needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()

  def examples(subset):
    return [(f"{i:05d}", {"image": path, "label": label})
            for i, (path, label) in enumerate(subset)]

  # tfds prints its "Downloading and preparing" lines; stdout is kept for the JSON line.
  with contextlib.redirect_stdout(sys.stderr):
    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=max(1, num_classes))}),
        split_datasets={"train": examples(files), "validation": examples(files[:4])},
        config=None, data_dir=data_dir, file_format="array_record")
  return name


def _photos_short_side(dc, size: int) -> int:
  """photos.photo_short_side large enough for size x size train and val crops (the bound
  data.py states)."""
  vf = float(dc.photos.val_fraction)
  needed = max(2 * size, math.ceil(size / max(1e-6, 1.0 - vf)) + 1)
  return max(int(dc.photos.photo_short_side), needed)


def time_input(dc, batch_size: int, batches: int, warmup: int,
               repeats: int) -> Dict[str, Any]:
  """Images/s of `data.make_train_iterator(dc, ...)` as one host of one: untimed warm-up
  batches, then `repeats` runs of `batches` batches each; images/s = batches * batch_size /
  run seconds. The warm-up is max(warmup, 1, num_workers) batches: the first includes
  starting the pipeline, and grain hands out worker outputs in turn, so after num_workers
  batches every worker has started (each prepares its source on its own)."""
  start = time.perf_counter()
  it = data.make_train_iterator(dc, batch_size=batch_size, seed=0, process_index=0,
                                process_count=1)
  try:
    first = next(it)
    startup = time.perf_counter() - start
    shape = list(first["image"].shape)
    warmup = max(1, warmup, int(dc.num_workers))
    for _ in range(warmup - 1):
      next(it)
    runs = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(batches):
        next(it)
      runs.append(batches * batch_size / (time.perf_counter() - t0))
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()
  return {"images_per_s": statistics.median(runs), "images_per_s_runs": runs,
          "startup_s": startup, "warmup_batches": warmup, "batch_shape": shape}


def data_sources(base, tmp: str) -> Dict[str, Tuple[Any, str]]:
  """{source: (config.data for it, description)} for --data_sources; generates the image
  folder and the TFDS dataset in `tmp` where no real one is given."""
  size = FLAGS.image_size
  out = {}
  generated: Dict[str, Any] = {}

  def generate():
    if not generated:
      width, height = _generated_size()
      formats = [f.lower() for f in FLAGS.generated_formats]
      files = write_image_folder(os.path.join(tmp, "images"), FLAGS.generated_images,
                                 (width, height), formats)
      generated.update(root=os.path.join(tmp, "images"), files=files,
                       classes=len(set(formats)),
                       what=f"{len(files)} generated {width}x{height} "
                            f"{'/'.join(f.upper() for f in formats)}")
    return generated

  for name in FLAGS.data_sources:
    dc = ml_collections.ConfigDict(base.to_dict())
    dc.name, dc.image_size = name, size
    if name == "photos":
      dc.photos.photo_short_side = _photos_short_side(dc, size)
      what = (f"bundled scikit-image photos, short side {dc.photos.photo_short_side} "
              "(prepared in memory)")
    elif name == "folder":
      folder = FLAGS.data_folder or (base.folder.folder_path if base.name == "folder" else "")
      if folder:
        dc.folder.folder_path = folder
        what = f"folder {folder}"
      else:
        g = generate()
        dc.folder.folder_path, dc.folder.class_from_subfolder = g["root"], True
        what = f"folder of {g['what']} images"
    elif name == "tfds":
      tfds_name = FLAGS.tfds_name or (base.tfds.tfds_name if base.name == "tfds" else "")
      if tfds_name:
        dc.tfds.tfds_name = tfds_name
        if FLAGS.tfds_data_dir is not None:
          dc.tfds.tfds_data_dir = FLAGS.tfds_data_dir
        what = f"tfds {tfds_name} ({dc.tfds.tfds_data_dir or 'default data_dir'})"
      else:
        g = generate()
        data_dir = os.path.join(tmp, "tfds")
        dc.tfds.tfds_name = build_tfds_dataset(data_dir, g["files"], g["classes"])
        dc.tfds.tfds_data_dir = data_dir
        dc.tfds.train_split, dc.tfds.val_split = "train", "validation"
        dc.tfds.image_key, dc.tfds.label_key = "image", "label"
        what = f"tfds ArrayRecord of {g['what']} images"
    else:
      raise app.UsageError(f"--data_sources: unknown source {name!r} "
                           "(photos, folder, tfds)")
    out[name] = (dc, what)
  return out


def _usable_cpus() -> Optional[int]:
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count()


def data_table(result: Dict[str, Any]) -> str:
  """The human-readable form of bench_data's result."""
  needed = result["needed"]
  lines = [f"input pipeline, images/s per host: {result['image_size']}px crops, batch "
           f"{result['batch_size']}, median of {result['repeats']} x {result['batches']} "
           f"batches after max({result['warmup']}, workers) warm-up; "
           f"{result['cpus_usable']} of {result['cpu_count']} CPUs usable, "
           f"loadavg {result['loadavg']}"]
  header = (f"{'source':<8} {'workers':>7} {'images/s':>10} {'min':>9} {'max':>9} "
            f"{'startup_s':>9}")
  if needed:
    header += f" {'x needed':>8}"
  lines.append(header)
  for row in result["rows"]:
    if "error" in row:
      lines.append(f"{row['source']:<8} {row['num_workers']:>7}  error: {row['error']}")
      continue
    runs = row["images_per_s_runs"]
    line = (f"{row['source']:<8} {row['num_workers']:>7} {row['images_per_s']:>10.1f} "
            f"{min(runs):>9.1f} {max(runs):>9.1f} {row['startup_s']:>9.2f}")
    if needed:
      line += f" {row['vs_needed']:>8.2f}"
    lines.append(line)
  for name, what in result["sources"].items():
    lines.append(f"  {name}: {what}")
  if needed:
    lines.append(f"needed per host: {needed['images_per_s_per_host']:.1f} images/s = global "
                 f"batch {needed['global_batch']} / {needed['step_seconds']:g} s per step / "
                 f"{needed['num_hosts']} hosts ({needed['source']}"
                 + (f", {needed['topology']}" if needed["topology"] else "") + ")")
  else:
    lines.append("needed per host: not given (--global_batch/--step_seconds/--num_hosts or "
                 "--dry_run_json)")
  return "\n".join(lines)


def bench_data(config) -> Dict[str, Any]:
  """Images/s per host of each input source through the real training iterator
  (`data.make_train_iterator`, process 0 of 1) at --image_size, for every --num_workers,
  next to the images/s per host the training step needs (`needed_images_per_s`).

  Result: image_size, batch_size, batches, warmup, repeats, cpu_count, cpus_usable (the
  process's CPU affinity, e.g. 1 under `taskset -c 0`), loadavg,
  sources {source: description}, needed (None or {images_per_s_per_host, global_batch,
  step_seconds, num_hosts, topology, source}) and rows [{source, num_workers,
  images_per_s (median over repeats), images_per_s_runs, startup_s (iterator creation to
  first batch), warmup_batches, batch_shape, vs_needed (images_per_s / needed)}]. A source that fails
  gives rows with 'error' and the others still run."""
  needed = needed_images_per_s()  # flag errors before any work
  workers = [int(w) for w in FLAGS.num_workers]
  if not workers or min(workers) < 0:
    raise app.UsageError(f"--num_workers must list counts >= 0, got {FLAGS.num_workers}")
  if FLAGS.steps <= 0 or FLAGS.repeats <= 0 or FLAGS.data_batch_size <= 0:
    raise app.UsageError("--steps, --repeats and --data_batch_size must be positive")
  base = config.data if config is not None else data.default_data_config()
  result = {"image_size": FLAGS.image_size, "batch_size": FLAGS.data_batch_size,
            "batches": FLAGS.steps, "warmup": FLAGS.warmup, "repeats": FLAGS.repeats,
            "cpu_count": os.cpu_count(), "cpus_usable": _usable_cpus(),
            "loadavg": loadavg(), "needed": needed,
            "sources": {}, "rows": []}
  with tempfile.TemporaryDirectory(prefix="vqgan_bench_data_") as tmp:
    sources = data_sources(base, tmp)
    for name, (dc, what) in sources.items():
      result["sources"][name] = what
      for w in workers:
        dc.num_workers = w
        row = {"source": name, "num_workers": w}
        try:
          row.update(time_input(dc, FLAGS.data_batch_size, FLAGS.steps, FLAGS.warmup,
                                FLAGS.repeats))
        except Exception as err:  # pylint: disable=broad-except
          logging.exception("data: %s with %d workers failed", name, w)
          row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
        if needed and "images_per_s" in row:
          row["vs_needed"] = row["images_per_s"] / needed["images_per_s_per_host"]
        logging.info("data row %s", row)
        result["rows"].append(row)
  print(data_table(result), file=sys.stderr)
  sys.stderr.flush()
  return result


# ------------------------------------------------------------------------------ main


def main(argv):
  del argv
  config = FLAGS.config
  result: Dict[str, Any] = {"task": FLAGS.task, **environment(), "loadavg_start": loadavg()}
  if FLAGS.task in ("stage1_step", "stage2_step"):
    run = bench_stage1 if FLAGS.task == "stage1_step" else bench_stage2
    timed, flops_per_step = run(config)
    result.update(timed)
    result.update(device_peak())
    rates(result, flops_per_step, result["peak_flops_per_s"])
  elif FLAGS.task == "sample":
    result.update(bench_sample(config))
  elif FLAGS.task == "attention":
    result.update(bench_attention(config))
  elif FLAGS.task == "data":
    result.update(bench_data(config))
  else:
    result.update(bench_conv(config))
    result.update(device_peak())
  result["loadavg_end"] = loadavg()
  line = json.dumps(result, default=_json_default)
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as fh:
      fh.write(line + "\n")
  print(line)
  sys.stdout.flush()


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  return str(value)


if __name__ == "__main__":
  cli.run(main)

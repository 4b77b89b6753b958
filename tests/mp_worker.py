"""Subprocess worker for the sharding and multi-process tests (run by the tests, not pytest).

  python tests/mp_worker.py meshes OUT.json TMPDIR
      8 forced host devices (the caller sets XLA_FLAGS): one stage-1 train step and one
      stage-2 GPT train step on several meshes against 1 device, the shardings the rules
      give, the shard_map functions against their unsharded twins, and checkpoints moved
      between an 8-device mesh and 1 device. Writes its results as JSON.
  python tests/mp_worker.py train PROCESS_ID NUM_PROCESSES PORT WORKDIR STEPS OUT.json
      one process of a multi-process stage-1 then stage-2 run (`train_and_evaluate`) on a
      global mesh, with asynchronous checkpointing. JAX's distributed system is started the
      way the README tells CPU users: the caller sets JAX_COORDINATOR_ADDRESS,
      JAX_NUM_PROCESSES and JAX_PROCESS_ID (see `coordinator_env`), and only the trainer's
      own `maybe_initialize_distributed()` reads them.
  python tests/mp_worker.py resume WORKDIR STEPS OUT.json
      a single-process run that resumes WORKDIR (any earlier topology) up to STEPS.
  python tests/mp_worker.py preempt PROCESS_ID NUM_PROCESSES PORT WORKDIR SIGNAL_AT OUT.json
      one process of two multi-process stage-1 runs (distributed started by arguments) in
      which only process 1 gets a signal, sent to itself while step SIGNAL_AT is dispatched:
      SIGINT (a local flag, agreed at log steps), then SIGTERM (JAX's preemption service);
      records where each process stopped.

Device counts and the coordinator must be set before JAX starts, hence a process each.
Test modules import this file only for `run_workers` (launch with a deadline, kill the
process groups on timeout), `failure_report` and the tiny configs; JAX settings are made
in `main`, so importing it changes nothing in the pytest process.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from vqgan_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tests compile several tiny programs per process; XLA's CPU backend optimisation (LLVM)
# is most of that time and buys nothing for steps that run once.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


# ------------------------------------------------------------------- launching (test side)

def worker_env(num_devices: int, extra=None) -> dict:
  """Environment of a worker with `num_devices` forced CPU devices (plus `extra`)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  if os.environ.get("VQGAN_TEST_FAST_COMPILE", "1") == "1":
    flags.append(FAST_COMPILE_FLAG)
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  env.pop("JAX_NUM_PROCESSES", None)
  env.pop("JAX_PROCESS_ID", None)
  env.pop("VQGAN_DISTRIBUTED", None)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra or {})
  return env


def coordinator_env(port: int, num_processes: int, process_id: int) -> dict:
  """The environment variables that start a CPU process of a multi-process run."""
  return {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
          "JAX_NUM_PROCESSES": str(num_processes), "JAX_PROCESS_ID": str(process_id)}


def run_workers(arg_lists, num_devices: int, timeout: float, log_dir: str, envs=None):
  """Runs one worker per argument list at once; returns [(returncode, log text)].
  envs: an extra environment per worker (optional).

  Each worker runs in its own process group, and every group still running at the
  deadline (a hung collective, say) is killed, so a test can never hang the suite.
  Return code None means killed on timeout.
  """
  procs = []
  for i, args in enumerate(arg_lists):
    log = open(os.path.join(log_dir, f"worker_{args[0]}_{i}.log"), "w+")  # pylint: disable=consider-using-with
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, os.path.abspath(__file__)] + [str(a) for a in args],
        cwd=REPO, env=worker_env(num_devices, envs[i] if envs else None), stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True)
    procs.append((proc, log))
  deadline = time.time() + timeout
  results = []
  for proc, log in procs:
    try:
      code = proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      code = None
    results.append(code)
  for (proc, _), code in zip(procs, results):
    if code is None or proc.poll() is None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      proc.wait()
  out = []
  for (proc, log), code in zip(procs, results):
    log.seek(0)
    out.append((code, log.read()))
    log.close()
  # A worker that failed first makes its peers wait on a collective until killed: the
  # failing one's log is the useful one.
  return out


def failure_report(results) -> str:
  lines = []
  for i, (code, text) in enumerate(results):
    lines.append(f"--- worker {i}: return code {code} (None = killed on timeout) ---")
    lines.append("\n".join(l for l in text.splitlines()
                           if not l.startswith(("I0", "W0")))[-6000:])
  return "\n".join(lines)


# ---------------------------------------------------------------------- worker (jax side)

def _setup_jax():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("VQGAN_TEST_COMPILE_CACHE",
                                   os.path.join(REPO, ".pytest_cache", "jax_compile_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def mesh_config(shape):
  return ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape)))


def stage1_config(batch_size=8):
  """ch 32, ch_mult (1, 2), 16 px, 32 codes, no LPIPS: the tiny VQGAN of the brief."""
  from configs import vqgan_default  # pylint: disable=g-import-not-at-top
  config = vqgan_default.get_config()
  m = config.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, ()
  m.resolution, m.z_channels, m.embed_dim, m.n_embed = 16, 32, 32, 32
  config.data.image_size = 16
  config.data.photos.photo_short_side = 64
  config.data.photos.train_examples_per_epoch = 64
  config.loss.perceptual_weight = 0.0
  config.loss.disc_start = 10 ** 9
  config.loss.disc_num_layers = 2
  config.loss.disc_ndf = 8
  config.batch_size = batch_size
  config.learning_rate = 1e-3
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.num_eval_batches = 1
  config.eval_batch_size = 8
  config.async_checkpointing = False
  return config


def _rel_diff(a, b) -> float:
  """max |a - b| / max(|b|, tiny) over all leaves of two pytrees of arrays."""
  worst = 0.0
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(float(np.max(np.abs(y))) if y.size else 0.0, 1e-12)
    worst = max(worst, float(np.max(np.abs(x - y))) / scale if x.size else 0.0)
  return worst


# Parameter roots -> their optimiser state (first moments sit below ".../mu/<param path>").
OPT_ROOTS = {"g_params": "trainer/g_opt_state", "trainer/d_params": "trainer/d_opt_state",
             "params": "trainer/opt_state"}
NOISE = 1e-4  # gradients below NOISE x the largest one are rounding noise (see compare)


def compare_states(new, ref) -> dict:
  """How far a sharded step's new state is from the 1-device one.

  grad_rel / nu_rel: Adam's first / second moments (the gradients) against the largest
  one of the tree. param_rel: parameters, relative to each leaf's largest value, over the
  entries whose gradient is not rounding noise. Adam's first step moves every parameter by
  about lr * sign(gradient), so a gradient that is exactly zero in theory (e.g. a bias
  in front of a normalisation, the attention key bias) and 1e-12 in practice moves its
  parameter by +-lr with a random sign on either side; those entries (counted in
  noise_fraction) are compared through grad_rel only.
  """
  a, b = _named_leaves(new), _named_leaves(ref)
  a = {k: np.asarray(v, np.float64) for k, v in a.items()}
  b = {k: np.asarray(v, np.float64) for k, v in b.items()}
  moments = {m: [k for k in b if f"/{m}/" in k] for m in ("mu", "nu")}
  out = {}
  for m, keys in moments.items():
    top = max(float(np.max(np.abs(b[k]))) for k in keys)
    out[f"{m}_max"] = top
    out[f"{'grad' if m == 'mu' else 'nu'}_rel"] = max(
        float(np.max(np.abs(a[k] - b[k]))) for k in keys) / top
  gmax = out["mu_max"]
  param_rel, noisy, total, other_rel = 0.0, 0, 0, 0.0
  for k in b:
    if "/mu/" in k or "/nu/" in k:
      continue
    root = next((r for r in OPT_ROOTS if k.startswith(r + "/")), None)
    if root is None:  # step counters, code-usage EMA, batch statistics
      scale = max(float(np.max(np.abs(b[k]))) if b[k].size else 0.0, 1e-12)
      other_rel = max(other_rel, float(np.max(np.abs(a[k] - b[k]))) / scale)
      continue
    suffix = "/mu/" + k[len(root) + 1:]
    mu_key = next(m for m in moments["mu"] if m.startswith(OPT_ROOTS[root]) and
                  m.endswith(suffix))
    grad, other = np.abs(b[mu_key]), np.abs(a[mu_key])
    keep = (grad > NOISE * gmax) | ((grad == 0) & (other == 0))
    noisy += int(np.sum(~keep))
    total += keep.size
    scale = max(float(np.max(np.abs(b[k]))), 1e-12)
    if np.any(keep):
      param_rel = max(param_rel, float(np.max(np.abs(a[k] - b[k])[keep])) / scale)
  out.update(param_rel=param_rel, other_rel=other_rel, noise_fraction=noisy / max(total, 1))
  return out


def _leaf(tree, path):
  for key in path.split("/"):
    tree = getattr(tree, key) if hasattr(tree, key) and not isinstance(tree, dict) else tree[key]
  return tree


def _spec(array) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec]


# ------------------------------------------------------------------------------- meshes

STAGE1_MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
GPT_MESHES = ((8, 1, 1), (2, 2, 2), (1, 1, 8))
STAGE1_LEAVES = ("g_params/decoder/mid_block_1/conv1/kernel",
                 "g_params/quantize/embedding",
                 "trainer/g_opt_state/0/mu/decoder/mid_block_1/conv1/kernel")
GPT_LEAVES = ("params/blocks_0/attn/query/kernel", "params/blocks_0/attn/proj/kernel",
              "params/blocks_0/mlp/fc/kernel", "params/blocks_0/mlp/proj/kernel",
              "params/wte/embedding", "params/head/kernel", "params/wpe")


def _named_specs(shardings, names):
  flat = {sharding._path_name(p): s for p, s in  # pylint: disable=protected-access
          jax.tree_util.tree_flatten_with_path(
              shardings, is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))[0]}
  return {n: [list(a) if isinstance(a, tuple) else a for a in flat[n].spec] for n in names}


def _named_leaves(tree):
  return {sharding._path_name(p): x  # pylint: disable=protected-access
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_stage1(results):
  from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
  config = stage1_config(batch_size=8)
  devices = jax.devices()
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)}

  t0 = time.time()
  single = stage1_trainer.Stage1Runner(config, sharding.make_mesh(mesh_config((1, 1, 1)),
                                                                  devices[:1]))
  host_state = jax.device_get(single.init_state())
  ref_state, ref_metrics = single.train_step(
      jax.device_put(host_state, single.state_shardings),
      jax.device_put(batch, single.batch_sharding), 0)
  ref_state, ref_metrics = jax.device_get((ref_state, ref_metrics))
  results["stage1_compile_s"] = {"1,1,1": time.time() - t0}

  out = results["stage1"] = {}
  for shape in STAGE1_MESHES:
    t0 = time.time()
    runner = stage1_trainer.Stage1Runner(config, sharding.make_mesh(mesh_config(shape)))
    state = jax.device_put(host_state, runner.state_shardings)
    new_state, metrics = runner.train_step(state, sharding.global_batch(batch, runner.mesh), 0)
    leaves = _named_leaves(new_state)
    out[",".join(map(str, shape))] = {
        "loss": float(metrics["total_loss"]),
        "ref_loss": float(ref_metrics["total_loss"]),
        **compare_states(jax.device_get(new_state), ref_state),
        "code_counts_equal": bool(np.array_equal(np.asarray(metrics["code_counts"]),
                                                 np.asarray(ref_metrics["code_counts"]))),
        "specs": {n: _spec(leaves[n]) for n in STAGE1_LEAVES},
        "rule_specs": _named_specs(runner.state_shardings, STAGE1_LEAVES),
        "shard_shape": list(leaves[STAGE1_LEAVES[0]].addressable_shards[0].data.shape),
    }
    results["stage1_compile_s"][",".join(map(str, shape))] = time.time() - t0
  return single, host_state


def _tiny_frozen_stage1():
  """An in-memory FrozenStage1 (initialised, untrained tiny VQGAN) for the GPT runner."""
  from vqgan_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models import vqgan  # pylint: disable=g-import-not-at-top
  config = stage1_config()
  model = vqgan.vqmodel_from_config(config.model)
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)))["params"]
  return checkpointing.FrozenStage1(model=model, params=jax.device_get(params), config=config,
                                    metadata=checkpointing.stage1_metadata(config, 0), step=0)


def gpt_config():
  """2 layers, width 64, 4 heads, vocab 64, block 32; 4x4 token crops, start token."""
  from configs import transformer_default  # pylint: disable=g-import-not-at-top
  c = transformer_default.get_config()
  c.first_stage.workdir = "/in-memory"
  c.model.n_layer, c.model.n_head, c.model.n_embd = 2, 4, 64
  c.model.vocab_size, c.model.block_size = 64, 32
  c.cond.kind = "none"
  c.crop_tokens = 4
  c.data.image_size = 16
  c.batch_size, c.learning_rate, c.pkeep = 8, 1e-3, 1.0
  c.weight_decay = 0.01
  return c


def check_gpt(results):
  from vqgan_jax.training import stage2 as stage2_trainer  # pylint: disable=g-import-not-at-top
  config = gpt_config()
  first = _tiny_frozen_stage1()
  rng = np.random.default_rng(1)
  batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
           "label": np.zeros((8,), np.int32)}
  t0 = time.time()
  single = stage2_trainer.Stage2Runner(
      config, first, mesh=sharding.make_mesh(mesh_config((1, 1, 1)), jax.devices()[:1]))
  host_state = jax.device_get(single.init_state())
  ref_state, ref_metrics = jax.device_get(
      single.train_step(jax.device_put(host_state, single.state_shardings), batch))
  results["gpt_compile_s"] = {"1,1,1": time.time() - t0}
  out = results["gpt"] = {}
  for shape in GPT_MESHES:
    t0 = time.time()
    runner = stage2_trainer.Stage2Runner(config, first,
                                         mesh=sharding.make_mesh(mesh_config(shape)))
    abstract = jax.eval_shape(runner.setup.init_state, runner.setup.rng)
    expected = sharding.tree_shardings(abstract, runner.mesh, sharding.GPT_RULES)
    state = jax.device_put(host_state, runner.state_shardings)
    new_state, metrics = runner.train_step(state, batch)
    leaves = _named_leaves(new_state)
    names = GPT_LEAVES + ("trainer/opt_state/" + _opt_suffix(leaves, "blocks_0/attn/query/kernel"),)
    out[",".join(map(str, shape))] = {
        "loss": float(metrics["loss"]),
        "ref_loss": float(ref_metrics["loss"]),
        **compare_states(jax.device_get(new_state), ref_state),
        "specs": {n: _spec(leaves[n]) for n in names},
        "runner_uses_gpt_rules": all(
            a.spec == b.spec for a, b in zip(
                jax.tree_util.tree_leaves(runner.state_shardings),
                jax.tree_util.tree_leaves(expected))),
    }
    results["gpt_compile_s"][",".join(map(str, shape))] = time.time() - t0


def _opt_suffix(leaves, param_path):
  """The optimiser-state path (below trainer/opt_state/) of the first moment of a param."""
  for name in leaves:
    if name.startswith("trainer/opt_state/") and name.endswith("mu/" + param_path):
      return name[len("trainer/opt_state/"):]
  raise KeyError(param_path)


def check_shard_map(results):
  from vqgan_jax.models import quantizer  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  z = rng.standard_normal((128, 16)).astype(np.float32)
  codebook = rng.standard_normal((64, 16)).astype(np.float32)
  codebook[50] = codebook[3]            # a tie across tensor slices: the lowest index wins
  z[7] = codebook[3]
  ref = np.asarray(jax.jit(quantizer.nearest_code)(z, codebook))
  indices = rng.integers(0, 64, (16, 4, 4)).astype(np.int32)
  ref_counts = np.bincount(indices.ravel(), minlength=64)
  out = results["shard_map"] = {}
  for shape in ((1, 1, 8), (2, 2, 2), (2, 1, 4), (8, 1, 1)):
    mesh = sharding.make_mesh(mesh_config(shape))
    nearest = jax.jit(lambda a, b, m=mesh: sharding.sharded_nearest_code(a, b, m))(z, codebook)
    counts = jax.jit(lambda i, m=mesh: sharding.sharded_code_counts(i, 64, m))(indices)
    lowered = jax.jit(lambda a, b, m=mesh: sharding.sharded_nearest_code(a, b, m)).lower(
        z, codebook).as_text()
    out[",".join(map(str, shape))] = {
        "quantizer_hook_equal": _quantizer_with_sharded_lookup_equal(mesh),
        "nearest_equal": bool(np.array_equal(np.asarray(nearest), ref)),
        "tie_index": int(np.asarray(nearest)[7]),
        "counts_equal": bool(np.array_equal(np.asarray(counts), ref_counts)),
        "nearest_uses_shard_map": "shard_map" in lowered or "sdy.manual_computation" in lowered,
    }


def _quantizer_with_sharded_lookup_equal(mesh) -> bool:
  """VectorQuantizer forward + gradients with `sharded_nearest_code` as its lookup (what
  the proposed one-line hook in models/quantizer.py does) equal the plain module's."""
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models import quantizer  # pylint: disable=g-import-not-at-top
  vq = quantizer.VectorQuantizer(n_embed=64, embed_dim=16)
  z = jax.random.normal(jax.random.PRNGKey(3), (8, 4, 4, 16))
  params = vq.init(jax.random.PRNGKey(4), z)

  def loss(p, z):
    z_q, q_loss, info = vq.apply(p, z)
    return jnp.sum(z_q ** 2) + q_loss, info["indices"]

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  ref = jax.device_get(jax.jit(grad_fn)(params, z))
  sharded = functools.partial(sharding.sharded_nearest_code, mesh=mesh)
  with mock.patch.object(quantizer, "nearest_code", sharded):
    got = jax.device_get(jax.jit(grad_fn)(params, z))
  return all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                  jax.tree_util.tree_leaves(ref)))


def check_checkpoints(results, single, host_state, tmpdir):
  """Stage-1 state saved from an 8-device mesh restores on 1 device, and vice versa."""
  from vqgan_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
  config = stage1_config()
  wide = stage1_trainer.Stage1Runner(config, sharding.make_mesh(mesh_config((2, 2, 2))))
  out = results["checkpoints"] = {}
  for name, source, target in (("8_to_1", wide, single), ("1_to_8", single, wide)):
    workdir = os.path.join(tmpdir, name)
    manager = checkpointing.make_manager(workdir, async_checkpointing=False)
    state = jax.device_put(host_state, source.state_shardings)
    checkpointing.save(manager, 1, state.g_params, state.trainer,
                       checkpointing.stage1_metadata(config, 1))
    manager.wait_until_finished()
    restored = checkpointing.restore(
        checkpointing.make_manager(workdir, read_only=True), 1,
        target.abstract_state.g_params, target.abstract_state.trainer)
    leaves = _named_leaves({"g_params": restored["model"], "trainer": restored["trainer"]})
    probe = leaves["g_params/decoder/mid_block_1/conv1/kernel"]
    out[name] = {
        "equal": _rel_diff(jax.device_get((restored["model"], restored["trainer"])),
                           (host_state.g_params, host_state.trainer)) == 0.0,
        "num_devices": len(probe.sharding.device_set),
        "spec": _spec(probe) if hasattr(probe.sharding, "spec") else None,
    }
  # The loader stage 2 uses (replicated or first device) reads the 8-device checkpoint too.
  frozen = checkpointing.load_stage1(os.path.join(tmpdir, "8_to_1"))
  out["load_stage1_equal"] = _rel_diff(jax.device_get(frozen.params), host_state.g_params) == 0.0


def run_meshes(out_path, tmpdir):
  assert jax.device_count() == 8, jax.devices()
  results = {"device_count": jax.device_count()}
  t0 = time.time()
  check_shard_map(results)
  single, host_state = check_stage1(results)
  check_checkpoints(results, single, host_state, tmpdir)
  check_gpt(results)
  results["total_s"] = time.time() - t0
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


# ------------------------------------------------------------------------ multi-process

def _checkpoint_summary(workdir, step):
  """Step counter and a parameter checksum of a stage-1 checkpoint, read on this process."""
  from vqgan_jax import checkpointing  # pylint: disable=g-import-not-at-top
  frozen = checkpointing.load_stage1(workdir, step=step)
  leaves = jax.tree_util.tree_leaves(jax.device_get(frozen.params))
  return {"step": frozen.step, "param_sum": float(sum(np.sum(np.abs(x)) for x in leaves)),
          "finite": bool(all(np.all(np.isfinite(x)) for x in leaves))}


def stage2_run_config(workdir, steps, async_checkpointing=False):
  c2 = gpt_config()
  c2.first_stage.workdir = os.path.join(workdir, "stage1")
  c2.num_train_steps = steps
  c2.log_every_steps = 1
  c2.eval_every_steps = c2.checkpoint_every_steps = 2
  c2.num_eval_batches, c2.eval_batch_size = 1, 8
  c2.unigram_batches = 0
  c2.async_checkpointing = async_checkpointing
  c2.data.photos.photo_short_side = 64
  c2.data.photos.train_examples_per_epoch = 64
  return c2


def run_train(process_id, num_processes, port, workdir, steps, out_path):
  """One process of a 2-process run: stage 1 on a (1, 4, 1) mesh (parameters and optimiser
  state FSDP-sharded across both processes), then stage 2 on the result on (1, 2, 2), both
  with asynchronous checkpointing. Nothing here starts jax.distributed: the trainer does,
  from the JAX_* variables the caller set (checked against the arguments)."""
  assert os.environ["JAX_COORDINATOR_ADDRESS"] == f"127.0.0.1:{port}"
  assert os.environ["JAX_NUM_PROCESSES"] == str(num_processes)
  assert os.environ["JAX_PROCESS_ID"] == str(process_id)
  from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
  from vqgan_jax.training import stage2 as stage2_trainer  # pylint: disable=g-import-not-at-top
  results = {"distributed_before_training": jax.distributed.is_initialized()}
  t0 = time.time()
  config = stage1_config(batch_size=8)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  config.num_train_steps = steps
  config.async_checkpointing = True
  metrics = stage1_trainer.train_and_evaluate(config, os.path.join(workdir, "stage1"))
  results.update({"distributed_after_training": jax.distributed.is_initialized(),
                  "process_index": jax.process_index(), "process_count": jax.process_count(),
                  "device_count": jax.device_count(),
                  "local_device_count": jax.local_device_count(),
                  "async_checkpointing": config.async_checkpointing})
  results["stage1_metrics"] = {k: float(v) for k, v in metrics.items()}
  results["stage1_s"] = time.time() - t0
  if os.environ.get("MP_WORKER_STAGE2", "1") == "1":
    t0 = time.time()
    c2 = stage2_run_config(workdir, 2, async_checkpointing=True)
    c2.mesh.data, c2.mesh.fsdp, c2.mesh.tensor = 1, 2, 2
    metrics2 = stage2_trainer.train_and_evaluate(c2, os.path.join(workdir, "stage2"))
    results["stage2_metrics"] = {k: float(v) for k, v in metrics2.items()}
    results["stage2_s"] = time.time() - t0
  results["checkpoint"] = _checkpoint_summary(os.path.join(workdir, "stage1"), steps)
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


def run_resume(workdir, steps, out_path):
  """A single process (its local devices only) resumes a stage-1 workdir up to `steps`."""
  from vqgan_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
  stage1 = os.path.join(workdir, "stage1")
  before = checkpointing.latest_step(stage1)
  manager = checkpointing.make_manager(stage1, read_only=True)
  results = {"process_count": jax.process_count(), "device_count": jax.device_count(),
             "resumed_from": before,
             "data_state_restorable": sharding.data_state_restorable(manager, before),
             "before": _checkpoint_summary(stage1, before)}
  config = stage1_config(batch_size=8)
  config.num_train_steps = steps  # mesh data=-1: all local devices
  t0 = time.time()
  metrics = stage1_trainer.train_and_evaluate(config, stage1)
  results["metrics"] = {k: float(v) for k, v in metrics.items()}
  results["resume_s"] = time.time() - t0
  results["after"] = _checkpoint_summary(stage1, steps)
  runner = stage1_trainer.Stage1Runner(config)
  restored = checkpointing.restore(checkpointing.make_manager(stage1, read_only=True), steps,
                                   runner.abstract_state.g_params,
                                   runner.abstract_state.trainer)
  results["trainer_step"] = int(restored["trainer"].step)
  stage2 = os.path.join(workdir, "stage2")
  if os.path.isdir(stage2):  # the 2-process GPT (trained on (1, 2, 2)) goes on here too
    from vqgan_jax.training import stage2 as stage2_trainer  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    c2 = stage2_run_config(workdir, 3)  # mesh data=-1: all local devices
    metrics2 = stage2_trainer.train_and_evaluate(c2, stage2)
    results["stage2_metrics"] = {k: float(v) for k, v in metrics2.items()}
    results["stage2_latest_step"] = checkpointing.latest_step(stage2)
    results["stage2_resume_s"] = time.time() - t0
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


def run_preempt(process_id, num_processes, port, workdir, signal_at, out_path):
  """Only process 1 gets each signal; every process must stop after the same step, with one
  checkpoint of that step written by all of them together (asynchronously).

  Run 1, SIGINT: a local flag, all-gathered only at log steps (every 4 here), so both stop
  at the first multiple of 4 from SIGNAL_AT. Run 2, SIGTERM: JAX's preemption service (its
  own SIGTERM handler, a notifier thread, then a sync point agreed by all processes); steps
  from SIGNAL_AT on take 0.25 s so that the notice (polled about once a second) lands
  well before the 50 steps end."""
  sharding.maybe_initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  from vqgan_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
  from vqgan_jax.training import utils as train_utils  # pylint: disable=g-import-not-at-top
  original = stage1_trainer.Stage1Runner.train_step
  current = {"signal": None}

  def train_step(self, state, batch, step):
    if step + 1 >= signal_at and current["signal"] == signal.SIGTERM:
      time.sleep(0.25)
    if jax.process_index() == 1 and step + 1 == signal_at:
      os.kill(os.getpid(), current["signal"])
    return original(self, state, batch, step)

  stage1_trainer.Stage1Runner.train_step = train_step
  results = {"process_index": jax.process_index(),
             "preemption_service": train_utils.preemption_service_running()}
  for name, sig in (("sigint", signal.SIGINT), ("sigterm", signal.SIGTERM)):
    current["signal"] = sig
    config = stage1_config(batch_size=8)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    config.num_train_steps = 50
    config.checkpoint_every_steps = config.eval_every_steps = 50
    config.log_every_steps = 4
    config.async_checkpointing = True
    stage1 = os.path.join(workdir, name)
    out = results[name] = {"preempted_at": None}
    t0 = time.time()
    try:
      stage1_trainer.train_and_evaluate(config, stage1)
    except train_utils.Preempted as stop:
      out["preempted_at"] = stop.step
    out["seconds"] = time.time() - t0
    out["checkpoint_steps"] = sorted(
        checkpointing.make_manager(stage1, read_only=True).all_steps())
    out["checkpoint"] = _checkpoint_summary(stage1, out["preempted_at"]) \
        if out["preempted_at"] else None
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


def main(argv):
  _setup_jax()
  mode = argv[1]
  if mode == "meshes":
    run_meshes(argv[2], argv[3])
  elif mode == "train":
    run_train(int(argv[2]), int(argv[3]), int(argv[4]), argv[5], int(argv[6]), argv[7])
  elif mode == "resume":
    run_resume(argv[2], int(argv[3]), argv[4])
  elif mode == "preempt":
    run_preempt(int(argv[2]), int(argv[3]), int(argv[4]), argv[5], int(argv[6]), argv[7])
  else:
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
  main(sys.argv)

r"""Side-by-side step times: the PyTorch reference (taming-transformers) vs this project.

  python benchmarks/compare_reference.py --ref_python /tmp/refenv/bin/python

One command, one machine, one run. Each implementation runs in its own long-lived worker
subprocess (this file re-executed with --_worker): the reference in its virtualenv (only
the standard library, torch and taming are imported there), ours in the project venv
(optionally several, each with its own XLA_FLAGS or environment: --xla_flags_variant,
--env_variant; e.g. --env_variant MALLOC_MMAP_MAX_=0,MALLOC_TRIM_THRESHOLD_=2000000000
times ours with glibc keeping freed memory). The workers answer
timing requests over stdin/stdout in JSON and sit idle while another one is timed. Rounds
alternate the implementations for every configuration, so slow drifts in machine load hit
all of them; the table reports medians over all timed steps of all rounds.

Configurations (identical on both sides, f32, synthetic inputs, torch threads = --threads):
  (a) stage-1 step: VQGAN ch=64, ch_mult (1,1,2,2,4), num_res_blocks 1, attn_resolutions
      (16,), z_channels = embed_dim = 64, n_embed 1024, batch 4 of 64x64 images;
      loss = MSE(x, x_rec) + codebook loss; Adam(b1=0.5, b2=0.9); one step = forward +
      backward + optimizer update.
      Ours: `vqgan.VQModel` + optax.adam in a jitted step (donated state). Also reported:
      (a') `Stage1Setup.train_step` of an equivalent config (l2 pixel loss, no LPIPS, no
      GAN), which adds the trainer's bookkeeping (code usage EMA, finiteness guard).
  (b) stage-2 step: minGPT vocab 1024, block 256, 8 layers, 8 heads, width 512, batch 8 x
      256 tokens, next-token cross-entropy, Adam (lr 1e-4).
      Ours: `transformer.GPT` + optax.softmax_cross_entropy + optax.adam, jitted, donated.

Reference venv (never the project's):
  python3.11 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.13.0 \
      'taming-transformers-rom1504==0.0.6' 'pytorch-lightning==1.9.5' 'transformers==4.38.2' \
      'setuptools<81' omegaconf numpy einops
(einops: taming's quantizer imports it but the package does not declare it.)
taming imports torchvision (only for image logging). The torchvision wheel that pip pulls
in does not match torch 2.13 and fails on import ("operator torchvision::nms does not
exist"), so the worker installs an import hook that serves empty stub modules for
`torchvision*` before importing taming; nothing timed touches torchvision.
taming's VQModel is built with lossconfig target `torch.nn.Identity` (its LPIPS loss would
download VGG weights); the loss here is computed in the step function instead.

FLOPs (for MFU) come from vqgan_jax.flops and are the same for both implementations; the
peak is an f32 2048^3 matmul measured in this run by the plain 'ours' worker (each
worker's own matmul rate is printed too).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIG_A = dict(ch=64, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,),
                resolution=64, in_channels=3, out_ch=3, z_channels=64, embed_dim=64,
                n_embed=1024, batch=4, lr=4.5e-6 * 4, b1=0.5, b2=0.9)
CONFIG_B = dict(vocab_size=1024, block_size=256, n_layer=8, n_head=8, n_embd=512, batch=8,
                seq_len=256, lr=1e-4)


def loadavg():
  try:
    with open("/proc/loadavg") as fh:
      return float(fh.read().split()[0])
  except (OSError, ValueError):
    return None


def _timed(fn, steps, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


# ============================================================================ reference


def _install_torchvision_stub():
  """Serve empty modules for every `torchvision*` import (see the module docstring)."""
  import importlib.abc  # pylint: disable=g-import-not-at-top
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  class Stub(types.ModuleType):
    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)
      import importlib  # pylint: disable=g-import-not-at-top
      module = importlib.import_module(f"{self.__name__}.{name}")
      setattr(self, name, module)
      return module

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
      if name == "torchvision" or name.startswith("torchvision."):
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
      return None

    def create_module(self, spec):
      return Stub(spec.name)

    def exec_module(self, module):
      module.__path__ = []
      module.__version__ = "0.0.0+stub"

  sys.meta_path.insert(0, Finder())


class RefWorker:
  """Builds the reference models lazily and times their train steps."""

  def __init__(self, threads):
    _install_torchvision_stub()
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.torch = torch
    self.steps = {}

  def _build_a(self):
    torch = self.torch
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
    from taming.models.vqgan import VQModel  # pylint: disable=g-import-not-at-top
    c = CONFIG_A
    ddconfig = dict(double_z=False, z_channels=c["z_channels"], resolution=c["resolution"],
                    in_channels=c["in_channels"], out_ch=c["out_ch"], ch=c["ch"],
                    ch_mult=list(c["ch_mult"]), num_res_blocks=c["num_res_blocks"],
                    attn_resolutions=list(c["attn_resolutions"]), dropout=0.0)
    model = VQModel(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"},
                    n_embed=c["n_embed"], embed_dim=c["embed_dim"])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"], betas=(c["b1"], c["b2"]))
    size = c["resolution"]
    x = torch.rand(c["batch"], c["in_channels"], size, size) * 2 - 1

    def step():
      x_rec, q_loss = model(x)
      loss = F.mse_loss(x_rec, x) + q_loss
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return float(loss)

    return step, sum(p.numel() for p in model.parameters())

  def _build_b(self):
    torch = self.torch
    from taming.modules.transformer.mingpt import GPT  # pylint: disable=g-import-not-at-top
    c = CONFIG_B
    gpt = GPT(vocab_size=c["vocab_size"], block_size=c["block_size"], n_layer=c["n_layer"],
              n_head=c["n_head"], n_embd=c["n_embd"])
    gpt.train()
    opt = torch.optim.Adam(gpt.parameters(), lr=c["lr"])
    idx = torch.randint(0, c["vocab_size"], (c["batch"], c["seq_len"] + 1))
    # minGPT views the targets, so they must be contiguous (as taming's slices are not
    # views of a wider tensor either: it builds them with torch.cat).
    inputs, targets = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    def step():
      _, loss = gpt(inputs, targets=targets)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return float(loss)

    return step, sum(p.numel() for p in gpt.parameters())

  def matmul_peak(self, size=2048):
    torch = self.torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = _timed(lambda: torch.mm(a, b), 5, 2)
    return 2.0 * size ** 3 / statistics.median(times)

  def handle(self, request):
    if request["cmd"] == "info":
      return {"torch": self.torch.__version__, "threads": self.torch.get_num_threads(),
              "matmul_peak": self.matmul_peak()}
    name = request["config"]
    if name not in self.steps:
      start = time.perf_counter()
      step, n_params = (self._build_a if name == "a" else self._build_b)()
      self.steps[name] = (step, n_params, time.perf_counter() - start)
    step, n_params, build_s = self.steps[name]
    times = _timed(step, request["steps"], request["warmup"])
    return {"times": times, "params": n_params, "build_s": build_s}


def worker_main(kind, threads):
  if kind == "ours":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker = Ours()
  else:
    worker = RefWorker(threads)
  out = sys.stdout
  sys.stdout = sys.stderr  # keep library prints off the protocol channel
  out.write(json.dumps({"ready": True}) + "\n")
  out.flush()
  for line in sys.stdin:
    if not line.strip():
      continue
    try:
      reply = worker.handle(json.loads(line))
    except Exception as err:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      reply = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    out.write(json.dumps(reply) + "\n")
    out.flush()


class WorkerClient:
  """A worker subprocess ("ref": reference venv; "ours": this venv, optional XLA_FLAGS and
  extra environment variables)."""

  def __init__(self, kind, python, threads, xla_flags=None, extra_env=None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if kind == "ours":
      env.setdefault("JAX_PLATFORMS", "cpu")
      if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
      env.update(extra_env or {})
    # The reference runs outside the repo root, so nothing of the project shadows it.
    cwd = "/tmp" if kind == "ref" else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    self.proc = subprocess.Popen(
        [python, os.path.abspath(__file__), "--_worker", kind, "--threads", str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
    ready = self._read()
    assert ready.get("ready"), ready

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker exited (code {self.proc.poll()}); see stderr above")
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"worker: {reply['error']}\n{reply.get('traceback', '')}")
    return reply

  def request(self, **kwargs):
    self.proc.stdin.write(json.dumps(kwargs) + "\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


# ============================================================================ ours


class Ours:
  """Jitted train steps of this project for the same configurations."""

  def __init__(self):
    # vqgan_jax first: importing it sets the project's default XLA:CPU flags
    # (vqgan_jax/xla_cpu.py), which only take effect before JAX starts its backend.
    import vqgan_jax  # pylint: disable=g-import-not-at-top,unused-import
    import jax  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.steps = {}

  def _compiled(self, step, state, *args):
    jax = self.jax
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, *args).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
      holder["state"], out = compiled(holder["state"], *args)
      jax.block_until_ready((holder["state"], out))

    return run, compile_s

  def _build_a(self):
    jax = self.jax
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from vqgan_jax.models.vqgan import VQModel  # pylint: disable=g-import-not-at-top
    c = CONFIG_A
    model = VQModel(ch=c["ch"], ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
                    attn_resolutions=c["attn_resolutions"], resolution=c["resolution"],
                    in_channels=c["in_channels"], out_ch=c["out_ch"],
                    z_channels=c["z_channels"], embed_dim=c["embed_dim"], n_embed=c["n_embed"])
    size = c["resolution"]
    x = jax.random.uniform(jax.random.PRNGKey(1), (c["batch"], size, size, c["in_channels"]),
                           jnp.float32, -1.0, 1.0)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
    tx = optax.adam(c["lr"], b1=c["b1"], b2=c["b2"])

    def step(state, x):
      params, opt_state = state

      def loss_fn(p):
        out = model.apply({"params": p}, x, train=True)
        return jnp.mean(jnp.square(out["x_rec"] - x)) + out["q_loss"]

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    run, compile_s = self._compiled(step, (params, tx.init(params)), x)
    return run, n_params, compile_s

  def _build_a_trainer(self):
    jax = self.jax
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from configs import vqgan_default  # pylint: disable=g-import-not-at-top
    from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
    c = CONFIG_A
    config = vqgan_default.get_config()
    for key in ("ch", "num_res_blocks", "resolution", "in_channels", "out_ch", "z_channels",
                "embed_dim", "n_embed"):
      config.model[key] = c[key]
    config.model.ch_mult = c["ch_mult"]
    config.model.attn_resolutions = c["attn_resolutions"]
    config.loss.pixel_loss = "l2"
    config.loss.perceptual_weight = 0.0
    config.data.image_size = c["resolution"]
    config.batch_size = c["batch"]
    config.learning_rate = c["lr"]
    setup = stage1_trainer.Stage1Setup(config)
    state = jax.jit(setup.init_state)(setup.rng)
    size = c["resolution"]
    batch = {"image": jax.random.uniform(jax.random.PRNGKey(1),
                                         (c["batch"], size, size, c["in_channels"]),
                                         jnp.float32, -1.0, 1.0)}

    def step(state, batch):
      return setup.train_step(state, batch, None, use_gan=False)

    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(state.g_params))
    run, compile_s = self._compiled(step, state, batch)
    return run, n_params, compile_s

  def _build_b(self):
    jax = self.jax
    import optax  # pylint: disable=g-import-not-at-top
    from vqgan_jax.models.transformer import GPT  # pylint: disable=g-import-not-at-top
    c = CONFIG_B
    gpt = GPT(vocab_size=c["vocab_size"], block_size=c["block_size"], n_layer=c["n_layer"],
              n_head=c["n_head"], n_embd=c["n_embd"])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (c["batch"], c["seq_len"] + 1), 0,
                                c["vocab_size"])
    params = jax.jit(gpt.init)(jax.random.PRNGKey(0), tokens[:1, :-1])["params"]
    tx = optax.adam(c["lr"])

    def step(state, tokens):
      params, opt_state = state

      def loss_fn(p):
        logits = gpt.apply({"params": p}, tokens[:, :-1], train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    run, compile_s = self._compiled(step, (params, tx.init(params)), tokens)
    return run, n_params, compile_s

  def time(self, name, steps, warmup):
    if name not in self.steps:
      build = {"a": self._build_a, "a_trainer": self._build_a_trainer, "b": self._build_b}[name]
      self.steps[name] = build()
    run, n_params, compile_s = self.steps[name]
    return {"times": _timed(run, steps, warmup), "params": n_params, "compile_s": compile_s}

  def handle(self, request):
    if request["cmd"] == "info":
      return {"jax": self.jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "matmul_peak": self.matmul_peak()}
    return self.time(request["config"], request["steps"], request["warmup"])

  def matmul_peak(self, size=2048):
    jax = self.jax
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    mm = jax.jit(jnp.matmul)
    times = _timed(lambda: mm(a, b).block_until_ready(), 5, 2)
    return 2.0 * size ** 3 / statistics.median(times)


def analytic_flops():
  from vqgan_jax import flops  # pylint: disable=g-import-not-at-top
  a = CONFIG_A
  kw = {k: a[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution",
                          "in_channels", "out_ch", "z_channels", "embed_dim", "n_embed")}
  fa = flops.stage1_train_step_breakdown(a["batch"], a["resolution"], kw, perceptual=False)
  b = CONFIG_B
  fb = flops.gpt_train_step_flops(b["batch"], b["seq_len"], vocab_size=b["vocab_size"],
                                  n_layer=b["n_layer"], n_embd=b["n_embd"], n_head=b["n_head"])
  return {"a": sum(fa.values()), "a_trainer": sum(fa.values()), "b": fb}


# ============================================================================ main

LABELS = {"a": "(a) stage-1 step, VQGAN 64px b4", "a_trainer": "(a') Stage1Setup.train_step",
          "b": "(b) stage-2 step, GPT 8x512 b8x256"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--ref_python", default="/tmp/refenv/bin/python",
                      help="python of the reference venv (torch + taming)")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--configs", default="a,a_trainer,b",
                      help="comma list of a, a_trainer, b")
  parser.add_argument("--rounds", type=int, default=2, help="alternating ref/ours rounds")
  parser.add_argument("--steps_a", type=int, default=10, help="timed steps per round, (a)")
  parser.add_argument("--steps_b", type=int, default=4, help="timed steps per round, (b)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (first round)")
  parser.add_argument("--skip_ref", action="store_true", help="time only our implementation")
  parser.add_argument("--xla_flags_variant", action="append", default=[],
                      help="also time ours with XLA_FLAGS set to this (repeatable); the "
                      "plain 'ours' row inherits XLA_FLAGS from the environment")
  parser.add_argument("--env_variant", action="append", default=[],
                      help="also time ours with these environment variables, 'K=V[,K=V]' "
                      "(repeatable), e.g. MALLOC_MMAP_MAX_=0")
  parser.add_argument("--output", default=None, help="also write the results as JSON here")
  parser.add_argument("--_worker", choices=["ref", "ours"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._worker:  # pylint: disable=protected-access
    worker_main(args._worker, args.threads)  # pylint: disable=protected-access
    return

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  names = [n.strip() for n in args.configs.split(",") if n.strip()]
  load_start = loadavg()
  impls = {}  # implementation name -> worker
  if not args.skip_ref:
    impls["ref"] = WorkerClient("ref", args.ref_python, args.threads)
  impls["ours"] = WorkerClient("ours", sys.executable, args.threads)
  for i, flags in enumerate(args.xla_flags_variant):
    impls[f"ours+flags{i + 1}"] = WorkerClient("ours", sys.executable, args.threads, flags)
  for i, spec in enumerate(args.env_variant):
    extra = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    impls[f"ours+env{i + 1}"] = WorkerClient("ours", sys.executable, args.threads,
                                             extra_env=extra)
  info = {name: w.request(cmd="info") for name, w in impls.items()}
  times = {n: {impl: [] for impl in impls} for n in names}
  meta = {impl: {} for impl in impls}
  for r in range(args.rounds):
    for name in names:
      steps = args.steps_b if name == "b" else args.steps_a
      warmup = args.warmup if r == 0 else 1
      for impl, worker in impls.items():
        if impl == "ref" and name == "a_trainer":
          continue  # compared with the reference's (a)
        reply = worker.request(cmd="time", config=name, steps=steps, warmup=warmup)
        times[name][impl] += reply["times"]
        meta[impl][name] = {k: v for k, v in reply.items() if k != "times"}
      print(f"round {r}: {name} done (load {loadavg()})", file=sys.stderr, flush=True)
  for worker in impls.values():
    worker.close()
  load_end = loadavg()
  peak = info["ours"]["matmul_peak"]
  fl = analytic_flops()

  rows = []
  for name in names:
    ref_times = times["a" if name == "a_trainer" else name].get("ref", [])
    ref_median = statistics.median(ref_times) if ref_times else None
    for impl in impls:
      t = ref_times if impl == "ref" else times[name][impl]
      if not t or (impl == "ref" and name == "a_trainer"):
        continue
      median = statistics.median(t)
      row = {"config": name, "impl": impl, "label": LABELS[name], "flops_per_step": fl[name],
             "median_s": median, "min_s": min(t), "max_s": max(t), "steps": len(t),
             "mfu": fl[name] / median / peak, **meta[impl].get(name, {})}
      if ref_median and impl != "ref":
        row["ref_median_s"] = ref_median
        row["speedup_vs_ref"] = ref_median / median
      rows.append(row)

  print(f"\nload average (1 min): start {load_start}, end {load_end}")
  for impl, i in info.items():
    desc = (f"torch {i['torch']} ({i['threads']} threads)" if impl == "ref"
            else f"jax {i['jax']} XLA_FLAGS={i['xla_flags']!r}")
    print(f"  {impl:12s} {desc}; f32 2048^3 matmul {i['matmul_peak'] / 1e9:.1f} GFLOP/s")
  header = (f"{'configuration':36s} {'impl':11s} {'GFLOP/step':>10s} {'median s':>9s} "
            f"{'min s':>7s} {'max s':>7s} {'ref/this':>8s} {'MFU':>6s}")
  print(header)
  print("-" * len(header))
  for row in rows:
    ratio = f"{row['speedup_vs_ref']:7.2f}x" if "speedup_vs_ref" in row else f"{'':8s}"
    print(f"{row['label']:36s} {row['impl']:11s} {row['flops_per_step'] / 1e9:10.2f} "
          f"{row['median_s']:9.3f} {row['min_s']:7.3f} {row['max_s']:7.3f} {ratio} "
          f"{100 * row['mfu']:5.1f}%")
  print("(medians over all timed steps of all rounds; ref/this > 1: faster than the reference; "
        "MFU = analytic FLOPs / median / the 'ours' worker's measured f32 matmul rate. (a') is "
        "compared with the reference's (a).)")
  out = {"rows": rows, "loadavg_start": load_start, "loadavg_end": load_end, "info": info,
         "rounds": args.rounds, "times": times}
  if args.output:
    with open(args.output, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()

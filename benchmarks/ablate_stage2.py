"""Where the time of the stage-2 reference step (b) goes: interleaved ablations.

Each variant swaps one part of the GPT for a cheaper or different version while its train
step is traced, then all variants are timed in alternation, round by round, in one process
(so a drift in machine load hits all of them). The removals are not models anyone should
train; they measure what a part costs inside the whole compiled step, which on XLA:CPU is
not the sum of what it costs alone.

  python benchmarks/ablate_stage2.py --variants base,no_attention,no_layernorm --rounds 5

Variants (combine with '+'):
  base                 the model as it is
  no_attention         attention returns v (XLA then also drops the q and k projections)
  no_layernorm         LayerNorm replaced by a per-channel scale
  relu                 ReLU instead of the exact GELU
  gelu_erf             the exact GELU written as 0.5 x (1 + erf(x / sqrt 2)) (torch's form)
  no_query_blocks      attention over the whole causal square at once, without the query
                       blocks of `causal_softmax_attention` (4 at 256 tokens)
  qkv_fused            q, k, v from one matmul over the concatenated kernels
"""

import contextlib
import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vqgan_jax  # pylint: disable=unused-import,g-import-not-at-top  (sets XLA:CPU flags first)
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax import lax  # pylint: disable=g-import-not-at-top

from vqgan_jax.models import attention, transformer  # pylint: disable=g-import-not-at-top

import compare_reference  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["base", "no_attention", "no_layernorm", "relu", "gelu_erf",
                               "no_query_blocks", "qkv_fused"], "Variants, the first is the baseline.")
flags.DEFINE_integer("rounds", 5, "Timed rounds (each runs every variant once).")

PATCHES = {}


def _patch(name):
  def register(fn):
    PATCHES[name] = contextlib.contextmanager(fn)
    return fn
  return register


@contextlib.contextmanager
def _swapped(owner, attr, value):
  old = getattr(owner, attr)
  setattr(owner, attr, value)
  try:
    yield
  finally:
    setattr(owner, attr, old)


@_patch("no_attention")
def _no_attention():
  with _swapped(attention.SoftmaxAttention, "parallel", lambda self, q, k, v: v):
    yield


class _ScaleOnly(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param("scale", nn.initializers.ones, (x.shape[-1],))


@_patch("no_layernorm")
def _no_layernorm():
  with _swapped(transformer, "_layer_norm", lambda dtype, name: _ScaleOnly(name=name)):
    yield


class _Activation:
  """Stands in for `flax.linen` inside transformer.py with a different `gelu`."""

  def __init__(self, gelu):
    self.gelu = gelu

  def __getattr__(self, name):
    return getattr(nn, name)


@_patch("relu")
def _relu():
  with _swapped(transformer, "nn", _Activation(lambda x, approximate=False: jax.nn.relu(x))):
    yield


@_patch("gelu_erf")
def _gelu_erf():
  inv_sqrt2 = np.float32(1 / np.sqrt(2))
  gelu = lambda x, approximate=False: 0.5 * x * (1.0 + lax.erf(x * inv_sqrt2))
  with _swapped(transformer, "nn", _Activation(gelu)):
    yield


@_patch("no_query_blocks")
def _no_query_blocks():
  with _swapped(attention, "causal_query_blocks", lambda t, **kw: [(0, t)]):
    yield


@_patch("qkv_fused")
def _qkv_fused():
  cls = transformer.CausalSelfAttention
  separate, fused = cls._qkv, cls._qkv_fused  # pylint: disable=protected-access

  def qkv(self, x):
    return separate(self, x) if self.is_initializing() else fused(self, x)

  # _qkv_fused falls back to _qkv while initialising: keep that pointing at the original.
  with _swapped(cls, "_qkv", qkv), _swapped(cls, "_qkv_fused", lambda self, x: separate(self, x)):
    yield


def build_step():
  """The compiled (b) step exactly as compare_reference.py builds it; returns its runner."""
  run, _, _ = compare_reference.Ours()._build_b()  # pylint: disable=protected-access
  return run


def main(argv):
  del argv
  unknown = [p for v in FLAGS.variants for p in v.split("+") if p != "base" and p not in PATCHES]
  if unknown:
    raise app.UsageError(f"unknown variant parts {unknown}; known: base, {', '.join(PATCHES)}")
  runs = {}
  for variant in FLAGS.variants:
    with contextlib.ExitStack() as stack:
      for part in variant.split("+"):
        if part != "base":
          stack.enter_context(PATCHES[part]())
      runs[variant] = build_step()
    for _ in range(2):  # warm-up
      runs[variant]()
  times = {v: [] for v in runs}
  load_start = os.getloadavg()[0]
  for _ in range(FLAGS.rounds):
    for variant, run in runs.items():
      start = time.perf_counter()
      run()
      times[variant].append(time.perf_counter() - start)
  base = statistics.median(times[FLAGS.variants[0]])
  rows = {v: {"median_s": statistics.median(t), "min_s": min(t), "runs_s": t,
              "vs_first": statistics.median(t) / base} for v, t in times.items()}
  for v, r in rows.items():
    print(f"{v:28s} median {r['median_s']:.3f} s  min {r['min_s']:.3f} s  "
          f"x{r['vs_first']:.3f} of {FLAGS.variants[0]}")
  print(json.dumps({"rounds": FLAGS.rounds, "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()[0], "variants": rows}))


if __name__ == "__main__":
  app.run(main)

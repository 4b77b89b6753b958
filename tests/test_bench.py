"""`python -m vqgan_jax.bench --task sample` end to end on a tiny GPT (a smoke run: the
figures are timings, so only their structure and consistency are checked)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sample_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "sample.json"
  cmd = [sys.executable, "-m", "vqgan_jax.bench", "--task=sample", "--vocab_size=64",
         "--n_layer=1", "--n_head=2", "--n_embd=32", "--sample_lengths=16", "--positions=8,16",
         "--decode_steps=4", "--decode_rounds=2", "--kv_rounds=3", "--naive_steps=4",
         "--long_length=16", "--nofull_long_sampling", "--train_lengths=16", "--train_steps=1",
         "--scaling_batches=1,3", "--scaling_length=12", "--window=3", "--sliding_grid=5",
         "--peak_size=256", f"--output={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = json.loads(proc.stdout.strip().splitlines()[-1])
  with open(out) as fh:
    assert json.load(fh) == printed
  return printed


def test_kv_vs_naive_alternates_the_two_samplers(sample_result):
  row = sample_result["kv_vs_naive"]["16"]
  assert row["rounds"] == 3
  assert len(row["kv_cache_runs_s"]) == 3 and len(row["naive_runs_s"]) == 3
  assert row["naive_estimated_from_steps"] == 4
  # The naive total is the median naive run scaled from 4 steps to 16 tokens.
  runs = sorted(row["naive_runs_s"])
  assert row["naive_s"] == pytest.approx(runs[1] / 4 * 16)
  assert row["kv_cache_s"] == pytest.approx(sorted(row["kv_cache_runs_s"])[1])
  assert row["speedup"] == pytest.approx(row["naive_s"] / row["kv_cache_s"])


def test_per_token_and_long_sampling_rows(sample_result):
  per_token = sample_result["per_token"]
  for kind in ("softmax", "linear"):
    assert set(per_token[kind]) == {"8", "16"}
    for row in per_token[kind].values():
      assert row["s_per_token"] > 0 and row["rounds"] == 2
  long = sample_result["long_sampling"]
  # Estimated from the per-token time at the last position.
  assert long["softmax_cache"]["s"] == pytest.approx(per_token["softmax"]["16"]["s_per_token"] * 16)
  assert set(sample_result["train_steps"]) == {"softmax", "linear", "batch"}


def test_batch_scaling_and_sliding_window_rows(sample_result):
  scaling = sample_result["batch_scaling"]
  assert scaling["tokens"] == 12 and set(scaling["batches"]) == {"1", "3"}
  for b, row in scaling["batches"].items():
    assert len(row["runs_s"]) == 3
    assert row["tokens_per_s"] == pytest.approx(int(b) * 12 / row["s"])
  assert scaling["batches"]["1"]["tokens_per_s_vs_first"] == 1.0
  window = sample_result["sliding_window"]
  assert (window["window"], window["grid"], window["positions"]) == (3, 5, 25)
  # 5 x 5 grid, 3 x 3 window: left = clip(j - 1, 0, 2) is 0, 0, 1, 2, 2 along a row, so
  # the origin repeats at j = 1 and j = 4 of each of the 5 rows.
  assert window["cached"]["cached_positions"] == 10
  assert window["recomputed"]["cached_positions"] == 0
  for row in (window["cached"], window["recomputed"]):
    assert row["tokens_per_s"] == pytest.approx(25 / row["s"])
  assert window["cache_speedup"] == pytest.approx(window["recomputed"]["s"] / window["cached"]["s"])

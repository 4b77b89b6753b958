"""`python -m vqgan_jax.bench --task sample` end to end on a tiny GPT, and `--task data` on
tiny crops (smoke runs: the figures are timings, so only their structure and consistency
are checked)."""

import json
import os
import re
import statistics
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


# ------------------------------------------------------------------------------ --task data


def _run_bench(args, tmp_path):
  out = tmp_path / "data.json"
  cmd = [sys.executable, "-m", "vqgan_jax.bench", "--task=data", "--image_size=16",
         "--steps=2", "--warmup=1", "--repeats=2", "--num_workers=0", "--data_batch_size=4",
         "--generated_images=6", "--generated_size=48x40", f"--json={out}", *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  return proc, out


@pytest.fixture(scope="module")
def data_result(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("bench_data")
  proc, out = _run_bench(["--global_batch=96", "--step_seconds=0.5", "--num_hosts=4"],
                         tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # stdout is the JSON line alone (tfds's preparation messages go to stderr).
  printed = json.loads(proc.stdout)
  with open(out) as fh:
    assert json.load(fh) == printed
  return printed, proc.stderr


def test_data_rows_for_every_source(data_result):
  result, _ = data_result
  assert result["task"] == "data"
  assert (result["image_size"], result["batch_size"], result["batches"], result["repeats"]) == (
      16, 4, 2, 2)
  assert set(result["sources"]) == {"photos", "folder", "tfds"}
  assert "6 generated 48x40 JPEG/PNG" in result["sources"]["folder"]
  assert "ArrayRecord" in result["sources"]["tfds"]
  rows = result["rows"]
  assert [(r["source"], r["num_workers"]) for r in rows] == [
      ("photos", 0), ("folder", 0), ("tfds", 0)]
  for row in rows:
    assert "error" not in row, row
    assert row["batch_shape"] == [4, 16, 16, 3]
    assert len(row["images_per_s_runs"]) == 2 and min(row["images_per_s_runs"]) > 0
    assert row["images_per_s"] == pytest.approx(statistics.median(row["images_per_s_runs"]))
    assert row["images_per_s"] > 0 and row["startup_s"] > 0


def test_data_needed_rate_from_flags(data_result):
  result, stderr = data_result
  needed = result["needed"]
  assert needed["images_per_s_per_host"] == pytest.approx(96 / 0.5 / 4)
  assert (needed["global_batch"], needed["step_seconds"], needed["num_hosts"]) == (96, 0.5, 4)
  assert needed["source"] == "flags"
  for row in result["rows"]:
    assert row["vs_needed"] == pytest.approx(row["images_per_s"] / 48.0)
  # The readable table goes to stderr.
  assert "needed per host: 48.0 images/s" in stderr
  assert re.search(r"^tfds\s+0\s+[0-9.]+", stderr, re.MULTILINE)


def test_data_needed_rate_from_dry_run_json(tmp_path):
  report = tmp_path / "dry_run.json"
  report.write_text(json.dumps({
      "topology": "v5e:16x16", "num_hosts": 64, "global_batch": 1024,
      "steps": {"eval": {"estimated_step_seconds": 0.1},
                "train": {"estimated_step_seconds": 0.8}}}))
  proc, out = _run_bench(["--data_sources=photos", f"--dry_run_json={report}"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  needed = result["needed"]
  assert needed["images_per_s_per_host"] == pytest.approx(1024 / 0.8 / 64)
  assert (needed["topology"], needed["num_hosts"], needed["step_seconds"]) == (
      "v5e:16x16", 64, 0.8)
  assert [r["source"] for r in result["rows"]] == ["photos"]
  # Both ways of giving the target at once is a usage error.
  proc, _ = _run_bench(["--data_sources=photos", f"--dry_run_json={report}",
                        "--global_batch=8"], tmp_path)
  assert proc.returncode != 0 and "not both" in proc.stderr

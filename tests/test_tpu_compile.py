"""Ahead-of-time TPU compilation of tiny configs (`python -m vqgan_jax.dry_run --topology`).

libtpu lives in .venv-tpu (`make tpu-tools`, which `make test` runs): a venv whose only
own package is libtpu, reading the main environment's packages. The dry runs execute
there, in a subprocess, for a 4-chip v5e slice with FSDP over all chips.
"""

import json
import os
import subprocess
import sys

import pytest

from tests import mp_worker
from vqgan_jax import tpu_compile

TPU_PYTHON = os.path.join(mp_worker.REPO, ".venv-tpu", "bin", "python")


def _dry_run(tmp_path, name, args):
  if not os.path.exists(TPU_PYTHON):
    pytest.fail(f"{TPU_PYTHON} is missing: run `make tpu-tools` (make test does)")
  out = os.path.join(tmp_path, f"{name}.json")
  env = mp_worker.worker_env(1)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [TPU_PYTHON, "-m", "vqgan_jax.dry_run", "--topology", "v5e:2x2", "--mesh", "1,4,1",
       "--json", out] + args,
      cwd=mp_worker.REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f), proc.stdout


def _check_fsdp_step(report):
  assert report["fits"]
  total = report["per_device_bytes"]
  assert 0 < total["total"] <= report["device_memory_bytes"]
  assert report["flops_per_step"] > 0 and report["estimated_step_seconds"] > 0
  # FSDP gathers weights, never activations: no all-gather larger than the largest weight.
  assert report["ops"]["all-gather"]["count"] > 0
  assert 0 < report["largest_all_gather_bytes"] <= report["largest_weight_bytes"], report


def test_stage1_tiny_compiles_for_tpu_with_gan_and_lpips(tmp_path):
  result, stdout = _dry_run(tmp_path, "stage1", [
      "--config", "configs/vqgan_tiny.py", "--config.loss.perceptual_weight=1.0",
      "--config.loss.disc_start=0", "--config.batch_size=8", "--config.eval_batch_size=8",
      "--config.model.ch=64"])
  assert result["stage"] == "vqgan" and result["num_chips"] == 4
  assert set(result["steps"]) == {"train", "eval"}
  _check_fsdp_step(result["steps"]["train"])
  # The GAN step ran the discriminator too: its FLOPs are in the analytic count.
  assert result["steps"]["train"]["model_flops_per_step"] > 0
  assert result["formula"]["params"] > 0
  assert "train" in stdout and "GiB" in stdout


def test_stage2_scanned_gpt_compiles_for_tpu_without_gathering_activations(tmp_path):
  """Width 1536 (the 1.4B model's) with 2 examples per chip: here, without the models'
  activation constraints, XLA all-gathers the whole batch's activations (bf16[8,256,1536])
  instead of the weights (checked by removing `sharding.constrain`'s effect)."""
  batch = 8
  result, _ = _dry_run(tmp_path, "stage2", [
      "--config", "configs/transformer_tiny.py", "--stage1_config", "configs/vqgan_tiny.py",
      "--config.first_stage.n_embed=1024", "--config.data.image_size=32",
      "--config.model.n_embd=1536", "--config.model.n_head=16", "--config.model.n_layer=2",
      "--config.model.scan_layers=True", "--config.model.remat=full",
      f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}",
      f"--config.sampling.batch_size={batch}",
      "--noexact_costs"])  # memory and collectives are what this test is about
  assert set(result["steps"]) == {"train", "eval", "decode"}
  train = result["steps"]["train"]
  _check_fsdp_step(train)
  activations = [s for s in train["all_gather_shapes"] if s.split("[")[1].startswith(f"{batch},")]
  assert not activations, train["all_gather_shapes"]
  for step in ("eval", "decode"):
    assert result["steps"][step]["fits"]
  assert train["counts"] == "compiled program"
  assert 0 < train["estimated_mfu"]


def test_missing_libtpu_is_a_clear_error():
  proc = subprocess.run(
      [sys.executable, "-m", "vqgan_jax.dry_run", "--config", "configs/vqgan_tiny.py",
       "--topology", "v5e:2x2", "--mesh", "1,4,1"],
      cwd=mp_worker.REPO, env=mp_worker.worker_env(1), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode != 0
  assert "make tpu-tools" in proc.stderr and "libtpu" in proc.stderr


def test_hlo_collectives_are_parsed():
  hlo = "\n".join([
      "  %all-gather.1 = bf16[48,1536,1536]{2,1,0} all-gather(bf16[48,6,1536] %p), dims={1}",
      "  %ag-start = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(f32[4,8] %x)",
      "  %ag-done = f32[16,8]{1,0} all-gather-done((f32[4,8], f32[16,8]) %ag-start)",
      "  %cp-start = (f32[1,256]{1,0}, f32[1,256]{1,0}, u32[], u32[]) "
      "collective-permute-start(f32[1,256] %w)",
      "  %cp-done = f32[1,256]{1,0} collective-permute-done((f32[1,256], f32[1,256], u32[], "
      "u32[]) %cp-start)",
      "  ROOT %all-reduce = f32[] all-reduce(f32[] %y), to_apply=%add",
      "  %fusion = f32[2] fusion(f32[2] %z), kind=kLoop",
  ])
  found = tpu_compile.collectives(hlo)
  assert found["ops"]["all-gather"] == {"count": 2, "bytes": 48 * 1536 * 1536 * 2 + 16 * 8 * 4}
  assert found["ops"]["all-reduce"] == {"count": 1, "bytes": 4}
  assert found["ops"]["collective-permute"] == {"count": 1, "bytes": 256 * 4}
  assert found["largest_all_gather_bytes"] == 48 * 1536 * 1536 * 2
  assert found["largest_all_gather_shape"] == "bf16[48,1536,1536]"
  with pytest.raises(tpu_compile.TpuCompileError, match="unknown chip"):
    tpu_compile.chip_for("v9x:2x2")


def test_out_of_memory_compile_is_reported_as_not_fitting():
  error = tpu_compile.DoesNotFit(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (26.89G) exceeds available HBM (15.75G).")
  report = error.report(tpu_compile.chip_for("v5e:2x2"))
  assert report["fits"] is False
  assert report["per_device_bytes"]["total"] == int(26.89 * 2 ** 30)
  assert report["available_bytes"] == int(15.75 * 2 ** 30)
  assert "26.89G" in report["compile_error"]

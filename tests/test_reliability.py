"""Fault tolerance: preemption, bit-exact resume after SIGKILL, partial checkpoints,
non-finite steps and failed checkpoint writes (issue "Reliability")."""

import errno
import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import vqgan_tiny
from vqgan_jax import checkpointing, sharding
from vqgan_jax.training import stage1 as stage1_trainer
from vqgan_jax.training import utils as train_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".pytest_cache", "jax_compile_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             TF_CPP_MIN_LOG_LEVEL="2")
  return env


def _start(script, config, workdir, *overrides):
  cmd = [sys.executable, os.path.join(ROOT, script), f"--config={config}",
         f"--workdir={workdir}", *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, step, timeout=300):
  """Reads the trainer's output until it reports `step`; returns False if it exited."""
  deadline = time.time() + timeout
  needle = f"step {step}/"
  for line in proc.stdout:
    if needle in line:
      return True
    if time.time() > deadline:
      proc.kill()
      raise TimeoutError(f"no '{needle}' within {timeout}s")
  return False


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _logged_losses(workdir):
  """{(tag, step): value} of every logged scalar but wall-clock speed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  values = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "steps_per_sec" or value.tag.startswith("_hparams_"):
          continue
        try:
          array = tf.make_ndarray(value.tensor)
        except Exception:  # pylint: disable=broad-except
          continue
        if array.ndim == 0 and array.dtype.kind == "f":
          values[(value.tag, event.step)] = float(array)
  return values


def _restored_state(workdir, step):
  runner = stage1_trainer.Stage1Runner(vqgan_tiny.get_config(), sharding.make_mesh(
      vqgan_tiny.get_config().mesh))
  manager = checkpointing.make_manager(workdir, read_only=True)
  restored = checkpointing.restore(manager, step, runner.abstract_state.g_params,
                                   runner.abstract_state.trainer)
  return jax.device_get((restored["model"], restored["trainer"]))


TINY = os.path.join("configs", "vqgan_tiny.py")


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
  proc = _start("train_stage1.py", TINY, tmp_path, "--config.num_train_steps=100000",
                "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000")
  assert _wait_for_step(proc, 3)
  proc.send_signal(signal.SIGTERM)
  code, out = _finish(proc)
  assert code == 0, out[-3000:]
  step = checkpointing.latest_step(str(tmp_path))
  assert step is not None and 3 <= step < 100000
  manager = checkpointing.make_manager(str(tmp_path), read_only=True)
  assert checkpointing.read_metadata(manager, step)["step"] == step
  assert "Stopped by signal" in out


def _raw_items(workdir, step):
  """The model and trainer items of a checkpoint as saved (numpy), whatever the stage."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = checkpointing.make_manager(workdir, read_only=True)
  restored = manager.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(), trainer=ocp.args.StandardRestore()))
  return jax.device_get((restored["model"], restored["trainer"]))


def _kill_and_resume_matches_uninterrupted(tmp_path, script, config, extra, steps):
  common = [f"--config.num_train_steps={steps}", "--config.checkpoint_every_steps=2",
            "--config.eval_every_steps=100", "--config.log_every_steps=1", *extra]
  reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
  code, out = _finish(_start(script, config, reference_dir, *common))
  assert code == 0, out[-3000:]

  rng = random.Random(0)
  kills = 0
  while True:
    proc = _start(script, config, killed_dir, *common)
    start = checkpointing.latest_step(str(killed_dir)) or 0
    kill_at = rng.randint(start + 1, steps) if kills < 3 and start < steps - 1 else None
    if kill_at is not None and _wait_for_step(proc, kill_at):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      kills += 1
      # Whatever the kill interrupted, the newest finished checkpoint must restore.
      latest = checkpointing.latest_step(str(killed_dir))
      if latest is not None:
        _raw_items(str(killed_dir), latest)
      continue
    code, out = _finish(proc)
    assert code == 0, out[-3000:]
    break
  assert kills == 3
  reference = _raw_items(str(reference_dir), steps)
  resumed = _raw_items(str(killed_dir), steps)
  ref_leaves, got_leaves = jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(resumed)
  assert len(ref_leaves) == len(got_leaves)
  for a, b in zip(ref_leaves, got_leaves):
    np.testing.assert_array_equal(a, b)
  ref_logs, got_logs = _logged_losses(str(reference_dir)), _logged_losses(str(killed_dir))
  assert set(ref_logs) == set(got_logs) and len(ref_logs) >= steps
  for key, value in ref_logs.items():
    assert got_logs[key] == value, key
  return kills, len(ref_logs)


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bit_exact(tmp_path):
  kills, logged = _kill_and_resume_matches_uninterrupted(tmp_path, "train_stage1.py", TINY, [],
                                                         steps=12)
  assert kills == 3 and logged >= 12


@pytest.mark.slow
def test_stage2_sigkill_at_random_steps_then_resume_is_bit_exact(tmp_path):
  stage1_dir = tmp_path / "stage1"
  code, out = _finish(_start("train_stage1.py", TINY, stage1_dir))
  assert code == 0, out[-3000:]
  kills, logged = _kill_and_resume_matches_uninterrupted(
      tmp_path, "train_stage2.py", os.path.join("configs", "transformer_tiny.py"),
      [f"--config.first_stage.workdir={stage1_dir}"], steps=12)
  assert kills == 3 and logged >= 12


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path):
  config = vqgan_tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps = 2, 1
  stage1_trainer.train_and_evaluate(config, str(tmp_path))
  partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
  (partial / "model").mkdir(parents=True)
  (partial / "model" / "junk").write_bytes(b"\x00" * 100)
  assert checkpointing.latest_step(str(tmp_path)) == 2
  assert checkpointing.load_stage1(str(tmp_path)).step == 2
  config.num_train_steps = 3
  stage1_trainer.train_and_evaluate(config, str(tmp_path))
  assert not partial.exists()
  assert checkpointing.latest_step(str(tmp_path)) == 3


class _NaNInjector:
  """Wraps sharding.global_batch to poison the image batch of one chosen call."""

  def __init__(self, monkeypatch, poison_call):
    self.calls = 0
    self.poison_call = poison_call
    self.original = sharding.global_batch
    monkeypatch.setattr(sharding, "global_batch", self)

  def __call__(self, batch, mesh):
    self.calls += 1
    if self.calls == self.poison_call and "mask" not in batch:
      batch = dict(batch)
      batch["image"] = np.full_like(batch["image"], np.nan)
    return self.original(batch, mesh)


def test_nonfinite_error_policy_names_step_and_keeps_checkpoints_finite(tmp_path, monkeypatch):
  config = vqgan_tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 4, 1, 100
  _NaNInjector(monkeypatch, poison_call=2 + 1)  # call 1 is the step-0 eval batch
  with pytest.raises(train_utils.NonFiniteError, match=r"non-finite \w+ at step 2"):
    stage1_trainer.train_and_evaluate(config, str(tmp_path))
  assert checkpointing.latest_step(str(tmp_path)) == 1
  params = checkpointing.load_stage1(str(tmp_path)).params
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_nonfinite_skip_policy_skips_and_counts(tmp_path, monkeypatch):
  config = vqgan_tiny.get_config()
  config.num_train_steps, config.eval_every_steps = 3, 100
  config.nonfinite_policy = "skip"
  _NaNInjector(monkeypatch, poison_call=2 + 1)
  stage1_trainer.train_and_evaluate(config, str(tmp_path))
  _, trainer = _restored_state(str(tmp_path), 3)
  assert int(trainer.nonfinite_steps) == 1 and int(trainer.step) == 3
  params = checkpointing.load_stage1(str(tmp_path)).params
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(params))


def test_full_disk_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
  config = vqgan_tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps, config.eval_every_steps = 2, 1, 100
  config.async_checkpointing = False
  original = checkpointing.save
  calls = []

  def failing_save(manager, step, *args, **kwargs):
    calls.append(step)
    if step == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(manager, step, *args, **kwargs)

  monkeypatch.setattr(checkpointing, "save", failing_save)
  with pytest.raises(checkpointing.CheckpointWriteError,
                     match=r"step 2 .*No space left.*previous checkpoint \(step 1\) is intact"):
    stage1_trainer.train_and_evaluate(config, str(tmp_path))
  assert checkpointing.latest_step(str(tmp_path)) == 1
  assert checkpointing.load_stage1(str(tmp_path)).step == 1


# ------------------------------------------------ stop decisions (train_utils.StopSignals)

def test_one_process_stops_after_the_step_that_saw_the_signal():
  before = signal.getsignal(signal.SIGTERM)
  with train_utils.StopSignals(0) as stop:
    assert not stop.should_stop(1, agree=False)
    signal.raise_signal(signal.SIGTERM)  # our handler: a flag, no exit
    assert stop.should_stop(2, agree=False)  # no agreement needed, no wait
  assert signal.getsignal(signal.SIGTERM) == before


def test_several_processes_agree_without_a_per_step_allgather(monkeypatch):
  """2 processes faked: JAX's preemption service owns SIGTERM (its sync point, faked at
  step 7, is checked every step); SIGINT is a local flag, all-gathered (the host round
  trip) only at the steps the loop marks `agree`."""
  gathers, checked = [], []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(train_utils, "preemption_service_running", lambda: True)
  monkeypatch.setattr(train_utils, "any_process_requested",
                      lambda flag: gathers.append(flag) or flag)
  sync_point = {"step": 7}
  monkeypatch.setattr(train_utils.StopSignals, "_reached_sync_point",
                      staticmethod(lambda step: checked.append(step) or
                                   step == sync_point["step"]))
  sigterm_before = signal.getsignal(signal.SIGTERM)
  with train_utils.StopSignals(0) as stop:
    assert stop.uses_preemption_service
    assert signal.getsignal(signal.SIGTERM) == sigterm_before  # left to the service
    stops = [stop.should_stop(step, agree=step % 4 == 0) for step in range(1, 11)]
  assert stops == [step == 7 for step in range(1, 11)]
  assert checked == list(range(0, 11))  # the start step, then every step
  assert gathers == [False, False]  # steps 4 and 8 only

  sync_point["step"] = None  # no preemption notice; SIGINT reaches this process at step 5
  gathers.clear()
  with train_utils.StopSignals(0) as stop:
    stops = []
    for step in range(1, 11):
      if step == 5:
        signal.raise_signal(signal.SIGINT)
      stops.append(stop.should_stop(step, agree=step % 4 == 0))
  assert stops.index(True) == 8 - 1  # acted on at the next agreement step, 8
  assert gathers == [False, True]

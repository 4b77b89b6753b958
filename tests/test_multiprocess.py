"""Multi-process training on one CPU machine: 2 processes x 2 devices, then 1 process.

tests/mp_worker.py `train` runs in two processes joined by `jax.distributed` (gloo CPU
collectives, coordinator on 127.0.0.1), started the way the README tells CPU users: only
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are set, and the trainer's
own start-up reads them. Stage 1 with `train_and_evaluate` on a (data 1, fsdp 4, tensor 1)
mesh, so every large parameter and its Adam moments are split across both processes, each
process reading its own slice of the data and the checkpoint written collectively and
asynchronously; then stage 2 on that VQGAN on a (1, 2, 2) mesh. A single process with 2
devices (`resume`) then restores both 2-process checkpoints and trains on (topology
change: 2 processes -> 1). `preempt` checks that a signal reaching one process stops both
after the same step.
"""

import glob
import json
import math
import os
import socket

import pytest

import mp_worker

pytestmark = pytest.mark.slow

TIMEOUT_S = 300  # per phase; on timeout every worker's process group is killed


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(mode, workdir, arg, coordinator_env=False):
  """Runs `mp_worker.py MODE i 2 PORT WORKDIR ARG OUT_i` for i = 0, 1; both must exit 0.
  coordinator_env: also give each its JAX_COORDINATOR_ADDRESS/NUM_PROCESSES/PROCESS_ID.
  Returns (their JSON results, their [(exit code, log)])."""
  port = free_port()
  outs = [os.path.join(workdir, f"{mode}_{i}.json") for i in range(2)]
  envs = [mp_worker.coordinator_env(port, 2, i) for i in range(2)] if coordinator_env else None
  results = mp_worker.run_workers(
      [[mode, i, 2, port, workdir, arg, outs[i]] for i in range(2)], num_devices=2,
      timeout=TIMEOUT_S, log_dir=workdir, envs=envs)
  assert all(code == 0 for code, _ in results), mp_worker.failure_report(results)
  loaded = []
  for out in outs:
    with open(out) as f:
      loaded.append(json.load(f))
  return loaded, results


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("multiprocess"))
  loaded, _ = run_two_processes("train", workdir, 2, coordinator_env=True)
  return workdir, loaded


def test_two_processes_train_stage1_on_a_global_mesh(two_process_run):
  workdir, results = two_process_run
  assert [r["process_index"] for r in results] == [0, 1]
  for r in results:
    # Started from the JAX_* variables alone, by the trainer; checkpoints written async.
    assert not r["distributed_before_training"] and r["distributed_after_training"]
    assert r["async_checkpointing"]
    assert r["process_count"] == 2 and r["device_count"] == 4 and r["local_device_count"] == 2
    assert math.isfinite(r["stage1_metrics"]["val_l1"])
    assert r["checkpoint"]["step"] == 2 and r["checkpoint"]["finite"]
  # Both processes saw the same (global) metrics and read back the same checkpoint.
  assert results[0]["stage1_metrics"] == results[1]["stage1_metrics"]
  assert results[0]["checkpoint"] == results[1]["checkpoint"]
  stage1 = os.path.join(workdir, "stage1")
  data_states = sorted(os.path.basename(p) for p in
                       glob.glob(os.path.join(stage1, "checkpoints", "2", "data", "*.json")))
  assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]
  # Only process 0 writes summaries and images (gathered from both processes).
  assert len(glob.glob(os.path.join(stage1, "events.out.tfevents.*"))) == 1
  assert os.path.exists(os.path.join(stage1, "images", "reconstructions_0000002.png"))


def test_two_processes_train_stage2_with_tensor_parallelism(two_process_run):
  workdir, results = two_process_run
  for r in results:
    assert math.isfinite(r["stage2_metrics"]["val_loss"])
  assert results[0]["stage2_metrics"] == results[1]["stage2_metrics"]
  assert os.path.isdir(os.path.join(workdir, "stage2", "checkpoints", "2"))


def test_one_process_resumes_the_two_process_checkpoint(two_process_run):
  workdir, before = two_process_run
  out = os.path.join(workdir, "resume.json")
  results = mp_worker.run_workers([["resume", workdir, 4, out]], num_devices=2,
                                  timeout=TIMEOUT_S, log_dir=workdir)
  assert results[0][0] == 0, mp_worker.failure_report(results)
  with open(out) as f:
    r = json.load(f)
  assert r["process_count"] == 1 and r["device_count"] == 2
  assert r["resumed_from"] == 2
  assert not r["data_state_restorable"]  # 2 per-process data states, 1 process now
  assert r["before"] == before[0]["checkpoint"]  # the 2-process checkpoint reads back whole
  assert r["after"]["step"] == 4 and r["after"]["finite"]
  assert r["after"]["param_sum"] != r["before"]["param_sum"]
  assert r["trainer_step"] == 4  # the restored optimiser/step state went on, not a re-init
  assert math.isfinite(r["metrics"]["val_l1"])
  assert "different number of processes" in results[0][1]
  # The 2-process stage-2 run (tensor x fsdp across processes) goes on in 1 process too.
  assert r["stage2_latest_step"] == 3
  assert math.isfinite(r["stage2_metrics"]["val_loss"])


def test_a_signal_on_one_process_stops_all_at_the_same_step(tmp_path):
  # Only process 1 gets each signal, during step 3; both must stop after the same step and
  # write one (asynchronous) checkpoint of it together. Preempted is SystemExit(0), caught
  # by the worker: both exit cleanly.
  loaded, results = run_two_processes("preempt", str(tmp_path), 3)
  assert all(r["preemption_service"] for r in loaded)
  # SIGINT: a local flag, all-gathered only at log steps (every 4): both stop at step 4.
  sigint = [r["sigint"] for r in loaded]
  assert [r["preempted_at"] for r in sigint] == [4, 4]
  assert [r["checkpoint_steps"] for r in sigint] == [[4], [4]]
  assert sigint[0]["checkpoint"] == sigint[1]["checkpoint"] and sigint[0]["checkpoint"]["finite"]
  # SIGTERM: JAX's preemption service picks the step (the one after the furthest process's
  # step when the notice reached them), the same on both, with no per-step all-gather.
  sigterm = [r["sigterm"] for r in loaded]
  stopped = sigterm[0]["preempted_at"]
  assert stopped is not None and 3 <= stopped < 50
  assert [r["preempted_at"] for r in sigterm] == [stopped, stopped]
  assert [r["checkpoint_steps"] for r in sigterm] == [[stopped], [stopped]]
  assert sigterm[0]["checkpoint"] == sigterm[1]["checkpoint"]
  assert sigterm[0]["checkpoint"]["step"] == stopped and sigterm[0]["checkpoint"]["finite"]
  log0 = results[0][1]  # process 0 got no signal itself
  assert "Stopped by signal at step 4" in log0
  assert f"Stopped by signal at step {stopped}" in log0

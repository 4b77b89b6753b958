"""The training loop both trainers share: steps, logging windows, evaluation, checkpoints,
non-finite checks and preemption.

`run` owns the order of events within a step, which is what exact resume relies on:

  1. train step (dispatched, not waited for),
  2. every `log_every_steps` (and at the last step): fetch the window's metrics in one
     transfer, check them for non-finite values (config.nonfinite_policy), write each
     step's scalars (so a resumed run logs what an uninterrupted one logs), then the
     window's scalars from `window_scalars`,
  3. every `eval_every_steps` (and at the last step): `run_eval`,
  4. every `checkpoint_every_steps`, at the last step, or when the processes agreed to stop
     on a signal: check the unfetched steps, then `save_checkpoint` (forced on a signal),
  5. on a signal: stop; the caller's `Preempted` (SystemExit 0) follows.

Stopping (train_utils.StopSignals) never costs a host round trip per step. One process
stops after the step during which SIGTERM/SIGINT arrived. Several processes must all stop
after the same step, with one checkpoint of it: SIGTERM goes through JAX's distributed
preemption service (a local check every step, True on all processes at the same step);
SIGINT (and SIGTERM without that service) is all-gathered only at log and checkpoint steps,
where the loop waits for the device anyway.

Pending asynchronous checkpoint writes are waited for on every exit path.
"""

import logging
import os
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from vqgan_jax import checkpointing, sharding
from vqgan_jax.training import utils as train_utils

Metrics = Dict[str, Any]


def handle_nonfinite(config, steps: Sequence[int], fetched: Sequence[Metrics]) -> None:
  """Raises NonFiniteError (policy 'error') or logs the skipped step (policy 'skip')."""
  bad = train_utils.first_nonfinite(steps, fetched)
  if bad is None:
    return
  bad_step, metric = bad
  if config.nonfinite_policy == "error":
    raise train_utils.NonFiniteError(
        f"non-finite {metric} at step {bad_step}; the update was not applied and no checkpoint "
        "holds it (set config.nonfinite_policy='skip' to skip such steps)")
  logging.warning("Skipped the update of step %d: non-finite %s", bad_step, metric)


def flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> Dict[str, Any]:
  """{'a.b.c': value} of a nested config, for TensorBoard hparams."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flat_config(value, f"{prefix}{key}."))
    elif isinstance(value, (int, float, str, bool)):
      flat[f"{prefix}{key}"] = value
    else:
      flat[f"{prefix}{key}"] = str(value)
  return flat


def restore_or_start(config, manager, workdir: str, *, make_train_iter: Callable[[int], Any],
                     abstract_model, abstract_trainer, init_state: Callable[[], Any],
                     make_state: Callable[[Any, Any], Any]):
  """(state, start_step, train_iter, writer): the newest checkpoint of `manager` restored
  (model, trainer state and, when the process count is unchanged, the data iterator's
  position), or a fresh state at step 0; plus the metric writer (TensorBoard on process 0,
  hyper-parameters written on a fresh start).

  make_train_iter(seed) builds this process's training iterator; make_state(model,
  trainer) assembles the state from restored items. On an error (bad data, a checkpoint
  that does not fit) the manager is closed before the error propagates, so that its
  background threads do not fail on the interpreter's exit.
  """
  try:
    return _restore_or_start(config, manager, workdir, make_train_iter=make_train_iter,
                             abstract_model=abstract_model, abstract_trainer=abstract_trainer,
                             init_state=init_state, make_state=make_state)
  except BaseException:
    manager.close()
    raise


def _restore_or_start(config, manager, workdir: str, *, make_train_iter, abstract_model,
                      abstract_trainer, init_state, make_state):
  train_iter = make_train_iter(config.seed)
  start_step = manager.latest_step()
  if start_step is not None:
    same_topology = sharding.data_state_restorable(manager, start_step)
    if not same_topology:
      # Arrays reshard onto any mesh, but a process's data position does not carry over
      # to another process count: start a fresh stream, reseeded by the step.
      logging.warning("%s step %d was written by a different number of processes; arrays "
                      "are resharded and the data stream restarts", workdir, start_step)
      train_iter = make_train_iter(config.seed + start_step)
    restored = checkpointing.restore(manager, start_step, abstract_model, abstract_trainer,
                                     train_iter if same_topology else None)
    state = make_state(restored["model"], restored["trainer"])
    logging.info("Resumed %s from step %d", workdir, start_step)
  else:
    start_step = 0
    state = init_state()
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if start_step == 0 and is_main:
    writer.write_hparams(flat_config(config))
    overview = parameter_overview.get_parameter_overview(abstract_model, include_stats=False)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "parameters.txt"), "w") as f:
      f.write(overview + "\n")
  logging.info("%s parameters (table: %s)",
               f"{parameter_overview.count_parameters(abstract_model):,}",
               os.path.join(workdir, "parameters.txt"))
  return state, start_step, train_iter, writer


def run(config, *, workdir: str, manager, writer, state, start_step: int,
        train_step: Callable[[Any, Any, int], Tuple[Any, Metrics]],
        train_iter: Iterator[Any],
        run_eval: Callable[[int, Any], Dict[str, float]],
        save_checkpoint: Callable[[int, Any, bool], Any],
        window_scalars: Optional[Callable[[int, Sequence[Metrics], Any], Dict[str, float]]] = None,
        log_keys: Sequence[str] = ()) -> Tuple[Any, Dict[str, float]]:
  """Trains from `start_step` to config.num_train_steps; returns (state, last eval metrics).

  train_step(state, batch, step) -> (state, metrics): `step` is the index of the step being
  run (0-based). window_scalars(step, fetched, state) -> extra scalars written at each log
  step. `log_keys`: metrics whose window mean goes into the progress line.
  """
  window = train_utils.MetricWindow()
  last_eval: Dict[str, float] = {}
  logging.info("training %s steps %d -> %d, global batch %d on %d device(s), mesh %s; "
               "writing to %s", config.get("stage", "model"), start_step,
               config.num_train_steps, config.batch_size, jax.device_count(),
               dict(config.mesh) if "mesh" in config else {}, workdir)
  if start_step == 0 and config.num_train_steps > 0:
    last_eval = run_eval(0, state)
  step = start_step
  t0 = time.time()
  profile = None
  if config.get("profile_steps", 0) > 0 and jax.process_index() == 0:
    # A trace of `profile_steps` steps after the first 10 (compilation done), for
    # TensorBoard's profile tab.
    profile = periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                       first_profile=start_step + 10, every_secs=None)
  try:
    with train_utils.StopSignals(start_step) as stop_signals:
      while step < config.num_train_steps:
        state, metrics = train_step(state, next(train_iter), step)
        step += 1
        if profile is not None:
          profile(step)
        window.add(step, metrics)
        last = step == config.num_train_steps
        if step % config.log_every_steps == 0 or last:
          steps, fetched, elapsed = window.fetch()
          handle_nonfinite(config, steps, fetched)
          for logged_step, m in zip(steps, fetched):
            writer.write_scalars(logged_step, train_utils.mean_scalars([m]))
          scalars = dict(window_scalars(step, fetched, state)) if window_scalars else {}
          scalars["steps_per_sec"] = len(steps) / max(elapsed, 1e-9)
          scalars["nonfinite_steps"] = float(jax.device_get(state.trainer.nonfinite_steps))
          writer.write_scalars(step, scalars)
          eta = (config.num_train_steps - step) / max(scalars["steps_per_sec"], 1e-9)
          # Keys absent from a window (the GAN's before disc_start) are left out.
          means = "".join(f"  {k} {np.mean([float(m[k]) for m in fetched]):.4f}"
                          for k in log_keys if fetched and all(k in m for m in fetched))
          logging.info("step %d/%d%s  %.2f steps/s  ETA %s", step, config.num_train_steps,
                       means, scalars["steps_per_sec"], train_utils.format_eta(eta))
        if step % config.eval_every_steps == 0 or last:
          last_eval = run_eval(step, state)
        # Processes agree on local signals only where the loop waits for the device anyway.
        agree = (last or step % config.log_every_steps == 0
                 or step % config.checkpoint_every_steps == 0)
        stop = stop_signals.should_stop(step, agree=agree)
        if step % config.checkpoint_every_steps == 0 or last or stop:
          handle_nonfinite(config, *window.peek())  # never checkpoint an unchecked step
          save_checkpoint(step, state, stop)
        if stop:
          logging.warning("Stopped by signal at step %d; checkpoint saved.", step)
          break
  except BaseException:
    # Let finished steps' checkpoints land before the error propagates.
    checkpointing.wait_quietly(manager)
    raise
  checkpointing.guarded_wait(manager, workdir)
  if step < config.num_train_steps:  # stopped by a signal, checkpoint written
    writer.flush()
    raise train_utils.Preempted(step)
  if not last_eval:  # e.g. resumed a finished run: still report where it stands
    last_eval = run_eval(step, state)
  writer.flush()
  logging.info("finished at step %d in %.1fs", step, time.time() - t0)
  logging.info("final eval: %s", "  ".join(f"{k} {v:.4g}" for k, v in sorted(last_eval.items())
                                          if isinstance(v, (int, float))))
  logging.info("checkpoints: %s  images: %s  TensorBoard: tensorboard --logdir %s",
               checkpointing.checkpoint_dir(workdir), os.path.join(workdir, "images"), workdir)
  return state, last_eval

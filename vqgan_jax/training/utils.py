"""Pieces both trainers share: metric accumulation, preemption signals, gradient accumulation."""

import logging
import signal
import threading
import time
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


class NonFiniteError(FloatingPointError):
  """A loss or gradient became NaN/Inf; names the step and the metric."""


class Preempted(SystemExit):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint of `step`.

  A SystemExit with status 0: the command line exits cleanly, and callers that chain
  several trainings (the demo) stop instead of going on with an unfinished model.
  """

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


class MetricWindow:
  """Collects per-step metrics as device arrays and fetches them only at log time.

  Keeping the arrays on device avoids a host sync on every step; the step function
  marks non-finite steps itself, so the exact step of a NaN is still known.
  """

  def __init__(self):
    self._steps: List[int] = []
    self._metrics: List[Dict[str, jax.Array]] = []
    self._start_time = time.time()

  def add(self, step: int, metrics: Dict[str, jax.Array]) -> None:
    self._steps.append(step)
    self._metrics.append(metrics)

  def __len__(self) -> int:
    return len(self._steps)

  def peek(self):
    """(steps, numpy metric dicts) of the window so far, without resetting it."""
    self._metrics = jax.device_get(self._metrics)
    return list(self._steps), list(self._metrics)

  def fetch(self):
    """Returns (steps, list of numpy metric dicts, seconds elapsed) and resets the window."""
    fetched = jax.device_get(self._metrics)
    steps, elapsed = self._steps, time.time() - self._start_time
    self._steps, self._metrics, self._start_time = [], [], time.time()
    return steps, fetched, elapsed


def first_nonfinite(steps, fetched, skip_keys=("code_counts",)):
  """(step, metric name) of the first step with a non-finite metric, or None."""
  for step, metrics in zip(steps, fetched):
    if "finite" in metrics and not bool(metrics["finite"]):
      bad = [k for k, v in sorted(metrics.items())
             if k not in skip_keys and not np.all(np.isfinite(v))]
      return step, (bad[0] if bad else "gradients")
  return None


def mean_scalars(fetched, skip_keys=("code_counts", "finite")) -> Dict[str, float]:
  keys = [k for k in fetched[0] if k not in skip_keys and np.ndim(fetched[0][k]) == 0]
  return {k: float(np.mean([m[k] for m in fetched])) for k in keys}


class PreemptionWatcher:
  """Turns SIGTERM/SIGINT (or the given signals) into a flag the training loop polls."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._event = threading.Event()
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
    return False


def any_process_requested(flag: bool) -> bool:
  """True when any process saw a stop signal. A collective that waits for the device
  queue: call it on all processes at the same step, and only where the loop waits anyway."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
  return bool(np.any(flags))


def preemption_service_running() -> bool:
  """Whether JAX's distributed preemption service runs in this process (jax.distributed
  started with jax_enable_preemption_service, the default). It owns SIGTERM then."""
  if not jax.distributed.is_initialized():
    return False
  try:
    return bool(jax.config.jax_enable_preemption_service)
  except AttributeError:
    return False


class StopSignals:
  """Decides after each step whether training stops on a signal, identically on every
  process, without a host round trip per step.

  One process: SIGTERM/SIGINT set a local flag; training stops after the step during which
  it was seen.

  Several processes (`agree` marks steps where the loop waits for the device anyway, i.e.
  log and checkpoint steps):
    SIGTERM, the preemption notice, is left to JAX's distributed preemption service when
      it runs (see preemption_service_running): the notice reaches every process in the
      background, each reports its step, and `reached_preemption_sync_point(step)` (a
      local check) becomes True on all of them at the same step, max(reported) + 1.
    SIGINT, and SIGTERM when that service is off, set a local flag that is all-gathered
      only at `agree` steps; a signal is acted on at the next such step.
  """

  def __init__(self, start_step: int):
    self._start_step = start_step
    self._watcher = None
    self._multi = False
    self._service = False
    self._pending = False

  def __enter__(self):
    self._multi = jax.process_count() > 1
    self._service = self._multi and preemption_service_running()
    if self._service:
      # Registers the starting step; also tells whether the service really runs.
      try:
        self._pending = self._reached_sync_point(self._start_step)
      except RuntimeError as e:
        logging.warning("JAX preemption service unavailable (%s); SIGTERM is agreed at "
                        "log/checkpoint steps instead", e)
        self._service = False
    signals = (signal.SIGINT,) if self._service else (signal.SIGTERM, signal.SIGINT)
    self._watcher = PreemptionWatcher(signals).__enter__()
    return self

  def __exit__(self, *exc):
    return self._watcher.__exit__(*exc)

  @staticmethod
  def _reached_sync_point(step: int) -> bool:
    return bool(multihost_utils.reached_preemption_sync_point(step))

  @property
  def uses_preemption_service(self) -> bool:
    return self._service

  def should_stop(self, step: int, agree: bool) -> bool:
    """Call once after every step, on every process, with the same arguments."""
    if not self._multi:
      return self._watcher.requested
    stop = self._pending
    if self._service and self._reached_sync_point(step):
      logging.warning("Preemption notice: every process stops after step %d", step)
      stop = True
    if agree and any_process_requested(self._watcher.requested):
      stop = True
    return stop


def split_microbatches(batch, steps: int):
  """A batch pytree (leading dim B) -> (steps, B / steps, ...) micro-batches.

  Micro-batch j takes rows j, j + steps, j + 2 * steps, ...: with the batch split over
  devices in contiguous blocks, every device then holds an equal share of every
  micro-batch, so splitting moves no data between devices.
  """
  def split(x):
    b = x.shape[0]
    if b % steps:
      raise ValueError(f"batch of {b} does not split into {steps} micro-batches")
    return jnp.swapaxes(x.reshape(b // steps, steps, *x.shape[1:]), 0, 1)
  return jax.tree_util.tree_map(split, batch)


def accumulate(micro_step, batch, steps: int, carry=None):
  """Runs micro_step(micro_batch, index, carry) -> (grads, metrics, carry, extra) over
  `steps` micro-batches of `batch` with one lax.scan.

  Returns (mean grads, metrics, carry, extra): metrics are averaged over the micro-batches
  except integer ones (counts), which are summed; `extra` is stacked with a leading
  `steps` axis. With steps == 1 it is micro_step on the whole batch (extra still gets
  the leading axis of size 1), so the two paths compute the same function for equal
  micro-batch losses: the mean of k equal-sized means is the mean over the batch.
  """
  if steps <= 1:
    grads, metrics, carry, extra = micro_step(batch, jnp.zeros((), jnp.int32), carry)
    return grads, metrics, carry, jax.tree_util.tree_map(lambda a: a[None], extra)
  micro = split_microbatches(batch, steps)
  first = jax.tree_util.tree_map(lambda x: x[0], micro)
  shapes = jax.eval_shape(micro_step, first, jnp.zeros((), jnp.int32), carry)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[:2])

  def body(acc, inputs):
    grads_sum, metrics_sum, carry = acc
    index, mb = inputs
    grads, metrics, carry, extra = micro_step(mb, index, carry)
    add = lambda a, b: a + b  # pylint: disable=unnecessary-lambda-assignment
    return (jax.tree_util.tree_map(add, grads_sum, grads),
            jax.tree_util.tree_map(add, metrics_sum, metrics), carry), extra

  (grads, metrics, carry), extra = jax.lax.scan(
      body, (zeros[0], zeros[1], carry), (jnp.arange(steps, dtype=jnp.int32), micro))
  grads = jax.tree_util.tree_map(lambda g: g / steps, grads)
  metrics = {k: v if jnp.issubdtype(v.dtype, jnp.integer) else v / steps
             for k, v in metrics.items()}
  return grads, metrics, carry, extra


def format_eta(seconds: Optional[float]) -> str:
  if seconds is None or not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m{seconds % 60:02d}s"

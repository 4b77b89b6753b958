"""`make demo` bookkeeping: a rerun of a finished demo keeps the measured training times."""

import os

import helpers
from vqgan_jax import demo


def test_finished_part_keeps_its_measured_seconds(tmp_path_factory):
  workdir = helpers.shared_stage1_workdir(tmp_path_factory)   # trained to step 2
  parent, name = os.path.dirname(workdir), os.path.basename(workdir)
  config = helpers.tiny_stage1_config()
  calls = []

  def fake_train(c, run_dir):
    calls.append(run_dir)
    return {"val_psnr": 20.0}

  summary = {}
  demo.train_part(name, config, fake_train, parent, summary, {name: {"seconds": 313.0}})
  assert summary[name] == {"val_psnr": 20.0, "seconds": 313.0}   # finished: kept
  assert calls == [workdir]                                        # still re-evaluated
  config.num_train_steps = 3                                       # not finished: measured
  demo.train_part(name, config, fake_train, parent, summary, {name: {"seconds": 313.0}})
  assert summary[name]["seconds"] < 60
  demo.train_part(name, helpers.tiny_stage1_config(), fake_train, parent, summary, {})
  assert summary[name]["seconds"] < 60                             # no earlier figure

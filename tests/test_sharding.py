"""Sharding rules, the shard_map helpers, the memory dry run, and 8-device equivalence.

Rules and the dry run need no devices (abstract meshes). The 8-device checks run in ONE
subprocess with 8 forced host devices (the device count is fixed when JAX starts, and
this pytest process already has 1): a stage-1 and a stage-2 train step on several meshes
against 1 device, parameter placement, the shard_map functions, and checkpoints moved
between an 8-device mesh and 1 device (tests/mp_worker.py `meshes`).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import mp_worker
from vqgan_jax.training import optim
from vqgan_jax import handoff
from vqgan_jax import conditioning
from vqgan_jax import dry_run, sharding
from vqgan_jax.models import quantizer

MESHES_TIMEOUT_S = 480  # cold compile on a loaded 2-core machine took 230 s; warm ~60 s


def spec_of(shardings, name):
  flat = {sharding._path_name(p): s for p, s in  # pylint: disable=protected-access
          jax.tree_util.tree_flatten_with_path(
              shardings, is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))[0]}
  return tuple(flat[name].spec)


def _padded(spec, ndim):
  spec = tuple(spec)
  return spec + (None,) * (ndim - len(spec))


# ------------------------------------------------------------------ rules (no devices)

def gpt_abstract_state(n_embd=256, vocab=512):
  """Abstract Stage2State of a GPT big enough for FSDP (arrays >= FSDP_MIN_SIZE)."""
  from vqgan_jax.training import stage2 as stage2_trainer  # pylint: disable=g-import-not-at-top
  config = mp_worker.gpt_config()
  config.model.n_embd, config.model.vocab_size = n_embd, vocab
  gpt = handoff.build_gpt(config, conditioning.layout_for(config, 32), 1, 16)
  tx = optim.make_optimizer(config)

  def init(rng):
    params = gpt.init(rng, jnp.zeros((1, 16), jnp.int32))["params"]
    return stage2_trainer.Stage2State(params=params, trainer=stage2_trainer.TrainerState(
        step=jnp.zeros((), jnp.int32), opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32)))

  return jax.eval_shape(init, jax.random.PRNGKey(0))


def test_gpt_rules_are_megatron_with_fsdp_and_optimizer_state_follows():
  state = gpt_abstract_state()
  shardings = sharding.tree_shardings(state, dry_run.abstract_mesh((2, 2, 2)), sharding.GPT_RULES)
  expected = {
      "blocks_0/attn/query/kernel": ("fsdp", "tensor"),   # column parallel (heads)
      "blocks_0/attn/key/kernel": ("fsdp", "tensor"),
      "blocks_0/attn/value/bias": ("tensor",),
      "blocks_1/attn/proj/kernel": ("tensor", "fsdp"),    # row parallel
      "blocks_0/mlp/fc/kernel": ("fsdp", "tensor"),       # column parallel (hidden)
      "blocks_0/mlp/fc/bias": ("tensor",),
      "blocks_0/mlp/proj/kernel": ("tensor", "fsdp"),     # row parallel
      "blocks_0/mlp/proj/bias": (None,),
      "wte/embedding": ("tensor", "fsdp"),                # vocab parallel
      "head/kernel": ("fsdp", "tensor"),
      "ln_f/scale": (None,),
  }
  for name, spec in expected.items():
    assert _padded(spec_of(shardings, "params/" + name), len(spec)) == spec, name
    for moment in ("mu", "nu"):  # AdamW moments are placed like their parameter
      opt = spec_of(shardings, f"trainer/opt_state/0/{moment}/{name}")
      assert _padded(opt, len(spec)) == spec, (moment, name)
  assert spec_of(shardings, "trainer/step") == ()


def test_gpt_rules_on_pure_tensor_and_pure_fsdp_meshes():
  state = gpt_abstract_state()
  tensor = sharding.tree_shardings(state, dry_run.abstract_mesh((1, 1, 8)), sharding.GPT_RULES)
  assert spec_of(tensor, "params/blocks_0/attn/query/kernel") == (None, "tensor")
  assert spec_of(tensor, "params/blocks_0/mlp/proj/kernel") == ("tensor", None)
  fsdp = sharding.tree_shardings(state, dry_run.abstract_mesh((1, 8, 1)), sharding.GPT_RULES)
  # No tensor axis: the rules place nothing, generic FSDP takes the largest dimension.
  assert spec_of(fsdp, "params/blocks_0/mlp/fc/kernel") == (None, "fsdp")
  assert spec_of(fsdp, "params/blocks_0/attn/query/bias") == (None,)  # small: replicated


def test_rule_axis_that_does_not_divide_stays_unsharded():
  mesh = dry_run.abstract_mesh((1, 1, 3))
  spec = sharding.spec_for("params/blocks_0/attn/query/kernel", (64, 64), mesh, sharding.GPT_RULES)
  assert tuple(spec) == (None, None)


def test_vqgan_rules_shard_convs_over_fsdp_and_codebook_over_tensor():
  from vqgan_jax.training import stage1 as stage1_trainer  # pylint: disable=g-import-not-at-top
  setup = stage1_trainer.Stage1Setup(mp_worker.stage1_config())
  state = jax.eval_shape(setup.init_state, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(state, dry_run.abstract_mesh((2, 4, 1)),
                                      sharding.VQGAN_RULES)
  conv = "decoder/mid_block_1/conv1/kernel"  # (3, 3, 64, 64)
  assert spec_of(shardings, "g_params/" + conv) == (None, None, "fsdp", None)
  assert spec_of(shardings, "trainer/g_opt_state/0/mu/" + conv) == (None, None, "fsdp", None)
  assert spec_of(shardings, "g_params/quantize/embedding") == (None, None)
  tensor = sharding.tree_shardings(state, dry_run.abstract_mesh((1, 1, 2)), sharding.VQGAN_RULES)
  assert spec_of(tensor, "g_params/quantize/embedding") == ("tensor", None)
  assert spec_of(tensor, "trainer/g_opt_state/0/nu/quantize/embedding") == ("tensor", None)


def test_shard_map_helpers_without_a_mesh_are_the_plain_functions():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((10, 4)).astype(np.float32)
  codebook = rng.standard_normal((6, 4)).astype(np.float32)
  np.testing.assert_array_equal(sharding.sharded_nearest_code(z, codebook, None),
                                quantizer.nearest_code(z, codebook))
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                            jax.devices()[:1])
  idx = rng.integers(0, 6, (4, 3))
  np.testing.assert_array_equal(sharding.sharded_code_counts(idx, 6, mesh),
                                np.bincount(idx.ravel(), minlength=6))


# -------------------------------------------------------------------------- dry run

def test_dry_run_equals_an_independent_count():
  """bytes per device = sum over arrays of (elements / shards on that array) x 4 bytes."""
  config = mp_worker.stage1_config(batch_size=8)
  model, rows = dry_run.report(config, [(1, 1, 1), (2, 4, 1), (1, 8, 1)], device_memory_gib=1)
  g_params, trainer = model.state.g_params, model.state.trainer
  sizes = [int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
      (g_params, trainer.d_params))]
  n_params = sum(sizes)
  full = rows[0]
  assert full["params"] == 4 * n_params
  assert full["grads"] == 4 * n_params
  # Adam: two float32 moments per parameter plus one int32 count per optimiser.
  assert full["optimizer"] == 2 * 4 * n_params + 2 * 4
  for row in rows[1:]:
    fsdp = row["mesh"][1]
    # Independent count: arrays of >= FSDP_MIN_SIZE elements with a dimension fsdp
    # divides are split fsdp ways, the rest is replicated.
    def shards(shape, fsdp=fsdp):
      big = int(np.prod(shape)) >= sharding.FSDP_MIN_SIZE
      return fsdp if big and any(d % fsdp == 0 for d in shape) else 1
    expected = sum(4 * int(np.prod(x.shape)) // shards(x.shape)
                   for x in jax.tree_util.tree_leaves((g_params, trainer.d_params)))
    assert row["params"] == expected, row["mesh"]
    assert row["params"] < full["params"]
    assert row["fits"]
  assert "params" in dry_run.format_table(model, rows, 1)


def test_dry_run_paper_configs_without_allocating():
  from configs import transformer_imagenet_cond, vqgan_imagenet_f16_16384  # pylint: disable=g-import-not-at-top
  model, rows = dry_run.report(vqgan_imagenet_f16_16384.get_config(), [(16, 1, 1), (1, 16, 1)],
                               device_memory_gib=16)
  assert rows[1]["params"] < rows[0]["params"] / 10
  gpt_config = transformer_imagenet_cond.get_config()
  model, rows = dry_run.report(gpt_config, [(16, 1, 1), (1, 16, 1), (2, 4, 2)],
                               device_memory_gib=16)
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(model.trainable))
  assert abs(n / 1.4e9 - 1) < 0.03
  assert rows[0]["params"] == 4 * n and not rows[0]["fits"]  # replicated 1.4B + AdamW
  assert rows[1]["fits"] and rows[2]["fits"]
  # ~1/16: only biases and LayerNorms (< 1% of the bytes) stay replicated.
  assert 4 * n / 16 <= rows[1]["params"] <= 1.02 * 4 * n / 16


def test_dry_run_cli_parses_meshes():
  assert dry_run.parse_mesh("2,4,2") == (2, 4, 2)
  assert dry_run.parse_mesh("-1,4,1", 16) == (4, 4, 1)
  with pytest.raises(ValueError, match="num_devices"):
    dry_run.parse_mesh("-1,4,1")


def test_dry_run_command_line():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run(
      [sys.executable, "-m", "vqgan_jax.dry_run", "--config", "configs/vqgan_demo.py",
       "--mesh", "1,1,1", "--mesh", "2,4,1 1,8,1", "--device_memory_gib", "16"],
      cwd=mp_worker.REPO, env=mp_worker.worker_env(1), capture_output=True, text=True,
      timeout=120, check=True).stdout
  lines = [l for l in out.splitlines() if l.startswith(("1,1,1 ", "2,4,1 ", "1,8,1 "))]
  assert len(lines) == 3 and all("yes" in l for l in lines), out
  assert "trainable parameters" in out


# ---------------------------------------------------------------- 8 devices (subprocess)

@pytest.fixture(scope="module")
def eight(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("eight_devices"))
  out = os.path.join(tmp, "results.json")
  results = mp_worker.run_workers([["meshes", out, tmp]], num_devices=8,
                                  timeout=MESHES_TIMEOUT_S, log_dir=tmp)
  assert results[0][0] == 0, mp_worker.failure_report(results)
  with open(out) as f:
    return json.load(f)


def _assert_same_step(entry, mesh):
  assert entry["loss"] == pytest.approx(entry["ref_loss"], rel=1e-5), mesh
  assert entry["grad_rel"] < 1e-5, (mesh, entry)     # gradients (Adam's first moment)
  assert entry["nu_rel"] < 1e-5, (mesh, entry)
  assert entry["param_rel"] < 1e-5, (mesh, entry)    # updated parameters
  assert entry["other_rel"] == 0.0, (mesh, entry)    # step, code-usage EMA, ...
  assert entry["noise_fraction"] < 0.1, (mesh, entry)


def test_stage1_step_on_meshes_equals_one_device(eight):
  assert eight["device_count"] == 8
  for mesh in ("8,1,1", "2,4,1", "2,2,2"):
    entry = eight["stage1"][mesh]
    _assert_same_step(entry, mesh)
    assert entry["code_counts_equal"], mesh   # the shard_map + psum code counts


def test_stage1_parameters_are_placed_by_the_rules(eight):
  conv = "g_params/decoder/mid_block_1/conv1/kernel"
  opt = "trainer/g_opt_state/0/mu/decoder/mid_block_1/conv1/kernel"
  s = eight["stage1"]
  assert s["8,1,1"]["specs"][conv] == [None, None, None, None]
  assert s["2,4,1"]["specs"][conv] == [None, None, "fsdp", None]
  assert s["2,4,1"]["specs"][opt] == [None, None, "fsdp", None]
  assert s["2,4,1"]["shard_shape"] == [3, 3, 16, 64]
  assert s["2,2,2"]["shard_shape"] == [3, 3, 32, 64]
  assert s["2,2,2"]["specs"]["g_params/quantize/embedding"] == ["tensor", None]
  for entry in s.values():  # the step's outputs keep the shardings it was given
    assert entry["specs"] == entry["rule_specs"]


def test_gpt_step_on_meshes_equals_one_device_with_tensor_parallel_specs(eight):
  for mesh in ("8,1,1", "2,2,2", "1,1,8"):
    entry = eight["gpt"][mesh]
    _assert_same_step(entry, mesh)
    assert entry["runner_uses_gpt_rules"], mesh
  tp = eight["gpt"]["1,1,8"]["specs"]
  assert tp["params/blocks_0/attn/query/kernel"] == [None, "tensor"]
  assert tp["params/blocks_0/attn/proj/kernel"] == ["tensor", None]
  assert tp["params/blocks_0/mlp/fc/kernel"] == [None, "tensor"]
  assert tp["params/blocks_0/mlp/proj/kernel"] == ["tensor", None]
  assert tp["params/wte/embedding"] == ["tensor", None]
  assert tp["params/head/kernel"] == [None, "tensor"]
  assert tp["trainer/opt_state/0/mu/blocks_0/attn/query/kernel"] == [None, "tensor"]
  both = eight["gpt"]["2,2,2"]["specs"]
  assert both["params/blocks_0/mlp/fc/kernel"] == ["fsdp", "tensor"]
  assert both["params/blocks_0/mlp/proj/kernel"] == ["tensor", "fsdp"]
  assert eight["gpt"]["8,1,1"]["specs"]["params/blocks_0/attn/query/kernel"] == [None, None]


def test_sharded_nearest_code_and_counts_equal_unsharded(eight):
  for mesh, entry in eight["shard_map"].items():
    assert entry["nearest_equal"], mesh
    assert entry["quantizer_hook_equal"], mesh  # inside a differentiated quantizer too
    assert entry["tie_index"] == 3, mesh        # duplicated code 3 / 50: lowest index wins
    assert entry["counts_equal"], mesh
    assert entry["nearest_uses_shard_map"] == (mesh != "8,1,1"), mesh


def test_checkpoints_move_between_eight_devices_and_one(eight):
  c = eight["checkpoints"]
  assert c["8_to_1"]["equal"] and c["8_to_1"]["num_devices"] == 1
  assert c["1_to_8"]["equal"] and c["1_to_8"]["num_devices"] == 8
  assert c["1_to_8"]["spec"] == [None, None, "fsdp", None]
  assert c["load_stage1_equal"]

"""Sampling and stage-2 sample evaluation split over the batch of a device mesh.

The model-level checks run in ONE subprocess with 4 forced host devices (the device count
is fixed when JAX starts; this pytest process has 1): this file run as a script,
`python tests/test_sharded_sampling.py OUT.json`, writes its findings as JSON.
  - `sampling.sample` on meshes (4,1,1) and (2,2,1) (also with guidance) gives the same
    tokens as the unsharded sampler on one device; a half batch with first_index gives
    the same rows (a sample's tokens depend on its index, not on its batch);
  - the compiled sampler keeps the batch split: its tokens come back batch-sharded, the
    KV cache inside the loop has the per-device shape only, and there is no collective;
  - eval's Stage2Adapter.generate_images (tiny random GPT + VQGAN) gives the same images
    on a 4-device mesh with batch 8 as on 1 device with batch 3, batch-sharded.
The batch-size checks of eval, sample and export_tokens need no devices (abstract mesh).
"""

import json
import os
import sys

import pytest

import mp_worker
from vqgan_jax import conditioning, handoff

TIMEOUT_S = 300
N_CODES = 48
NUM = 16  # a 4 x 4 token grid


# ------------------------------------------------------------------ worker (4 devices)

def _tiny_gpt():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models.transformer import GPT  # pylint: disable=g-import-not-at-top
  model = GPT(vocab_size=64, block_size=40, n_layer=2, n_head=2, n_embd=32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: ((path[-1].key == "scale") + 0.3 * rng.standard_normal(s.shape)).astype(
          np.float32), shapes)
  return model, params


def _gpt_checks(results):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from vqgan_jax import sampling, sharding  # pylint: disable=g-import-not-at-top
  model, params = _tiny_gpt()
  prefix = (48 + np.arange(8, dtype=np.int32) % 4)[:, None]  # class-like tokens
  uncond = jnp.array([[62]], jnp.int32)
  key = jax.random.key(3)
  kw = dict(temperature=1.0, top_k=10, top_p=0.95, num_image_codes=N_CODES)
  ref = np.asarray(sampling.sample(params, model, jnp.asarray(prefix), NUM, key, **kw))
  ref_cfg = np.asarray(sampling.sample(params, model, jnp.asarray(prefix), NUM, key,
                                       cfg_scale=2.0, uncond_prefix=uncond, **kw))
  results["distinct_rows"] = len({tuple(r) for r in ref.tolist()})
  for shape, guided in (((4, 1, 1), False), ((2, 2, 1), True)):
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), sharding.MESH_AXES)
    p = jax.device_put(params, sharding.replicated(mesh))
    x = jax.device_put(prefix, sharding.batch_sharding(mesh))
    extra = dict(cfg_scale=2.0, uncond_prefix=uncond) if guided else {}
    out = sampling.sample(p, model, x, NUM, key, mesh=mesh, **kw, **extra)
    hlo = sampling.sample.lower(p, model, x, NUM, key, mesh=mesh, **kw, **extra).compile(
        ).as_text()
    rows = 2 * 8 if guided else 8  # guidance doubles the batch the cache holds
    name = ",".join(map(str, shape))
    results[name] = {
        "equal": bool((np.asarray(out) == (ref_cfg if guided else ref)).all()),
        "out_spec": [list(a) if isinstance(a, tuple) else a for a in out.sharding.spec],
        "out_shard_shape": list(out.sharding.shard_shape(out.shape)),
        "collectives": sorted({c for c in ("all-gather", "all-reduce", "all-to-all",
                                             "collective-permute", "reduce-scatter")
                               if c in hlo}),
        # keys/values (B * H, L, D): per device B * H / 4
        "local_cache": f"f32[{rows * 2 // 4},16,16]" in hlo,
        "global_cache": f"f32[{rows * 2},16,16]" in hlo,
        "cache_specs": sorted({str(s.spec) for s in jax.tree_util.tree_leaves(
            sampling.cache_shardings(model, rows, 16, mesh))}),
    }
  # The second half of the batch on its own (first_index 4), 1 row per device.
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 1, 1), sharding.MESH_AXES)
  half = sampling.sample(jax.device_put(params, sharding.replicated(mesh)), model,
                         jax.device_put(prefix[4:], sharding.batch_sharding(mesh)), NUM, key,
                         first_index=4, mesh=mesh, **kw)
  results["half_batch_equal"] = bool((np.asarray(half) == ref[4:]).all())


def _tiny_stage2_model():
  """A Stage2Model of random weights (class-conditional, null class, 4x4 token window)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import transformer_tiny, vqgan_default  # pylint: disable=g-import-not-at-top
  from vqgan_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from vqgan_jax.models import vqgan  # pylint: disable=g-import-not-at-top
  s1 = vqgan_default.get_config()
  m = s1.model
  m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2), 1, ()
  m.resolution, m.z_channels, m.embed_dim, m.n_embed = 16, 32, 16, 32
  s1.data.image_size = 16
  s1.data.input = "image"
  rng = np.random.default_rng(1)
  vq = vqgan.vqmodel_from_config(m)
  vq_params = jax.tree_util.tree_map_with_path(
      lambda path, a: (np.ones(a.shape, a.dtype) if path[-1].key == "scale" else
                       (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)),
      checkpointing.abstract_vqgan_params(vq, m.resolution))
  first = checkpointing.FrozenStage1(model=vq, params=vq_params, config=s1,
                                     metadata=checkpointing.stage1_metadata(s1, 0), step=0)
  config = transformer_tiny.get_config()
  config.crop_tokens = 4
  config.sampling.cfg_scale = 2.0
  config.sampling.top_k = 8
  setup = handoff.Stage2Sequences(config, first, num_classes=3)
  shapes = jax.eval_shape(setup.gpt.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, setup.seq_len), jnp.int32))["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: ((path[-1].key == "scale") + 0.3 * rng.standard_normal(s.shape)).astype(
          np.float32), shapes)
  metadata = {"sequence": {"window": list(setup.window), "token_grid": list(setup.grid),
                           "prefix_len": setup.prefix_len},
              "vocab": setup.layout.to_dict()}
  return handoff.Stage2Model(model=setup.gpt, params=params, config=config,
                                    metadata=metadata, step=0, layout=setup.layout,
                                    first_stage=first, cond_stage=None)


def _eval_checks(results):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from vqgan_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from vqgan_jax import sharding  # pylint: disable=g-import-not-at-top
  loaded = _tiny_stage2_model()
  key = jax.random.PRNGKey(5)
  images, specs = {}, []
  for name, devices, shape, batch in (("1", jax.devices()[:1], (1, 1, 1), 3),
                                      ("2,2,1", jax.devices(), (2, 2, 1), 8)):
    mesh = Mesh(np.asarray(devices).reshape(shape), sharding.MESH_AXES)
    adapter = eval_lib.Stage2Adapter(loaded, mesh)
    parts = []
    for out in adapter.generate_images(key, 10, batch):
      specs.append(str(out["image"].sharding.spec))
      parts.append(eval_lib.gather(out["image"])[out["mask"]])
    images[name] = np.concatenate(parts)
  results["eval"] = {
      "shape": list(images["1"].shape),
      "max_diff": float(np.abs(images["1"] - images["2,2,1"]).max()),
      "distinct": len({im.tobytes() for im in images["1"]}),
      "specs_4": specs[-2:],
  }


def main(out_path):
  mp_worker._setup_jax()  # pylint: disable=protected-access
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 4, jax.devices()
  results = {"device_count": jax.device_count()}
  _gpt_checks(results)
  _eval_checks(results)
  with open(out_path, "w") as f:
    json.dump(results, f)


# ------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def four(tmp_path_factory):
  import subprocess  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("four_devices")
  out = tmp / "results.json"
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)],
                        cwd=mp_worker.REPO, env=mp_worker.worker_env(4), capture_output=True,
                        text=True, timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  with open(out) as f:
    return json.load(f)


def test_sharded_sampling_equals_one_device(four):
  assert four["device_count"] == 4
  assert four["distinct_rows"] > 4  # the rows really differ (no trivial equality)
  assert four["4,1,1"]["equal"]
  assert four["2,2,1"]["equal"]     # with classifier-free guidance (doubled batch)
  assert four["half_batch_equal"]   # keyed by sample index, not by batch or device


def test_sampler_batch_and_kv_cache_stay_sharded(four):
  for mesh, spec in (("4,1,1", ["data"]), ("2,2,1", [["data", "fsdp"]])):
    entry = four[mesh]
    assert entry["out_spec"][:1] == spec, entry
    assert entry["out_shard_shape"] == [2, NUM], entry       # 8 rows / 4 devices
    assert entry["collectives"] == [], entry                 # each device draws its rows
    assert entry["local_cache"] and not entry["global_cache"], entry
    assert "P()" in entry["cache_specs"]                     # the position index
    assert any("'data', 'fsdp'" in s for s in entry["cache_specs"]), entry


def test_eval_samples_on_four_devices_equal_one_device(four):
  e = four["eval"]
  assert e["shape"] == [10, 8, 8, 3]    # 4x4 tokens, f = 2; the padding rows dropped
  assert e["distinct"] == 10
  assert e["max_diff"] < 1e-5, e
  assert all("'data', 'fsdp'" in s for s in e["specs_4"]), e


# ------------------------------------------------------------------ batch-size checks

@pytest.fixture
def pod_mesh():
  from vqgan_jax import dry_run  # pylint: disable=g-import-not-at-top
  return dry_run.abstract_mesh((2, 2, 1))


def test_eval_batch_size_error_names_setting_and_nearest(pod_mesh, tmp_path):
  from configs import transformer_tiny  # pylint: disable=g-import-not-at-top
  from vqgan_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  config = transformer_tiny.get_config()
  config.stage = "transformer"
  with pytest.raises(eval_lib.EvalError,
                     match=r"^--batch_size=6 does not split over 4 batch shards .*"
                           r"multiple of 4; nearest valid: 8$"):
    eval_lib.evaluate_stage2(config, str(tmp_path), batch_size=6, mesh=pod_mesh)
  config.eval_batch_size = 10
  with pytest.raises(eval_lib.EvalError, match=r"^config\.eval_batch_size=10 .*valid: 12$"):
    eval_lib.evaluate_stage2(config, str(tmp_path), mesh=pod_mesh)
  assert not os.listdir(tmp_path)


def test_sample_batch_size_error(pod_mesh):
  from vqgan_jax import generation  # pylint: disable=g-import-not-at-top
  metadata = {"vocab": conditioning.VocabLayout.build("none", 32).to_dict()}
  opts = generation.SamplingOptions(batch_size=7)
  with pytest.raises(ValueError, match=r"^--batch_size=7 does not split .*nearest valid: 8$"):
    generation.check_options(metadata, opts, pod_mesh)
  assert generation.check_options(metadata, generation.SamplingOptions(batch_size=12),
                                   pod_mesh) == []
  # Fewer samples than a batch: rounded up to the batch shards, not to the batch size.
  assert generation.sampling_batch(64, 2, pod_mesh) == 4
  assert generation.sampling_batch(64, 100, pod_mesh) == 64


def test_export_batch_size_error(pod_mesh, tmp_path):
  import helpers  # pylint: disable=g-import-not-at-top
  from vqgan_jax import export_tokens  # pylint: disable=g-import-not-at-top
  with pytest.raises(export_tokens.ExportError,
                     match=r"^--batch_size=6 does not split over 4 batch shards .*valid: 8$"):
    export_tokens.export_tokens(helpers.tiny_stage1_config(), str(tmp_path / "no_run"),
                                str(tmp_path / "out"), batch_size=6, mesh=pod_mesh)


if __name__ == "__main__":
  main(sys.argv[1])

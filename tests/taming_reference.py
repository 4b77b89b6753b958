"""Builds tiny taming-transformers models and records their outputs (runs under torch).

Run by tests/test_convert_taming.py in the reference venv (`.venv-taming`, see
requirements-taming.txt), never in the main environment:

  .venv-taming/bin/python tests/taming_reference.py OUT_DIR

Writes, with random weights from a fixed seed:
  vqgan.ckpt / vqgan.yaml            a VQModel (Lightning-style checkpoint: state_dict,
                                     global_step, optimiser states, an argparse hparams
                                     object) whose state dict also holds a PatchGAN
                                     discriminator under loss.discriminator.*
  uncond.ckpt / uncond.yaml          Net2NetTransformer, unconditional (SOS token)
  class.ckpt / class.yaml            Net2NetTransformer, class-conditional (Labelator)
  spatial.ckpt / spatial.yaml        Net2NetTransformer conditioned on a second VQGAN of
                                     one-hot segmentation maps
  vqgan_extra_key.ckpt               vqgan.ckpt plus a key no rule maps
  legacy.ckpt                        a small state dict in the pre-1.6 (non-zip) format
  probes.pt                          strided, half, bfloat16 and int64 tensors for the reader
  reference.npz                      inputs and outputs of all of the above (transformers:
                                     logits of Net2NetTransformer.forward and greedy samples)
"""

import argparse
import os
import sys
import types

import numpy as np
import torch
import yaml

SEED = 1234
RESOLUTION = 16
N_CODES = 64
N_CLASSES = 10
N_SEGMENTS = 5
N_COND_CODES = 32
GLOBAL_STEP = 4321


def ddconfig(in_channels=3, out_ch=3):
  return {"double_z": False, "z_channels": 32, "resolution": RESOLUTION,
          "in_channels": in_channels, "out_ch": out_ch, "ch": 32, "ch_mult": [1, 2, 2],
          "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}


def vq_config(n_embed, in_channels=3, out_ch=3, image_key="image", loss=None):
  params = {"embed_dim": 8, "n_embed": n_embed, "image_key": image_key,
            "ddconfig": ddconfig(in_channels, out_ch),
            "lossconfig": loss or {"target": "torch.nn.Identity"}}
  return {"target": "taming.models.vqgan.VQModel", "params": params}


def spread_codebook(model, x):
  """Codes drawn from the latents' per-channel statistics on x, so that the nearest codes
  vary over positions (random weights give nearly constant latents)."""
  with torch.no_grad():
    h = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, model.quantize.e_dim)
    w = model.quantize.embedding.weight
    w.copy_(h.mean(0) + h.std(0) * torch.randn_like(w))


def lightning_checkpoint(model, path, global_step=GLOBAL_STEP):
  opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
               "param_groups": [{"lr": 1e-4, "params": [0]}]}
  torch.save({"epoch": 7, "global_step": global_step, "pytorch-lightning_version": "1.9.5",
              "state_dict": model.state_dict(), "optimizer_states": [opt_state],
              "lr_schedulers": [], "hparams": argparse.Namespace(note="not code")}, path)


def save_yaml(config, path):
  with open(path, "w") as f:
    yaml.safe_dump({"model": config}, f)


def nearest_gap(model, x):
  """Smallest gap between the best and second-best code distance over all latents."""
  h = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, model.quantize.e_dim)
  d = torch.cdist(h.double(), model.quantize.embedding.weight.double()) ** 2
  two = torch.topk(d, 2, largest=False).values
  return float((two[:, 1] - two[:, 0]).min())


def stub_torchvision():
  """taming.main imports torchvision for image logging only; nothing here uses it, and the
  wheel pip resolves for torch 2.13 fails on import, so an empty module stands in. It is
  put in place after Lightning is imported, which probes for torchvision and must find none."""
  import pytorch_lightning  # pylint: disable=g-import-not-at-top,unused-import
  sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))


def check_readers(out):
  """Both readers of vqgan_jax.torch_checkpoint (numpy only: importable here without jax)
  against torch's own loading of every saved state dict: the largest difference, and
  whether key sets, shapes and dtypes agree (and the torch reader's refusal is explained)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from vqgan_jax import torch_checkpoint  # pylint: disable=g-import-not-at-top
  worst, same_keys = {"numpy": 0.0, "torch": 0.0}, True
  for name in ("vqgan", "uncond", "class", "spatial"):
    path = os.path.join(out, f"{name}.ckpt")
    expected = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    # torch's weights_only loader refuses the argparse hparams of these files (the numpy
    # reader does not), so it reads a copy holding the state dict alone.
    try:
      torch_checkpoint.load_state_dict(path, "torch")
      refused = False
    except torch_checkpoint.TorchCheckpointError as e:
      refused = "--reader numpy" in str(e)
    same_keys &= refused
    plain = os.path.join(out, f"{name}_state_only.pt")
    torch.save({"state_dict": expected}, plain)
    for reader in worst:
      state, _ = torch_checkpoint.load_state_dict(path if reader == "numpy" else plain, reader)
      same_keys &= sorted(state) == sorted(expected)
      for k, v in expected.items():
        ours = torch_checkpoint.to_numpy(state[k])
        same_keys &= ours.shape == tuple(v.shape) and ours.dtype == v.numpy().dtype
        if v.numel():
          worst[reader] = max(worst[reader], float(np.max(np.abs(ours - v.numpy()))))
  return {"reader_numpy_max_diff": worst["numpy"], "reader_torch_max_diff": worst["torch"],
          "reader_same_keys": same_keys}


def main(out):
  os.makedirs(out, exist_ok=True)
  stub_torchvision()
  torch.manual_seed(SEED)
  from taming.main import instantiate_from_config  # pylint: disable=g-import-not-at-top
  from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
  results = {}

  # ---------------- VQGAN (+ discriminator keys) ----------------
  disc_loss = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
               "params": {"disc_start": 100, "disc_weight": 0.8, "codebook_weight": 1.0,
                          "disc_in_channels": 3, "disc_num_layers": 2, "disc_ndf": 16,
                          "disc_conditional": False}}
  cfg = vq_config(N_CODES)
  cfg["base_learning_rate"] = 4.5e-6
  vq = instantiate_from_config(cfg).eval()
  x = torch.randn(2, 3, RESOLUTION, RESOLUTION)
  spread_codebook(vq, x)
  disc = NLayerDiscriminator(input_nc=3, ndf=16, n_layers=2).apply(weights_init).eval()
  with torch.no_grad():
    for m in disc.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  with torch.no_grad():
    h = vq.quant_conv(vq.encoder(x))
    quant, _, info = vq.encode(x)
    indices = info[2].reshape(x.shape[0], -1)
    dec = vq.decode(quant)
    d_logits = disc(x)
  results.update(vq_x=x.numpy(), vq_h=h.numpy(), vq_quant=quant.numpy(),
                 vq_indices=indices.numpy(), vq_dec=dec.numpy(), disc_logits=d_logits.numpy(),
                 vq_gap=nearest_gap(vq, x))
  state = vq.state_dict()
  for k, v in disc.state_dict().items():
    state[f"loss.discriminator.{k}"] = v
  cfg_with_disc = dict(cfg, params=dict(cfg["params"], lossconfig=disc_loss))
  torch.save({"epoch": 7, "global_step": GLOBAL_STEP, "pytorch-lightning_version": "1.9.5",
              "state_dict": state, "optimizer_states": [], "lr_schedulers": [],
              "hparams": argparse.Namespace(note="not code")},
             os.path.join(out, "vqgan.ckpt"))
  save_yaml(cfg_with_disc, os.path.join(out, "vqgan.yaml"))
  state["encoder.not_in_the_model.weight"] = torch.zeros(3)
  torch.save({"state_dict": state, "global_step": 1}, os.path.join(out, "vqgan_extra_key.ckpt"))

  # ---------------- transformers ----------------
  gpt = {"target": "taming.modules.transformer.mingpt.GPT",
         "params": {"vocab_size": N_CODES, "block_size": 16, "n_layer": 2, "n_head": 2,
                    "n_embd": 32}}
  first = vq_config(N_CODES)
  seg_stage = vq_config(N_COND_CODES, N_SEGMENTS, N_SEGMENTS, image_key="segmentation")
  # Net2NetTransformer.encode_to_c needs (B, h, w) indices from a VQGAN condition stage.
  seg_stage["params"]["sane_index_shape"] = True
  variants = {
      "uncond": {"cond_stage_config": "__is_unconditional__", "sos_token": 0,
                 "first_stage_key": "image", "cond_stage_key": "image"},
      "class": {"cond_stage_config": {"target": "taming.modules.util.Labelator",
                                      "params": {"n_classes": N_CLASSES}},
                "first_stage_key": "image", "cond_stage_key": "class_label"},
      "spatial": {"cond_stage_config": seg_stage, "first_stage_key": "image",
                  "cond_stage_key": "segmentation"},
  }
  labels = torch.tensor([3, 7])
  seg_ids = torch.randint(0, N_SEGMENTS, (2, RESOLUTION, RESOLUTION))
  seg = torch.nn.functional.one_hot(seg_ids, N_SEGMENTS).permute(0, 3, 1, 2).float()
  results.update(labels=labels.numpy(), segmentation=seg.numpy())
  for name, params in variants.items():
    block = 32 if name == "spatial" else 16
    t_cfg = {"target": "taming.models.cond_transformer.Net2NetTransformer",
             "base_learning_rate": 4.5e-6,
             "params": dict(params, transformer_config={
                 "target": gpt["target"], "params": dict(gpt["params"], block_size=block)},
                 first_stage_config=first)}
    model = instantiate_from_config(t_cfg).eval()
    spread_codebook(model.first_stage_model, x)
    if name == "spatial":
      spread_codebook(model.cond_stage_model, seg)
    c = {"uncond": x, "class": labels, "spatial": seg}[name]
    with torch.no_grad():
      logits, target = model(x, c)
      _, c_indices = model.encode_to_c(c)
      greedy = model.sample(target[:, :0], c_indices, steps=target.shape[1], sample=False)
    results[f"{name}_logits"] = logits.numpy()
    results[f"{name}_z_indices"] = target.numpy()
    results[f"{name}_c_indices"] = c_indices.numpy()
    results[f"{name}_greedy"] = greedy.numpy()
    results[f"{name}_gap"] = nearest_gap(model.first_stage_model, x)
    if name == "spatial":
      results["spatial_cond_gap"] = nearest_gap(model.cond_stage_model, seg)
    lightning_checkpoint(model, os.path.join(out, f"{name}.ckpt"))
    save_yaml(t_cfg, os.path.join(out, f"{name}.yaml"))

  # ---------------- reader probes ----------------
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  probes = {"strided": base.t()[1:3], "half": torch.linspace(-2, 2, 5).half(),
            "bf16": torch.linspace(-2, 2, 5).bfloat16(), "long": torch.arange(5) * 10 ** 10}
  torch.save({"probes": probes}, os.path.join(out, "probes.pt"))
  for k, v in probes.items():
    results[f"probe_{k}"] = v.float().numpy() if k == "bf16" else v.numpy()
  torch.save({"state_dict": {"w": torch.ones(2)}}, os.path.join(out, "legacy.ckpt"),
             _use_new_zipfile_serialization=False)
  results.update(check_readers(out))
  np.savez(os.path.join(out, "reference.npz"), **results)
  print("wrote", out)


if __name__ == "__main__":
  main(sys.argv[1])

"""Builds tiny taming-transformers models and records their outputs (runs under torch).

Run by the parity tests in the reference venv (`.venv-taming`, see requirements-taming.txt),
never in the main environment:

  .venv-taming/bin/python tests/taming_reference.py OUT_DIR           (test_convert_taming.py)
  .venv-taming/bin/python tests/taming_reference.py --loss OUT_DIR    (test_loss_parity.py)
  .venv-taming/bin/python tests/taming_reference.py --fid OUT_DIR     (test_fid_parity.py)

The --loss and --fid outputs are described at `main_loss` and `main_fid`; the default run
writes, with random weights from a fixed seed:
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


def vq_config(n_embed, in_channels=3, out_ch=3, image_key="image", loss=None, **dd):
  params = {"embed_dim": 8, "n_embed": n_embed, "image_key": image_key,
            "ddconfig": dict(ddconfig(in_channels, out_ch), **dd),
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
  """Makes `import torchvision` work without torchvision's compiled extension.

  pytorch-fid (the FID reference) subclasses torchvision's Inception blocks, and taming's
  LPIPS builds torchvision's VGG16, so requirements-taming.txt installs torchvision 0.28.0
  (the release for torch 2.13). PyPI has only its CUDA build, whose `_C` extension does not
  load next to the CPU torch, and `torchvision/__init__.py` fails without it (registering
  fake kernels for `torchvision::nms`). Everything used here is plain Python (model
  definitions), so `torchvision` is made a package over the installed files whose
  `__init__` does not run. It must be in place before Lightning is imported: torchmetrics
  imports torchvision when it is installed. Without an installed torchvision (a venv made
  before it was required) an empty module stands in, put in place after Lightning, which
  then finds none; taming.main imports torchvision for image logging only.
  Returns whether torchvision's modules are available.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  if "torchvision" in sys.modules:
    return hasattr(sys.modules["torchvision"], "__path__")
  spec = importlib.util.find_spec("torchvision")
  if spec is None or not spec.submodule_search_locations:
    import pytorch_lightning  # pylint: disable=g-import-not-at-top,unused-import
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    return False
  package = types.ModuleType("torchvision")
  package.__path__ = list(spec.submodule_search_locations)
  package.__spec__ = spec
  package.__file__ = spec.origin
  sys.modules["torchvision"] = package
  from torchvision import version  # pylint: disable=g-import-not-at-top
  package.__version__ = version.__version__
  return True


def missing(what):
  """Exit status 3: the tests skip, naming what this venv lacks."""
  print(f"MISSING {what} in this venv; rerun `make taming-reference` "
        "(requirements-taming.txt)")
  sys.exit(3)


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


# ----------------------------------------------------------------------------- --loss

VQ_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"
DISC_START = 3       # the GAN terms switch on at this global step
PKEEP = 0.5          # corruption rate checked on statistics
CORRUPT_BATCH = 512  # sequences per corrupted batch
CORRUPT_ROUNDS = 4


def offline_lpips():
  """taming's LPIPS builds torchvision's VGG16 with pretrained=True (a download) and loads
  its linear layers from a URL. Here VGG16 is torchvision's definition without weights and
  nothing is loaded: random weights are set afterwards (`randomize_lpips`)."""
  import torchvision.models as tv_models  # pylint: disable=g-import-not-at-top
  from taming.modules.losses import lpips as taming_lpips  # pylint: disable=g-import-not-at-top
  taming_lpips.models = types.SimpleNamespace(
      vgg16=lambda pretrained=True, **kwargs: tv_models.vgg16(weights=None))
  taming_lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None


def randomize_lpips(lpips_net):
  """He-normal VGG convs (activations keep their scale through 13 layers), small biases,
  non-negative linear layers (as the trained ones are)."""
  with torch.no_grad():
    for name, p in lpips_net.named_parameters():
      if name.startswith("net.") and p.dim() == 4:
        p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5)
      elif name.startswith("net."):
        p.uniform_(-0.1, 0.1)
      else:
        p.uniform_(0.0, 0.2)


def _buffers(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()
          if "running" in k}


def stage1_loss_steps(vq, x, results):
  """The reference's generator (optimizer_idx 0) and discriminator (optimizer_idx 1) passes
  of VQModel.training_step, one global step before and one at disc_start, both on the same
  reconstruction and from the same discriminator state (Lightning's second pass would
  recompute it with the updated generator). Records losses, log entries, the gradients of
  both networks and the discriminator's BatchNorm statistics."""
  disc = vq.loss.discriminator
  disc_state0 = {k: v.clone() for k, v in disc.state_dict().items()}
  last = vq.get_last_layer()
  for tag, step in (("before", DISC_START - 1), ("after", DISC_START)):
    disc.load_state_dict(disc_state0)
    vq.zero_grad(set_to_none=True)
    xrec, qloss = vq(x)
    aeloss, log = vq.loss(qloss, x, xrec, 0, step, last_layer=last, split="train")
    aeloss.backward()
    results[f"{tag}:xrec"] = xrec.detach().numpy()
    for k, v in log.items():
      results[f"{tag}:{k.split('/', 1)[1]}"] = float(v)
    for k, p in vq.named_parameters():
      if not k.startswith("loss."):
        results[f"{tag}:g:{k}"] = p.grad.numpy().copy()
    for k, v in _buffers(disc).items():
      results[f"{tag}:stats_g:{k}"] = v
    disc.zero_grad(set_to_none=True)
    d_loss, d_log = vq.loss(qloss, x, xrec, 1, step, last_layer=last, split="train")
    d_loss.backward()
    for k, v in d_log.items():
      results[f"{tag}:{k.split('/', 1)[1]}"] = float(v)
    for k, p in disc.named_parameters():
      results[f"{tag}:d:{k}"] = p.grad.numpy().copy()
    for k, v in _buffers(disc).items():
      results[f"{tag}:stats_gd:{k}"] = v
    # The discriminator pass alone, from the initial statistics (what our trainer does).
    disc.load_state_dict(disc_state0)
    with torch.no_grad():
      vq.loss(qloss, x, xrec, 1, step, last_layer=last, split="train")
    for k, v in _buffers(disc).items():
      results[f"{tag}:stats_d:{k}"] = v
  disc.load_state_dict(disc_state0)


def stage2_loss(instantiate_from_config, x, out, results):
  """Net2NetTransformer (unconditional): its training loss with pkeep=1 on the model's own
  logits and F.cross_entropy on larger random logits; then, with pkeep < 1 in training
  mode, the corrupted input sequences its forward hands the GPT (z_indices replaced by
  given codes, so that the statistics cover many tokens)."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  t_cfg = {"target": "taming.models.cond_transformer.Net2NetTransformer",
           "base_learning_rate": 4.5e-6,
           "params": {"cond_stage_config": "__is_unconditional__", "sos_token": 0,
                      "first_stage_key": "image", "cond_stage_key": "image",
                      "first_stage_config": vq_config(N_CODES),
                      "transformer_config": {
                          "target": "taming.modules.transformer.mingpt.GPT",
                          "params": {"vocab_size": N_CODES, "block_size": 16, "n_layer": 2,
                                     "n_head": 2, "n_embd": 32}}}}
  model = instantiate_from_config(t_cfg).eval()
  spread_codebook(model.first_stage_model, x)
  with torch.no_grad():
    logits, target = model(x, x)
    loss = model.shared_step({"image": x.permute(0, 2, 3, 1)}, 0)
  results.update(s2_logits=logits.numpy(), s2_target=target.numpy(), s2_loss=float(loss),
                 s2_gap=nearest_gap(model.first_stage_model, x))
  lightning_checkpoint(model, os.path.join(out, "uncond.ckpt"))
  save_yaml(t_cfg, os.path.join(out, "uncond.yaml"))
  big_logits = torch.randn(8, 16, N_CODES) * 3.0
  big_target = torch.randint(0, N_CODES, (8, 16))
  results.update(ce_logits=big_logits.numpy(), ce_target=big_target.numpy(),
                 ce_loss=float(F.cross_entropy(big_logits.reshape(-1, N_CODES),
                                               big_target.reshape(-1))))

  model.train()
  model.pkeep = PKEEP
  z = torch.randint(0, N_CODES, (CORRUPT_BATCH, 16))
  model.encode_to_z = lambda _x: (None, z)
  captured = []
  hook = model.transformer.register_forward_pre_hook(
      lambda _m, args: captured.append(args[0].detach().clone()))
  c = torch.zeros(CORRUPT_BATCH, 3, 1, 1)  # the SOS provider reads only the batch size
  with torch.no_grad():
    for _ in range(CORRUPT_ROUNDS):
      model(c, c)
  hook.remove()
  results.update(corrupt_z=z.numpy(), corrupt_inputs=torch.stack(captured).numpy(),
                 corrupt_pkeep=PKEEP, corrupt_vocab=model.transformer.config.vocab_size,
                 corrupt_sos=model.sos_token)


def main_loss(out):
  """Writes, for tests/test_loss_parity.py:
    vqgan_loss.ckpt / .yaml   a VQModel with VQLPIPSWithDiscriminator (disc_start=3); the
                              state dict holds the generator and loss.discriminator.*
    lpips.npz                 the LPIPS network's (random) state dict
    uncond.ckpt / .yaml       an unconditional Net2NetTransformer
    loss_reference.npz        inputs, losses, log entries, gradients, BatchNorm statistics
                              (stage1_loss_steps) and the stage-2 results (stage2_loss)
  Exits with status 3 when torchvision is not installed in this venv.
  """
  os.makedirs(out, exist_ok=True)
  torch.set_num_threads(1)  # tiny models: a second thread only spins (2 cores, shared)
  if not stub_torchvision():
    missing("torchvision (taming's LPIPS builds its VGG16)")
  offline_lpips()
  torch.manual_seed(SEED)
  from taming.main import instantiate_from_config  # pylint: disable=g-import-not-at-top
  loss_cfg = {"target": VQ_LOSS,
              "params": {"disc_start": DISC_START, "disc_weight": 0.8, "codebook_weight": 1.0,
                         "perceptual_weight": 1.0, "disc_in_channels": 3,
                         "disc_num_layers": 2, "disc_ndf": 16, "disc_conditional": False,
                         "disc_loss": "hinge"}}
  # One resolution level less than the other tests' VQGAN (only the middle blocks'
  # attention): gradients through every kind of layer at half the compile time.
  cfg = vq_config(N_CODES, loss=loss_cfg, ch_mult=[1, 2], attn_resolutions=[])
  vq = instantiate_from_config(cfg)
  x = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2.0 - 1.0
  spread_codebook(vq, x)
  randomize_lpips(vq.loss.perceptual_loss)
  with torch.no_grad():
    # He-normal convolutions instead of weights_init's N(0, 0.02): batch variances of
    # order 1, so that BatchNorm's running statistics show how they are updated.
    for m in vq.loss.discriminator.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.bias.uniform_(-0.1, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  state = {k: v for k, v in vq.state_dict().items() if not k.startswith("loss.perceptual_loss.")}
  torch.save({"state_dict": state, "global_step": 0}, os.path.join(out, "vqgan_loss.ckpt"))
  save_yaml(cfg, os.path.join(out, "vqgan_loss.yaml"))
  np.savez(os.path.join(out, "lpips.npz"),
           **{k: v.numpy() for k, v in vq.loss.perceptual_loss.state_dict().items()})
  # Training mode (the discriminator's BatchNorm uses batch statistics), except LPIPS: in a
  # Lightning run model.train() also switches on the dropout (p=0.5) before each LPIPS
  # linear layer, which vqgan_jax does not have; the comparison is without it.
  vq.train()
  vq.loss.perceptual_loss.eval()
  results = {"x": x.numpy(), "gap": nearest_gap(vq, x), "disc_start": DISC_START}
  stage1_loss_steps(vq, x, results)
  stage2_loss(instantiate_from_config, x, out, results)
  np.savez(os.path.join(out, "loss_reference.npz"), **results)
  print("wrote", out)


# ----------------------------------------------------------------------------- --fid

FID_IMAGE_SIZES = ((64, 64), (320, 400))  # upsampled to 299 / downsampled to 299
FID_DIM = 256                             # feature dimension of the Frechet-distance cases


def randomize_inception(net, seed=SEED):
  """Random weights for every float entry of an Inception3 state dict (numpy RNG):
  He-normal kernels, BatchNorm scales and variances in [0.5, 1.5], biases and means in
  [-0.1, 0.1] (the recipe of tests/test_inception.py)."""
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, v in net.state_dict().items():
      if not v.is_floating_point():
        continue
      leaf = name.rsplit(".", 1)[-1]
      if leaf == "weight" and v.dim() >= 2:
        fan_in = int(np.prod(v.shape[1:]))
        value = rng.standard_normal(v.shape) * np.sqrt(2.0 / fan_in)
      elif leaf in ("running_var",) or (leaf == "weight" and ".bn." in name):
        value = rng.uniform(0.5, 1.5, v.shape)
      else:
        value = rng.uniform(-0.1, 0.1, v.shape)
      v.copy_(torch.from_numpy(value.astype(np.float32)))


def fid_inception_offline():
  """pytorch-fid's `InceptionV3([3])` (use_fid_inception=True: torchvision's Inception3
  with its FIDInceptionA/C/E_1/E_2 blocks), built through pytorch-fid's own code with the
  weight download replaced by random weights. Returns (model, the full Inception3 state
  dict including fc, which pytorch-fid's wrapper drops)."""
  from pytorch_fid import inception as fid_inception  # pylint: disable=g-import-not-at-top
  from torchvision.models import inception as tv_inception  # pylint: disable=g-import-not-at-top
  built = {}

  def load_random(self, state_dict, strict=True, assign=False):
    del state_dict, strict, assign
    randomize_inception(self)
    built["net"] = self

  original = tv_inception.Inception3.load_state_dict
  fid_inception.load_state_dict_from_url = lambda *args, **kwargs: {}
  tv_inception.Inception3.load_state_dict = load_random
  try:
    block = fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
    model = fid_inception.InceptionV3([block]).eval()
  finally:
    tv_inception.Inception3.load_state_dict = original
  state = {k: v.numpy().copy() for k, v in built["net"].state_dict().items()}
  return model, state


def main_fid(out):
  """Writes, for tests/test_fid_parity.py:
    inception_state.npz   the random Inception3 state dict (torch names and layouts)
    images_<i>/*.png      uint8 RGB images of each size in FID_IMAGE_SIZES
    fid_reference.npz     the images, pytorch-fid's 2048-d pool features of them (through
                          its get_activations: PNG -> PIL -> ToTensor -> InceptionV3, which
                          resizes to 299 and maps [0, 1] to [-1, 1]), and for feature sets
                          of FID_DIM dimensions their statistics (np.mean, np.cov as
                          pytorch-fid) and calculate_frechet_distance between them
  Exits with status 3 when torchvision or pytorch-fid is not installed in this venv.
  """
  os.makedirs(out, exist_ok=True)
  torch.set_num_threads(1)
  if not stub_torchvision():
    missing("torchvision (pytorch-fid subclasses its Inception blocks)")
  try:
    from pytorch_fid import fid_score  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    missing(f"pytorch-fid ({e})")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import pytorch_fid  # pylint: disable=g-import-not-at-top
  import scipy  # pylint: disable=g-import-not-at-top
  torch.manual_seed(SEED)
  model, state = fid_inception_offline()
  np.savez(os.path.join(out, "inception_state.npz"), **state)
  rng = np.random.default_rng(SEED)
  results = {"pytorch_fid_version": pytorch_fid.__version__, "scipy_version": scipy.__version__,
             "torch_version": torch.__version__}
  for i, (h, w) in enumerate(FID_IMAGE_SIZES):
    # Smooth random images (noise blurred by a coarse grid) plus some pixel noise.
    coarse = rng.uniform(0, 255, (2, h // 8 + 2, w // 8 + 2, 3))
    smooth = np.stack([np.asarray(Image.fromarray(c.astype(np.uint8)).resize(
        (w, h), Image.BICUBIC)) for c in coarse]).astype(np.float64)
    images = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    folder = os.path.join(out, f"images_{i}")
    os.makedirs(folder, exist_ok=True)
    files = []
    for j, image in enumerate(images):
      files.append(os.path.join(folder, f"{j}.png"))
      Image.fromarray(image).save(files[-1])
    results[f"images_{i}"] = images
    results[f"pool_{i}"] = fid_score.get_activations(files, model, batch_size=2, dims=2048,
                                                     device="cpu", num_workers=0)
  # Frechet distance: feature sets of FID_DIM dimensions, statistics as pytorch-fid's
  # calculate_activation_statistics computes them.
  cases = {"full_rank": (2000, 2000), "rank_deficient": (FID_DIM // 2, FID_DIM // 3),
           "same": (1000, None)}
  mixing = rng.standard_normal((FID_DIM, FID_DIM)) / np.sqrt(FID_DIM)
  for name, (n1, n2) in cases.items():
    f1 = rng.standard_normal((n1, FID_DIM)) @ mixing + 0.5
    f2 = f1 if n2 is None else rng.gamma(2.0, 1.0, (n2, FID_DIM)) @ mixing.T
    stats = [(np.mean(f, axis=0), np.cov(f, rowvar=False)) for f in (f1, f2)]
    results[f"fd_{name}"] = fid_score.calculate_frechet_distance(
        stats[0][0], stats[0][1], stats[1][0], stats[1][1])
    for k, f in enumerate((f1, f2)):
      results[f"fd_{name}_features{k}"] = f
      results[f"fd_{name}_mu{k}"], results[f"fd_{name}_sigma{k}"] = stats[k]
  np.savez(os.path.join(out, "fid_reference.npz"), **results)
  print("wrote", out)


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--loss":
    main_loss(sys.argv[2])
  elif len(sys.argv) == 3 and sys.argv[1] == "--fid":
    main_fid(sys.argv[2])
  else:
    main(sys.argv[1])

"""Compiles every paper config for TPU slices (`python -m vqgan_jax.dry_run --topology`)
and renders the table of docs/scaling.md.

  .venv-tpu/bin/python benchmarks/tpu_compile_table.py --out runs/tpu_table [--only NAME,...]
  .venv-tpu/bin/python benchmarks/tpu_compile_table.py --out runs/tpu_table --render

Each run is one dry-run subprocess writing runs/tpu_table/<name>.json; --render reads
them all and prints the markdown table. Runs already written are skipped, so an
interrupted sweep resumes.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3

STAGE1_16K = ["--config", "configs/vqgan_imagenet_f16_16384.py",
              "--config.eval_batch_size=256"]
STAGE1_FFHQ = ["--config", "configs/vqgan_ffhq_f16_1024.py", "--config.eval_batch_size=256"]
GPT_IMAGENET = ["--config", "configs/transformer_imagenet_cond.py",
                "--stage1_config", "configs/vqgan_imagenet_f16_16384.py",
                "--config.eval_batch_size=256", "--config.sampling.batch_size=256"]
GPT_FFHQ = ["--config", "configs/transformer_ffhq.py", "--stage1_config",
            "configs/vqgan_ffhq_f16_1024.py", "--config.eval_batch_size=256",
            "--config.sampling.batch_size=256"]
GPT_SEG = ["--config", "configs/transformer_sflckr_seg.py", "--config.eval_batch_size=256",
           "--config.sampling.batch_size=256"]

# name -> (arguments, topology, mesh, global batch); in the order they run.
RUNS = {
    "gpt_imagenet_1.4b__v5e-256": (GPT_IMAGENET, "v5e:16x16", "1,256,1", 256),
    "gpt_imagenet_1.4b__v5e-256_b1024": (GPT_IMAGENET, "v5e:16x16", "1,256,1", 1024),
    "vqgan_imagenet_16k__v5e-256": (STAGE1_16K, "v5e:16x16", "256,1,1", 256),
    "vqgan_imagenet_16k__v4-32": (STAGE1_16K, "v4:2x2x4", "32,1,1", 128),
    "vqgan_imagenet_16k__v5p-128": (STAGE1_16K, "v5p:4x4x4", "64,1,1", 256),
    "gpt_imagenet_1.4b__v5p-128": (GPT_IMAGENET, "v5p:4x4x4", "1,64,1", 256),
    "gpt_imagenet_1.4b__v4-32": (GPT_IMAGENET, "v4:2x2x4", "1,32,1", 256),
    # Contrast: slices these do not fit on at this batch.
    "vqgan_imagenet_16k__v5e-4_no_fit": (STAGE1_16K + ["--config.eval_batch_size=128"],
                                         "v5e:2x2", "4,1,1", 128),
    "gpt_imagenet_1.4b__v5e-4_no_fit": (GPT_IMAGENET, "v5e:2x2", "1,4,1", 256),
    "gpt_ffhq__v5e-256": (GPT_FFHQ, "v5e:16x16", "1,256,1", 256),
    "gpt_sflckr_seg__v5e-256": (GPT_SEG, "v5e:16x16", "1,256,1", 256),
    "vqgan_ffhq_1024__v5e-256": (STAGE1_FFHQ, "v5e:16x16", "256,1,1", 256),
    "gpt_ffhq__v4-32": (GPT_FFHQ, "v4:2x2x4", "1,32,1", 256),
    "gpt_sflckr_seg__v4-32": (GPT_SEG, "v4:2x2x4", "1,32,1", 256),
    "vqgan_ffhq_1024__v4-32": (STAGE1_FFHQ, "v4:2x2x4", "32,1,1", 128),
    "gpt_ffhq__v5p-128": (GPT_FFHQ, "v5p:4x4x4", "1,64,1", 256),
    "gpt_sflckr_seg__v5p-128": (GPT_SEG, "v5p:4x4x4", "1,64,1", 256),
    "vqgan_ffhq_1024__v5p-128": (STAGE1_FFHQ, "v5p:4x4x4", "64,1,1", 256),
}


def run(name, out_dir, steps):
  args, topology, mesh, batch = RUNS[name]
  path = os.path.join(out_dir, f"{name}.json")
  if os.path.exists(path):
    return
  cmd = [sys.executable, "-m", "vqgan_jax.dry_run", *args, "--topology", topology,
         "--mesh", mesh, "--batch_size", str(batch), "--steps", steps, "--json", path]
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=REPO))
  seconds = time.time() - start
  if proc.returncode:
    tail = (proc.stdout + proc.stderr)[-1500:]
    print(f"{name}: FAILED after {seconds:.0f} s\n{tail}", flush=True)
    with open(os.path.join(out_dir, f"{name}.failed.txt"), "w") as f:
      f.write(" ".join(cmd) + "\n" + tail)
    return
  with open(path) as f:
    result = json.load(f)
  result["command"] = " ".join(["python -m vqgan_jax.dry_run", *args, "--topology", topology,
                                "--mesh", mesh, "--batch_size", str(batch), "--steps", steps])
  result["compile_seconds"] = seconds
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{name}: {seconds:.0f} s, fits={result['fits']}", flush=True)


def render(out_dir):
  rows = ["| config | slice | mesh (data,fsdp,tensor) | global batch | per-chip memory "
          "(train) | fits | est. step | bound | est. MFU | largest all-gather |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  for name in RUNS:
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(path):
      failed = os.path.join(out_dir, f"{name}.failed.txt")
      if os.path.exists(failed):
        rows.append(f"| {name.split('__')[0]} | {RUNS[name][1]} | {RUNS[name][2]} | "
                    f"{RUNS[name][3]} | compile failed (see {failed}) | | | | | |")
      continue
    with open(path) as f:
      r = json.load(f)
    t = r["steps"]["train"]
    mesh = ",".join(str(v) for v in r["mesh"].values())
    if "compile_error" in t:
      rows.append(f"| {name.split('__')[0]} | {r['topology']} ({r['num_chips']} devices) | "
                  f"{mesh} | {r['global_batch']} | {t['per_device_bytes']['total'] / GIB:.2f} "
                  f"/ {r['device_memory_bytes'] / GIB:g} GiB (compiler: out of HBM) | **no** "
                  "| | | | |")
      continue
    mfu = t.get("estimated_mfu")
    rows.append(
        f"| {name.split('__')[0]} | {r['topology']} ({r['num_chips']} devices) | {mesh} | "
        f"{r['global_batch']}"
        + (f" ({r['grad_accum_steps']} micro)" if r["grad_accum_steps"] > 1 else "")
        + f" | {t['per_device_bytes']['total'] / GIB:.2f} / {r['device_memory_bytes'] / GIB:g}"
        f" GiB | {'yes' if t['fits'] else '**no**'} | {t['estimated_step_seconds'] * 1e3:.0f} ms"
        f" | {t['estimate_bound']} | {'-' if mfu is None else f'{100 * mfu:.0f}%'} | "
        + (f"{t['largest_all_gather_bytes'] / 2 ** 20:.1f} MiB `{t['largest_all_gather_shape']}` |"
           if t["largest_all_gather_bytes"]
           else "none (data parallel) |" if r["mesh"]["fsdp"] == 1
           else "none parsed (the HLO's weight gathers are not plain all-gather ops here) |"))
  print("\n".join(rows))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/tpu_table")
  parser.add_argument("--only", default="", help="comma-separated run names")
  parser.add_argument("--steps", default="train", help="steps to compile per run")
  parser.add_argument("--render", action="store_true")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.render:
    render(args.out)
    return
  names = [n for n in args.only.split(",") if n] or list(RUNS)
  for name in names:
    run(name, args.out, args.steps)


if __name__ == "__main__":
  main()

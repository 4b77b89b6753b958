"""XLA:CPU flags this project sets by default (before the CPU backend starts).

jaxlib 0.10.2 hands dots and convolutions, together with the elementwise ops around them,
to YNNPACK fusions. On the 2-core x86 machines this project is developed on those fused
graphs run the training steps more slowly than XLA's own emitters with the library calls
left unfused: side by side in one run (`benchmarks/compare_reference.py --skip_ref
--xla_flags_variant=--xla_cpu_experimental_ynn_fusion_type=`, 4 alternating rounds), the
stage-1 step (a) took 0.711 s instead of 0.877 s and the stage-2 step (b) 3.04 s instead
of 3.20 s. So `apply()` adds `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK
fusions) to XLA_FLAGS.

It is applied when `vqgan_jax` is imported, only
- if XLA_FLAGS does not already set that flag (yours win),
- for the jaxlib versions it was measured with (an unknown flag aborts XLA at start-up, so
  other versions are left alone), and
- unless VQGAN_JAX_DEFAULT_XLA_FLAGS=0.
XLA reads XLA_FLAGS once, when the first backend starts: a program that ran a JAX
computation before importing vqgan_jax keeps the flags it started with. The flag only
affects the CPU backend; GPU and TPU programs are unchanged.
"""

from importlib import metadata
import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
MEASURED_JAXLIB_VERSIONS = ("0.10.2",)


def _jaxlib_version():
  try:
    return metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return None


def apply(environ=None) -> bool:
  """Add the default flags to XLA_FLAGS in `environ` (os.environ); True if changed."""
  environ = os.environ if environ is None else environ
  if environ.get("VQGAN_JAX_DEFAULT_XLA_FLAGS", "1") == "0":
    return False
  current = environ.get("XLA_FLAGS", "")
  if FLAG.rstrip("=") in current or _jaxlib_version() not in MEASURED_JAXLIB_VERSIONS:
    return False
  environ["XLA_FLAGS"] = (current + " " + FLAG).strip()
  return True

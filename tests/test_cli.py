"""Every command: one `error:` line and exit code 2 for bad input, --help exits 0."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _one_error_line(result):
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  return errors[0]


@pytest.mark.parametrize("args, names", [
    (["train_stage1.py", "--config", "configs/vqgan_tiny.py", "--workdir", "/tmp/never",
      "--config.modle.ch=64"], "modle"),
    (["-m", "vqgan_jax.decode_tokens", "--tokens", "/nonexistent/tokens", "--output",
      "/tmp/never_png"], "/nonexistent/tokens"),
    (["-m", "vqgan_jax.sample", "--workdir", "/nonexistent/gpt", "--output", "/tmp/never"],
     "/nonexistent/gpt"),
    (["-m", "vqgan_jax.eval", "--config", "configs/vqgan_tiny.py"], "--workdir"),
])
def test_bad_input_ends_in_one_error_line(args, names):
  line = _one_error_line(_run(*args))
  assert names in line


def test_verbosity_brings_back_the_traceback():
  result = _run("-m", "vqgan_jax.sample", "--workdir", "/nonexistent/gpt", "--output",
                "/tmp/never", "--verbosity=1")
  assert result.returncode == 2 and "Traceback" in result.stderr


def test_help_describes_the_command_and_exits_0():
  result = _run("-m", "vqgan_jax.decode_tokens", "--help")
  assert result.returncode == 0, result.stderr
  assert "Decode exported stage-1 tokens" in result.stdout and "--tokens" in result.stdout

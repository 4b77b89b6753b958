"""Tests for launch/tpu_run.sh (the Cloud TPU VM launcher), and for how a job it starts
finds its slice (sharding.maybe_initialize_distributed / cloud_tpu_vm_evidence).

No gcloud needed: most tests use --dry_run and parse the printed commands
("+ " followed by a shell-quoted argv). A fake `gcloud` is always first on PATH,
so a real one is never called; some tests let the fake execute the `ssh
--command` string locally (with HOME pointing at a temporary "worker"), to check
that the remote commands really work and that arguments survive quoting.
"""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "tpu_run.sh"
CONFIG_ENV = (
    "TPU_NAME", "TPU_ZONE", "TPU_TYPE", "TPU_RUNTIME", "GCP_PROJECT", "TPU_PYTHON",
    "TFDS_DATA_DIR", "XLA_FLAGS", "LIBTPU_INIT_ARGS",
)
BASE = ["--name", "my-tpu", "--zone", "us-central2-b"]
SUBCOMMANDS = ["create", "setup", "sync", "run", "logs", "stop", "delete"]

FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
home = os.environ.get("FAKE_REMOTE_HOME")
if home and args[:3] == ["compute", "tpus", "tpu-vm"]:
    if args[3] == "scp":
        src, dst = [a for a in args[4:] if not a.startswith("--")]
        shutil.copy(src, os.path.join(home, dst.split(":", 1)[1]))
        shutil.copy(src, os.environ["FAKE_SCP_COPY"])
    elif args[3] == "ssh":
        cmd = args[args.index("--command") + 1]
        env = dict(os.environ, HOME=home, PATH=os.environ["FAKE_REMOTE_PATH"])
        sys.exit(subprocess.run(["bash", "-c", cmd], env=env, cwd=home).returncode)
"""

# Stands in for ~/vqgan_jax/.venv/bin/python on the simulated worker: records
# its argv, cwd and a few env vars, then prints a line (which goes to the log).
FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.environ["FAKE_PY_OUT"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
               "TFDS_DATA_DIR": os.environ.get("TFDS_DATA_DIR"),
               "EXTRA": os.environ.get("EXTRA"),
               "VQGAN_DISTRIBUTED": os.environ.get("VQGAN_DISTRIBUTED")}}, f)
print("hello from the job")
"""


def _write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def sandbox(tmp_path):
    """Fake gcloud on PATH + a fake remote home; returns a runner."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _write_exe(bindir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    remote_bin = tmp_path / "remote_bin"
    remote_bin.mkdir()
    # Remote commands must never need root in these tests.
    _write_exe(remote_bin / "sudo", "#!/bin/sh\necho 'sudo not allowed in tests' >&2\nexit 1\n")
    remote_home = tmp_path / "worker0" / "home"
    remote_home.mkdir(parents=True)
    log = tmp_path / "gcloud_calls.jsonl"
    log.touch()

    class Sandbox:
        home = remote_home
        root = tmp_path

        @staticmethod
        def run(*args, env=None, execute_remote=False):
            e = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV}
            e["PATH"] = f"{bindir}{os.pathsep}{e.get('PATH', '')}"
            e["FAKE_GCLOUD_LOG"] = str(log)
            e["FAKE_REMOTE_PATH"] = f"{remote_bin}{os.pathsep}{os.environ.get('PATH', '')}"
            e["FAKE_PY_OUT"] = str(tmp_path / "fake_python_out.json")
            e["FAKE_SCP_COPY"] = str(tmp_path / "scp_copy.tar.gz")
            if execute_remote:
                e["FAKE_REMOTE_HOME"] = str(remote_home)
            e.update(env or {})
            return subprocess.run(
                ["bash", str(SCRIPT), *args], env=e, capture_output=True, text=True,
                timeout=60, cwd=tmp_path,
            )

        @staticmethod
        def gcloud_calls():
            return [json.loads(line) for line in log.read_text().splitlines()]

    return Sandbox


def commands(stdout):
    """Printed commands ("+ argv...") as argv lists."""
    lines = [l for l in stdout.splitlines() if l.strip()]
    assert lines and all(l.startswith("+ ") for l in lines), stdout
    return [shlex.split(l[2:]) for l in lines]


def gcloud_cmds(stdout, verb):
    return [c for c in commands(stdout) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb]]


def remote_command(argv):
    assert "--command" in argv, argv
    return argv[argv.index("--command") + 1]


def required_jax_version():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(r"\s*jax\s*==\s*([^\s;#]+)", line)
        if m:
            return m.group(1)
    raise AssertionError("requirements.txt has no jax== pin")


def ok(result):
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result


# ---------------------------------------------------------------------------


def test_bash_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", str(SCRIPT)], check=True)


def test_help(sandbox):
    for args in (["--help"], ["-h"], ["run", "--help"], ["help"]):
        r = ok(sandbox.run(*args))
        for sub in SUBCOMMANDS:
            assert sub in r.stdout
        for env in ("TPU_NAME", "TPU_ZONE", "TPU_TYPE", "TPU_RUNTIME", "GCP_PROJECT"):
            assert env in r.stdout
    assert sandbox.gcloud_calls() == []


def test_create(sandbox):
    r = ok(sandbox.run("--dry_run", "create", *BASE, "--accelerator_type", "v4-32",
                       "--runtime_version", "tpu-ubuntu2204-base", "--project", "my-proj", "--spot"))
    (cmd,) = commands(r.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    for piece in ("--zone=us-central2-b", "--accelerator-type=v4-32",
                  "--version=tpu-ubuntu2204-base", "--project=my-proj", "--spot"):
        assert piece in cmd
    assert "--preemptible" not in cmd


def test_create_from_env_with_flag_override(sandbox):
    env = {"TPU_NAME": "env-tpu", "TPU_ZONE": "europe-west4-a", "TPU_TYPE": "v5litepod-16",
           "GCP_PROJECT": "env-proj"}
    r = ok(sandbox.run("create", "--dry-run", "--preemptible", env=env))
    (cmd,) = commands(r.stdout)
    assert cmd[5] == "env-tpu"
    assert {"--zone=europe-west4-a", "--accelerator-type=v5litepod-16", "--project=env-proj",
            "--preemptible"} <= set(cmd)
    # Runtime defaults by accelerator family when neither flag nor env is given.
    assert "--version=v2-alpha-tpuv5-lite" in cmd
    # Flags (either spelling, either form) override the environment.
    r = ok(sandbox.run("create", "--dry_run", "--name=flag-tpu", "--accelerator-type", "v4-8",
                       "--runtime-version=tpu-ubuntu2204-base", env=dict(env, TPU_RUNTIME="x")))
    (cmd,) = commands(r.stdout)
    assert cmd[5] == "flag-tpu"
    assert {"--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"} <= set(cmd)


def test_create_errors(sandbox):
    r = sandbox.run("--dry_run", "create", *BASE)
    assert r.returncode == 2
    assert "--accelerator_type" in r.stderr and "TPU_TYPE" in r.stderr
    r = sandbox.run("--dry_run", "create", *BASE, "--accelerator_type", "v4-8", "--spot",
                    "--preemptible")
    assert r.returncode == 2


def test_setup_pins_jax_tpu_to_requirements(sandbox):
    version = required_jax_version()
    r = ok(sandbox.run("--dry_run", "setup", *BASE))
    (cmd,) = gcloud_cmds(r.stdout, "ssh")
    assert cmd[5] == "my-tpu" and "--worker=all" in cmd and "--zone=us-central2-b" in cmd
    rc = remote_command(cmd)
    words = shlex.split(rc)
    assert f"jax[tpu]=={version}" in words
    assert "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html;" in rc
    assert "pip install -q -r requirements.txt;" in rc and "-m venv .venv;" in rc
    # requirements first, then the TPU jax on top.
    assert rc.index("-r requirements.txt") < rc.index("jax[tpu]")
    assert "~/vqgan_jax" in rc
    r = ok(sandbox.run("--dry_run", "setup", *BASE, "--python", "python3.12"))
    assert "python3.12 -m venv .venv" in remote_command(gcloud_cmds(r.stdout, "ssh")[0])


def test_sync_dry_run(sandbox):
    r = ok(sandbox.run("--dry_run", "sync", *BASE))
    (scp,) = gcloud_cmds(r.stdout, "scp")
    assert "--worker=all" in scp and "--zone=us-central2-b" in scp
    assert any(a.startswith("my-tpu:") for a in scp)
    tarball = next(a for a in scp[5:] if a.endswith(".tar.gz") and ":" not in a)
    assert not Path(tarball).exists()  # dry run makes nothing
    (ssh,) = gcloud_cmds(r.stdout, "ssh")
    assert "--worker=all" in ssh
    assert "tar -xzf" in remote_command(ssh) and "~/vqgan_jax" in remote_command(ssh)
    assert sandbox.gcloud_calls() == []


def test_sync_roundtrip(sandbox):
    """Real (non-dry) sync against the fake gcloud: tarball contents + untar."""
    r = ok(sandbox.run("sync", *BASE, execute_remote=True))
    calls = sandbox.gcloud_calls()
    assert [c[3] for c in calls] == ["scp", "ssh"]
    with tarfile.open(sandbox.root / "scp_copy.tar.gz") as tf:
        names = tf.getnames()
    assert "requirements.txt" in names and "launch/tpu_run.sh" in names
    assert any(n.startswith("vqgan_jax/") for n in names)
    assert not any(n.split("/")[0] in (".venv", "runs", ".git") for n in names)
    code = sandbox.home / "vqgan_jax"
    assert (code / "requirements.txt").read_text() == (REPO / "requirements.txt").read_text()
    assert (code / "launch" / "tpu_run.sh").is_file()
    assert not (sandbox.home / "vqgan_jax_src.tar.gz").exists()  # cleaned up remotely
    assert "+ gcloud compute tpus tpu-vm scp" in r.stderr  # commands echoed on stderr


PASSTHROUGH = ["--config", "configs/vqgan_imagenet_f16_16384.py", "--workdir", "gs://bucket/run 1",
               "--config.note=it's a \"test\"", "$HOME", "*", ""]


def test_run_dry_run(sandbox):
    r = ok(sandbox.run("--dry_run", "run", "stage1", *BASE, "--", *PASSTHROUGH,
                       env={"TFDS_DATA_DIR": "gs://bucket/tfds"}))
    check, launch = gcloud_cmds(r.stdout, "ssh")
    assert "--worker=all" in check and "--worker=all" in launch
    check_rc = remote_command(check)
    assert "/dev/accel" in check_rc and "/dev/vfio" in check_rc and ".venv/bin/python" in check_rc
    rc = remote_command(launch)
    assert "nohup" in rc and "logs/stage1.log" in rc and "2>&1" in rc and rc.rstrip().find("&") > 0
    words = shlex.split(rc)
    i = words.index("train_stage1.py")
    assert words[i + 1:i + 1 + len(PASSTHROUGH)] == PASSTHROUGH
    assert "TFDS_DATA_DIR=gs://bucket/tfds" in words
    assert "~/vqgan_jax/logs/stage1.log" in rc
    # Every worker starts jax.distributed (one job over the slice).
    assert words[words.index("env") + 1] == "VQGAN_DISTRIBUTED=1"


def test_run_env_can_opt_out_of_distributed(sandbox):
    r = ok(sandbox.run("--dry_run", "run", "stage1", *BASE, "--no_check",
                       "--env", "VQGAN_DISTRIBUTED=0"))
    (launch,) = gcloud_cmds(r.stdout, "ssh")
    words = shlex.split(remote_command(launch))
    settings = [w for w in words if w.startswith("VQGAN_DISTRIBUTED=")]
    assert settings == ["VQGAN_DISTRIBUTED=1", "VQGAN_DISTRIBUTED=0"]  # `env`: the last wins
    assert "VQGAN_DISTRIBUTED=0" in ok(sandbox.run("--help")).stdout


@pytest.mark.parametrize("mode,entry", [("stage1", ["train_stage1.py"]),
                                        ("stage2", ["train_stage2.py"]),
                                        ("eval", ["-m", "vqgan_jax.eval"])])
def test_run_modes_and_job_name(sandbox, mode, entry):
    r = ok(sandbox.run("--dry_run", "run", mode, *BASE, "--job", "exp7", "--no_check", "--", "--x=1"))
    (launch,) = gcloud_cmds(r.stdout, "ssh")
    words = shlex.split(remote_command(launch))
    i = words.index("-u")
    assert words[i + 1:i + 2 + len(entry)] == [*entry, "--x=1"]
    assert "logs/exp7.log" in words


def test_run_executes_on_simulated_worker(sandbox):
    """Execute the real remote command (fake worker = temp HOME): the job gets
    exactly the passthrough argv and env, runs in ~/vqgan_jax, logs to logs/."""
    code = sandbox.home / "vqgan_jax"
    (code / ".venv" / "bin").mkdir(parents=True)
    _write_exe(code / ".venv" / "bin" / "python", FAKE_PYTHON.format(python=sys.executable))
    (code / "train_stage1.py").write_text("")
    r = ok(sandbox.run("run", "stage1", *BASE, "--env", "EXTRA=two words", "--", *PASSTHROUGH,
                       env={"TFDS_DATA_DIR": "gs://b/tfds dir"}, execute_remote=True))
    assert [c[3] for c in sandbox.gcloud_calls()] == ["ssh", "ssh"]  # pre-flight + launch
    assert "started pid" in r.stdout
    out = sandbox.root / "fake_python_out.json"
    deadline = time.time() + 20
    while time.time() < deadline and not (out.exists() and out.stat().st_size):
        time.sleep(0.05)
    got = json.loads(out.read_text())
    assert got["argv"] == ["-u", "train_stage1.py", *PASSTHROUGH]
    assert got["cwd"] == str(code)
    assert got["TFDS_DATA_DIR"] == "gs://b/tfds dir" and got["EXTRA"] == "two words"
    assert got["VQGAN_DISTRIBUTED"] == "1"
    log = code / "logs" / "stage1.log"
    deadline = time.time() + 20
    while time.time() < deadline and "hello from the job" not in log.read_text():
        time.sleep(0.05)
    text = log.read_text()
    assert "run stage1 ===" in text and "hello from the job" in text


def test_run_preflight_failure_stops_launch(sandbox):
    # No ~/vqgan_jax on the simulated worker: pre-flight fails, nothing launched.
    r = sandbox.run("run", "stage1", *BASE, execute_remote=True)
    assert r.returncode != 0
    assert "run sync" in r.stderr
    assert [c[3] for c in sandbox.gcloud_calls()] == ["ssh"]


def test_logs(sandbox):
    r = ok(sandbox.run("--dry_run", "logs", "stage1", *BASE))
    (cmd,) = gcloud_cmds(r.stdout, "ssh")
    assert "--worker=all" in cmd
    rc = remote_command(cmd)
    assert "tail -n 100" in rc and "stage1.log" in rc and "~/vqgan_jax/logs" in rc
    r = ok(sandbox.run("--dry_run", "logs", "--job", "exp7", "--worker", "3", "--lines", "20",
                       "--follow", *BASE))
    (cmd,) = gcloud_cmds(r.stdout, "ssh")
    assert "--worker=3" in cmd and "--worker=all" not in cmd
    rc = remote_command(cmd)
    assert "tail -n 20 -F" in rc and "exp7.log" in rc
    for bad in ("x", "1,", "-1", "all,1"):
        assert sandbox.run("--dry_run", "logs", *BASE, "--worker", bad).returncode == 2
    r = ok(sandbox.run("--dry_run", "logs", *BASE, "--worker", "1,4-6"))
    assert "--worker=1,4-6" in gcloud_cmds(r.stdout, "ssh")[0]


def test_logs_on_simulated_worker(sandbox):
    logs = sandbox.home / "vqgan_jax" / "logs"
    logs.mkdir(parents=True)
    (logs / "old.log").write_text("old line\n")
    os.utime(logs / "old.log", (1, 1))
    (logs / "stage2.log").write_text("".join(f"line {i}\n" for i in range(300)))
    r = ok(sandbox.run("logs", *BASE, "--lines", "3", execute_remote=True))  # newest log
    assert [l.split("] ", 1)[1] for l in r.stdout.splitlines()] == ["line 297", "line 298", "line 299"]
    assert all(l.startswith("[") for l in r.stdout.splitlines())  # prefixed with hostname
    r = ok(sandbox.run("logs", "old", *BASE, execute_remote=True))
    assert r.stdout.rstrip().endswith("old line")


def test_stop(sandbox):
    r = ok(sandbox.run("--dry_run", "stop", *BASE))
    (cmd,) = gcloud_cmds(r.stdout, "ssh")
    assert "--worker=all" in cmd
    rc = remote_command(cmd)
    for piece in ("pkill -f", "lsof", "/dev/accel", "/dev/vfio", "/tmp/libtpu_lockfile"):
        assert piece in rc
    pattern = re.search(r'pat="([^"]+)"', rc).group(1)
    for victim in ("/home/u/vqgan_jax/.venv/bin/python -u train_stage1.py --workdir gs://b/r",
                   "python train_stage2.py", "python3 -m vqgan_jax.eval --config c.py"):
        assert re.search(pattern, victim), victim
    # The remote shell running the stop command must not match its own pattern
    # (otherwise pkill -f kills it), nor should unrelated processes.
    assert not re.search(pattern, rc)
    assert not re.search(pattern, "bash -c " + rc)
    assert not re.search(pattern, "python serve.py")
    r = ok(sandbox.run("--dry_run", "stop", *BASE, "--worker=1"))
    assert "--worker=1" in gcloud_cmds(r.stdout, "ssh")[0]


def test_delete(sandbox):
    r = ok(sandbox.run("--dry_run", "delete", *BASE, "--project", "p"))
    (cmd,) = commands(r.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu"]
    assert {"--zone=us-central2-b", "--quiet", "--project=p"} <= set(cmd)


def test_real_mode_calls_gcloud(sandbox):
    ok(sandbox.run("delete", *BASE))
    assert sandbox.gcloud_calls() == [["compute", "tpus", "tpu-vm", "delete", "my-tpu",
                                       "--zone=us-central2-b", "--quiet"]]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_dry_run_runs_nothing(sandbox, sub):
    extra = {"create": ["--accelerator_type", "v4-8"], "run": ["stage1"]}.get(sub, [])
    r = ok(sandbox.run("--dry_run", sub, *BASE, *extra))
    assert commands(r.stdout)
    assert sandbox.gcloud_calls() == []


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_missing_name_and_zone(sandbox, sub):
    extra = {"create": ["--accelerator_type", "v4-8"], "run": ["stage1"]}.get(sub, [])
    r = sandbox.run("--dry_run", sub, "--zone", "z", *extra)
    assert r.returncode == 2
    assert "--name" in r.stderr and "TPU_NAME" in r.stderr
    r = sandbox.run("--dry_run", sub, "--name", "n", *extra)
    assert r.returncode == 2
    assert "--zone" in r.stderr and "TPU_ZONE" in r.stderr
    assert sandbox.gcloud_calls() == []


@pytest.mark.parametrize("args", [
    ["bogus"],
    [],
    ["delete", "--bogus"],
    ["-x", "delete"],
    ["delete", "--spot"],            # option of another subcommand
    ["delete", "--", "x"],           # passthrough only for run
    ["delete", "extra"],
    ["run"],                         # missing mode
    ["run", "stage3"],
    ["run", "stage1", "--job", "../x"],
    ["run", "stage1", "--env", "NOEQUALS"],
    ["logs", "--lines"],             # value missing
    ["sync", "--dry_run=yes"],
])
def test_usage_errors_exit_2(sandbox, args):
    r = sandbox.run("--dry_run", *args, env={"TPU_NAME": "n", "TPU_ZONE": "z"})
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "error" in r.stderr and r.stdout == ""
    assert sandbox.gcloud_calls() == []


def test_unknown_subcommand_prints_usage(sandbox):
    r = sandbox.run("frobnicate", *BASE)
    assert r.returncode == 2
    assert "frobnicate" in r.stderr and "Usage:" in r.stderr


# --------------------------------------------------------------------------- multi-host start
# How a job that tpu_run.sh starts (or anyone) finds out it is one process of a slice.
# Fake environments and /dev listings; jax.distributed.initialize itself is replaced.


def _fake_dev(**folders):
    """listdir over a fake /dev: fake_dev(dev=[...], vfio=[...])."""
    tree = {"/dev": folders.get("dev", []), "/dev/vfio": folders.get("vfio", [])}
    return lambda path: tree.get(path, [])


@pytest.mark.parametrize("env,dev,vfio,libtpu,expected", [
    # TPU VMs: v2-v4/v5e chips are /dev/accel<N>, v5p/v6e chips /dev/vfio/<N>.
    ({}, ["accel0", "accel1", "accel2", "accel3", "null"], [], True, "/dev/accel0"),
    ({}, ["null", "vfio"], ["vfio", "0", "1"], True, "/dev/vfio/0"),
    ({"JAX_PLATFORMS": "tpu,cpu"}, ["accel0"], [], True, "/dev/accel0"),
    # TPU_SKIP_MDS_QUERY: JAX only takes the worker list from the environment (GKE).
    ({"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "h0,h1", "TPU_WORKER_ID": "1"},
     [], ["0"], True, "/dev/vfio/0"),
    # Not TPU VMs.
    ({}, ["null", "vfio"], ["vfio"], True, None),          # only VFIO's control file
    ({}, ["accel", "null"], [], True, None),               # DRM accel folder (e.g. an NPU)
    ({}, ["accel0"], [], False, None),                     # chips but no libtpu
    ({"JAX_PLATFORMS": "cpu"}, ["accel0"], [], True, None),  # this run asked for CPU
    ({"TPU_SKIP_MDS_QUERY": "1"}, ["accel0"], [], True, None),
    # CPU hosts that compile ahead of time for a TPU set these; never enough alone.
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-16"}, ["null"], [], True, None),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, ["null"], [], True, None),
    ({"TPU_ACCELERATOR_TYPE": "v4-8", "TPU_WORKER_HOSTNAMES": "localhost",
      "TPU_WORKER_ID": "0", "CLOUD_TPU_TASK_ID": "0"}, [], [], True, None),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2"}, [], [], True, None),
])
def test_cloud_tpu_vm_evidence(env, dev, vfio, libtpu, expected):
    from vqgan_jax import sharding  # pylint: disable=g-import-not-at-top
    got = sharding.cloud_tpu_vm_evidence(env, _fake_dev(dev=dev, vfio=vfio), libtpu)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got


@pytest.fixture
def fake_distributed(monkeypatch):
    """maybe_initialize_distributed with jax.distributed.initialize recorded, not run, and
    a settable TPU-VM verdict; nothing inherited from the test's own environment."""
    import jax  # pylint: disable=g-import-not-at-top
    from vqgan_jax import sharding  # pylint: disable=g-import-not-at-top
    for var in ("VQGAN_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    state = {"calls": [], "evidence": None, "error": None, "config": []}

    def initialize(**kwargs):
        state["calls"].append(kwargs)
        if state["error"] is not None:
            raise state["error"]

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.config, "update", lambda *a: state["config"].append(a))
    monkeypatch.setattr(sharding, "_tpu_vm_evidence_here", lambda: state["evidence"])
    state["start"] = sharding.maybe_initialize_distributed
    return state


def test_distributed_start_on_a_tpu_vm_needs_no_setting(fake_distributed):
    fake_distributed["evidence"] = "TPU device files /dev/accel0"
    fake_distributed["start"]()
    assert fake_distributed["calls"] == [{}]  # jax finds the slice itself
    assert ("jax_cpu_collectives_implementation", "gloo") in fake_distributed["config"]


def test_distributed_start_choices(fake_distributed, monkeypatch):
    start, calls = fake_distributed["start"], fake_distributed["calls"]
    start()  # no TPU VM, nothing set: one process
    assert calls == []
    monkeypatch.setenv("VQGAN_DISTRIBUTED", "1")  # forced: JAX's cluster detection
    start()
    assert calls == [{}]
    monkeypatch.setenv("VQGAN_DISTRIBUTED", "0")  # opted out, even on a TPU VM with JAX_*
    fake_distributed["evidence"] = "TPU device files /dev/vfio/0"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    start("10.0.0.1:1234", 2, 1)
    assert calls == [{}]
    monkeypatch.delenv("VQGAN_DISTRIBUTED")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    start()  # the README's CPU/GPU variables
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                         "process_id": 3}
    start("10.0.0.2:99", 2, 0)  # arguments win over the variables
    assert calls[-1] == {"coordinator_address": "10.0.0.2:99", "num_processes": 2,
                         "process_id": 0}
    monkeypatch.setenv("VQGAN_DISTRIBUTED", "yes")
    with pytest.raises(ValueError, match="VQGAN_DISTRIBUTED"):
        start()


def test_distributed_start_failures_on_a_tpu_vm(fake_distributed):
    fake_distributed["evidence"] = "TPU device files /dev/accel0"
    fake_distributed["error"] = ValueError("coordinator_address should be defined.")
    with pytest.raises(RuntimeError, match="VQGAN_DISTRIBUTED=0"):
        fake_distributed["start"]()
    # Too late (the caller used JAX first): a warning, one process, no crash.
    fake_distributed["error"] = RuntimeError(
        "jax.distributed.initialize() must be called before any JAX computations are executed.")
    fake_distributed["start"]()
    assert len(fake_distributed["calls"]) == 2


def test_this_cpu_test_process_is_not_taken_for_a_tpu_vm():
    from vqgan_jax import sharding  # pylint: disable=g-import-not-at-top
    assert sharding._tpu_vm_evidence_here() is None  # pylint: disable=protected-access

#!/usr/bin/env bash
# Manage Cloud TPU VMs (single host or pod slice) for vqgan_jax with
# `gcloud compute tpus tpu-vm ...`. Run `launch/tpu_run.sh --help` for usage.
#
# Every gcloud/local command is echoed as one line "+ <shell-quoted argv>"
# (on stderr when running, on stdout with --dry_run, where nothing is run).
# Remote commands are single-line strings given to `ssh --command`; all values
# in them that come from the user are quoted with printf %q.
set -euo pipefail

PROG=${0##*/}
REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR_NAME=vqgan_jax                 # code lives in ~/vqgan_jax on every worker
REMOTE_TARBALL=vqgan_jax_src.tar.gz       # scp destination, relative to ~
LIBTPU_URL=https://storage.googleapis.com/jax-releases/libtpu_releases.html
DEFAULT_RUNTIME=tpu-ubuntu2204-base
DEFAULT_PYTHON=python3.11                 # requirements.txt pins are for Python 3.11
PASSTHROUGH_ENV=(TFDS_DATA_DIR XLA_FLAGS LIBTPU_INIT_ARGS)
# Matches the training/eval processes but not the text of this pattern itself
# (the "[t]" trick), so `pkill -f` does not kill the remote shell running it.
KILL_PATTERN='[t]rain_stage[12]\.py|[v]qgan_jax\.eval'

usage() {
  cat <<EOF
Usage: $PROG [options] <subcommand> [subcommand options] [-- args for the job]

Manage a Cloud TPU VM (single host or pod slice) for vqgan_jax.

Subcommands:
  create            create the TPU VM
                      --accelerator_type T  (env TPU_TYPE; required) e.g. v4-32, v5litepod-16
                      --runtime_version V   (env TPU_RUNTIME; default by type: v5litepod-*
                                            v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-*
                                            v2-alpha-tpuv6e, others $DEFAULT_RUNTIME)
                      --spot | --preemptible
  sync              copy the working tree (git-tracked + untracked, not ignored files;
                    never .venv/ or runs/) to ~/$REMOTE_DIR_NAME on all workers
  setup             on all workers: venv in ~/$REMOTE_DIR_NAME/.venv, pip install -r
                    requirements.txt, then jax[tpu]==<jax pin of requirements.txt>
                      --python EXE          (env TPU_PYTHON; default $DEFAULT_PYTHON, apt-installed if missing)
  run MODE [-- ARGS] start MODE on all workers with nohup; MODE is one of
                      stage1  python train_stage1.py ARGS
                      stage2  python train_stage2.py ARGS
                      eval    python -m vqgan_jax.eval ARGS
                    output goes to ~/$REMOTE_DIR_NAME/logs/JOB.log on each worker.
                    The job gets VQGAN_DISTRIBUTED=1: every worker calls
                    jax.distributed.initialize(), which finds the slice itself (worker
                    list and id from the TPU metadata), so all workers form one job and
                    a SIGTERM to any of them stops all after the same step with one
                    checkpoint. (Without it the job would detect the TPU VM anyway.)
                    --env VQGAN_DISTRIBUTED=0 runs each worker as its own 1-process job.
                      --job JOB             log name (default: MODE)
                      --env KEY=VALUE       extra environment variable (repeatable);
                                            ${PASSTHROUGH_ENV[*]} are passed on when set
                      --no_check            skip the pre-flight check (code + venv present, TPU free)
  logs [JOB]        tail ~/$REMOTE_DIR_NAME/logs/JOB.log (default: newest log) on all workers
                      --worker W            only worker(s) W: N, 1,4,6 or 1-3 (default all)
                      --lines N             lines to show (default 100)
                      --follow              keep following (Ctrl-C to stop)
  stop              kill training/eval processes and any other holder of the TPU
                    devices (/dev/accel*, /dev/vfio/*); remove /tmp/libtpu_lockfile
                      --worker W            only worker(s) W (as for logs)
  delete            delete the TPU VM (no confirmation prompt)

Options for every subcommand (flags override environment variables):
  --name NAME       TPU VM name       (env TPU_NAME; required)
  --zone ZONE       zone              (env TPU_ZONE; required)
  --project ID      GCP project       (env GCP_PROJECT; default: gcloud config)
  --dry_run         print the commands (one per line, "+ " prefix), run nothing
  -h, --help        show this help

Options may be spelled with '-' or '_' (--dry-run, --accelerator-type) and
given as '--opt VALUE' or '--opt=VALUE'.

Example:
  export TPU_NAME=vqgan-pod TPU_ZONE=us-central2-b TPU_TYPE=v4-32
  $PROG create && $PROG sync && $PROG setup
  $PROG run stage1 -- --config configs/vqgan_imagenet_f16_16384.py --workdir gs://bucket/run1
  $PROG logs stage1 --follow
  $PROG stop && $PROG delete
EOF
}

die_usage() {  # bad command line: message + usage on stderr, exit 2
  printf '%s: error: %s\n\n' "$PROG" "$1" >&2
  usage >&2
  exit 2
}
die_missing() {  # a required value is missing: message naming flag + env var, exit 2
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf 'Run "%s --help" for usage.\n' "$PROG" >&2
  exit 2
}
die() { printf '%s: error: %s\n' "$PROG" "$1" >&2; exit 1; }

# Shell-quote one word for display (copy-pasteable): plain words stay as they
# are, anything else is single-quoted.
SAFE_WORD_RE='^[A-Za-z0-9_./:=@%+,-]+$'
shq() {
  if [[ $1 =~ $SAFE_WORD_RE ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
show_cmd() {
  local out='+' w
  for w in "$@"; do out+=" $(shq "$w")"; done
  if ((DRY_RUN)); then printf '%s\n' "$out"; else printf '%s\n' "$out" >&2; fi
}
run_cmd() {  # echo the command, then run it unless --dry_run
  show_cmd "$@"
  ((DRY_RUN)) && return 0
  if [[ $1 == gcloud ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH (install the Google Cloud CLI, or use --dry_run)"
  fi
  "$@"
}

# ----------------------------------------------------------------------------
# Command-line parsing
# ----------------------------------------------------------------------------
DRY_RUN=0
SUBCMD=''
POSITIONAL=()
PASSTHROUGH=()
SEEN_OPTS=()     # canonical names of the options given, for per-subcommand checks
OPT_NAME=${TPU_NAME:-}
OPT_ZONE=${TPU_ZONE:-}
OPT_PROJECT=${GCP_PROJECT:-}
OPT_TYPE=${TPU_TYPE:-}
OPT_RUNTIME=${TPU_RUNTIME:-}
OPT_PYTHON=${TPU_PYTHON:-$DEFAULT_PYTHON}
OPT_SPOT=0
OPT_PREEMPTIBLE=0
OPT_WORKER=all
OPT_JOB=''
OPT_LINES=100
OPT_FOLLOW=0
OPT_NO_CHECK=0
OPT_ENV=()

VALUE_OPTS=" name zone project accelerator_type runtime_version python worker job lines env "
FLAG_OPTS=" dry_run help spot preemptible follow no_check "

while (($#)); do
  arg=$1
  shift
  case $arg in
    --)
      PASSTHROUGH=("$@")
      break
      ;;
    -h)
      usage
      exit 0
      ;;
    --*)
      opt=${arg#--}
      has_value=0
      if [[ $opt == *=* ]]; then
        value=${opt#*=}
        opt=${opt%%=*}
        has_value=1
      fi
      opt=${opt//-/_}
      if [[ $VALUE_OPTS == *" $opt "* ]]; then
        if ((!has_value)); then
          (($#)) || die_usage "option --$opt needs a value"
          value=$1
          shift
        fi
      elif [[ $FLAG_OPTS == *" $opt "* ]]; then
        ((!has_value)) || die_usage "option --$opt takes no value"
      else
        die_usage "unknown option: $arg (arguments for the job go after '--')"
      fi
      SEEN_OPTS+=("$opt")
      case $opt in
        name) OPT_NAME=$value ;;
        zone) OPT_ZONE=$value ;;
        project) OPT_PROJECT=$value ;;
        accelerator_type) OPT_TYPE=$value ;;
        runtime_version) OPT_RUNTIME=$value ;;
        python) OPT_PYTHON=$value ;;
        worker) OPT_WORKER=$value ;;
        job) OPT_JOB=$value ;;
        lines) OPT_LINES=$value ;;
        env) OPT_ENV+=("$value") ;;
        dry_run) DRY_RUN=1 ;;
        help)
          usage
          exit 0
          ;;
        spot) OPT_SPOT=1 ;;
        preemptible) OPT_PREEMPTIBLE=1 ;;
        follow) OPT_FOLLOW=1 ;;
        no_check) OPT_NO_CHECK=1 ;;
      esac
      ;;
    -?*)
      die_usage "unknown option: $arg"
      ;;
    *)
      if [[ -z $SUBCMD ]]; then
        SUBCMD=$arg
      else
        POSITIONAL+=("$arg")
      fi
      ;;
  esac
done

[[ -n $SUBCMD ]] || die_usage "missing subcommand (create, setup, sync, run, logs, stop, delete)"
if [[ $SUBCMD == help ]]; then
  usage
  exit 0
fi

COMMON_OPTS=" name zone project dry_run help "
case $SUBCMD in
  create) allowed="accelerator_type runtime_version spot preemptible" max_pos=0 ;;
  setup) allowed="python" max_pos=0 ;;
  sync) allowed="" max_pos=0 ;;
  run) allowed="job env no_check" max_pos=1 ;;
  logs) allowed="worker job lines follow" max_pos=1 ;;
  stop) allowed="worker" max_pos=0 ;;
  delete) allowed="" max_pos=0 ;;
  *) die_usage "unknown subcommand: $SUBCMD" ;;
esac
for opt in "${SEEN_OPTS[@]}"; do
  if [[ $COMMON_OPTS != *" $opt "* && " $allowed " != *" $opt "* ]]; then
    die_usage "option --$opt does not apply to '$SUBCMD'"
  fi
done
if ((${#POSITIONAL[@]} > max_pos)); then
  die_usage "unexpected argument for '$SUBCMD': ${POSITIONAL[max_pos]}"
fi
if ((${#PASSTHROUGH[@]})) && [[ $SUBCMD != run ]]; then
  die_usage "arguments after '--' are only accepted by 'run'"
fi

require() {  # require VALUE FLAG ENVVAR WHAT
  [[ -n $1 ]] || die_missing "missing $4: pass $2 or set $3"
}
require "$OPT_NAME" --name TPU_NAME "TPU name"
require "$OPT_ZONE" --zone TPU_ZONE "zone"

WORKER_RE='^(all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$'
[[ $OPT_WORKER =~ $WORKER_RE ]] \
  || die_usage "--worker must be 'all', N, a list 1,4,6 or a range 1-3; got '$OPT_WORKER'"
[[ $OPT_LINES =~ ^[0-9]+$ ]] || die_usage "--lines must be a number, got '$OPT_LINES'"

GC=(gcloud compute tpus tpu-vm)
LOC=(--zone="$OPT_ZONE")
[[ -z $OPT_PROJECT ]] || LOC+=(--project="$OPT_PROJECT")

# ssh WORKER REMOTE_COMMAND: run a one-line command on the worker(s).
remote() {
  run_cmd "${GC[@]}" ssh "$OPT_NAME" "${LOC[@]}" --worker="$1" --command "$2"
}

# Remote snippet: TPU device files present on this worker (v4: /dev/accel*,
# v5e/v5p/v6e: /dev/vfio/*), and the pids holding them.
R_TPU_PIDS='devs=$(ls -d /dev/accel* /dev/vfio/* 2>/dev/null || true); pids=""; if [ -n "$devs" ]; then pids=$(sudo -n lsof -t -w $devs 2>/dev/null | sort -u | tr "\n" " " || true); fi'

# ----------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------
default_runtime() {  # the documented TPU VM image for an accelerator family
  case $1 in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "$DEFAULT_RUNTIME" ;;
  esac
}

cmd_create() {
  require "$OPT_TYPE" --accelerator_type TPU_TYPE "accelerator type"
  if [[ -z $OPT_RUNTIME ]]; then
    OPT_RUNTIME=$(default_runtime "$OPT_TYPE")
  fi
  ((!(OPT_SPOT && OPT_PREEMPTIBLE))) || die_usage "--spot and --preemptible are mutually exclusive"
  local extra=()
  ((!OPT_SPOT)) || extra+=(--spot)
  ((!OPT_PREEMPTIBLE)) || extra+=(--preemptible)
  run_cmd "${GC[@]}" create "$OPT_NAME" "${LOC[@]}" \
    --accelerator-type="$OPT_TYPE" --version="$OPT_RUNTIME" "${extra[@]}"
}

jax_pin() {  # the version in requirements.txt's "jax==X" line
  local req=$REPO_ROOT/requirements.txt version
  [[ -f $req ]] || die "$req not found"
  version=$(sed -nE 's/^[[:space:]]*jax[[:space:]]*==[[:space:]]*([^[:space:];#]+).*/\1/p' "$req" | head -n 1)
  [[ -n $version ]] || die "no 'jax==<version>' pin found in $req"
  [[ $version =~ ^[A-Za-z0-9.+!_-]+$ ]] || die "unexpected jax version '$version' in $req"
  printf '%s' "$version"
}

cmd_setup() {
  local jax_version py rcmd
  jax_version=$(jax_pin)
  py=$(printf %q "$OPT_PYTHON")
  rcmd="set -e; cd ~/$REMOTE_DIR_NAME || { echo \"\$(hostname): ~/$REMOTE_DIR_NAME missing, run sync first\" >&2; exit 1; }"
  rcmd+="; if ! command -v $py >/dev/null 2>&1; then sudo -n apt-get -o DPkg::Lock::Timeout=600 update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $py $py-venv; fi"
  rcmd+="; [ -x .venv/bin/python ] || $py -m venv .venv"
  rcmd+="; .venv/bin/python -m pip install -q --upgrade pip"
  rcmd+="; .venv/bin/python -m pip install -q -r requirements.txt"
  rcmd+="; .venv/bin/python -m pip install -q \"jax[tpu]==$jax_version\" -f $LIBTPU_URL"
  rcmd+="; echo \"\$(hostname): \$(.venv/bin/python -c 'import jax; print(\"jax\", jax.__version__)')\""
  remote all "$rcmd"
}

cmd_sync() {
  local tmpdir tarball listfile rcmd
  if ((DRY_RUN)); then
    tmpdir="${TMPDIR:-/tmp}/tpu_run.XXXXXX"
  else
    tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/tpu_run.XXXXXX")
    # shellcheck disable=SC2064  # expand now: tmpdir is local
    trap "rm -rf -- '$tmpdir'" EXIT
  fi
  tarball=$tmpdir/$REMOTE_TARBALL
  listfile=$tmpdir/files
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked files (with uncommitted edits) + untracked files not ignored by
    # .gitignore; skip deleted files and anything under .venv/ or runs/.
    show_cmd git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard
    show_cmd tar -czf "$tarball" -C "$REPO_ROOT" --null -T "$listfile"
    if ((!DRY_RUN)); then
      local f
      while IFS= read -r -d '' f; do
        case $f in .venv/* | runs/* | logs/*) continue ;; esac
        if [[ -e $REPO_ROOT/$f || -L $REPO_ROOT/$f ]]; then printf '%s\0' "$f"; fi
      done < <(git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard) >"$listfile"
      tar -czf "$tarball" -C "$REPO_ROOT" --null -T "$listfile"
    fi
  else
    run_cmd tar -czf "$tarball" -C "$REPO_ROOT" --exclude=./.venv --exclude=./runs \
      --exclude=./logs --exclude=./.git .
  fi
  run_cmd "${GC[@]}" scp "$tarball" "$OPT_NAME:$REMOTE_TARBALL" "${LOC[@]}" --worker=all
  rcmd="set -e; mkdir -p ~/$REMOTE_DIR_NAME; tar -xzf ~/$REMOTE_TARBALL -C ~/$REMOTE_DIR_NAME; rm -f ~/$REMOTE_TARBALL"
  rcmd+="; echo \"\$(hostname): synced to ~/$REMOTE_DIR_NAME\""
  remote all "$rcmd"
}

cmd_run() {
  local mode=${POSITIONAL[0]:-} job entry code_test check rcmd q_log v kv
  case $mode in
    stage1) entry="train_stage1.py" code_test="[ -f train_stage1.py ]" ;;
    stage2) entry="train_stage2.py" code_test="[ -f train_stage2.py ]" ;;
    eval) entry="-m vqgan_jax.eval" code_test="{ [ -f vqgan_jax/eval.py ] || [ -d vqgan_jax/eval ]; }" ;;
    '') die_usage "run needs a mode: stage1, stage2 or eval" ;;
    *) die_usage "unknown run mode '$mode' (expected stage1, stage2 or eval)" ;;
  esac
  job=${OPT_JOB:-$mode}
  [[ $job =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die_usage "--job must match [A-Za-z0-9._-]+, got '$job'"

  # Environment for the job: multi-host start, known variables when set locally,
  # then --env (later entries win, so --env VQGAN_DISTRIBUTED=0 opts out).
  local envs=(VQGAN_DISTRIBUTED=1)
  for v in "${PASSTHROUGH_ENV[@]}"; do
    [[ -z ${!v+x} ]] || envs+=("$v=${!v}")
  done
  for kv in "${OPT_ENV[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env expects KEY=VALUE, got '$kv'"
    envs+=("$kv")
  done

  if ((!OPT_NO_CHECK)); then
    # Pre-flight on all workers before starting anything, so that a bad worker
    # does not leave the others waiting forever in distributed init.
    check="cd ~/$REMOTE_DIR_NAME 2>/dev/null || { echo \"\$(hostname): ~/$REMOTE_DIR_NAME missing, run sync\" >&2; exit 1; }"
    check+="; $code_test || { echo \"\$(hostname): code for $mode missing, run sync\" >&2; exit 1; }"
    check+="; [ -x .venv/bin/python ] || { echo \"\$(hostname): no .venv, run setup\" >&2; exit 1; }"
    check+="; $R_TPU_PIDS; if [ -n \"\$pids\" ]; then echo \"\$(hostname): TPU busy (pids \$pids), run: launch/tpu_run.sh stop\" >&2; exit 1; fi"
    check+="; echo \"\$(hostname): ready\""
    remote all "$check"
  fi

  q_log=$(printf %q "logs/$job.log")
  rcmd="set -e; cd ~/$REMOTE_DIR_NAME; mkdir -p logs"
  rcmd+="; echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname) tpu_run.sh run $mode ===\" >> $q_log"
  rcmd+="; nohup env"
  for kv in "${envs[@]}"; do rcmd+=" $(printf %q "$kv")"; done
  rcmd+=" .venv/bin/python -u $entry"
  for v in "${PASSTHROUGH[@]}"; do rcmd+=" $(printf %q "$v")"; done
  rcmd+=" >> $q_log 2>&1 < /dev/null &"
  rcmd+=" echo \"\$(hostname): started pid \$!, log ~/$REMOTE_DIR_NAME/logs/$job.log\""
  remote all "$rcmd"
}

cmd_logs() {
  local job=${OPT_JOB:-${POSITIONAL[0]:-}} pick follow='' rcmd
  if [[ -n $job ]]; then
    [[ $job =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die_usage "invalid job name '$job'"
    pick="f=$(printf %q "$job.log")"
  else
    pick='f=$(ls -t -- *.log 2>/dev/null | head -n 1); [ -n "$f" ] || { echo "$(hostname): no logs yet"; exit 0; }'
  fi
  ((!OPT_FOLLOW)) || follow=' -F'
  rcmd="cd ~/$REMOTE_DIR_NAME/logs 2>/dev/null || { echo \"\$(hostname): no logs yet\"; exit 0; }"
  rcmd+="; $pick; h=\$(hostname); tail -n $OPT_LINES$follow -- \"\$f\" 2>&1 | sed -u \"s|^|[\$h] |\""
  remote "$OPT_WORKER" "$rcmd"
}

cmd_stop() {
  local rcmd
  rcmd="pat=\"$KILL_PATTERN\"; h=\$(hostname)"
  rcmd+="; if sudo -n pkill -f \"\$pat\"; then echo \"\$h: sent SIGTERM to training processes\"; sleep 5; sudo -n pkill -9 -f \"\$pat\" || true; fi"
  rcmd+="; $R_TPU_PIDS; if [ -n \"\$pids\" ]; then echo \"\$h: killing TPU holders: \$pids\"; sudo -n kill -9 \$pids || true; sleep 1; fi"
  rcmd+="; sudo -n rm -f /tmp/libtpu_lockfile"
  rcmd+="; $R_TPU_PIDS; if [ -n \"\$pids\" ]; then echo \"\$h: TPU still busy: \$pids\" >&2; exit 1; fi; echo \"\$h: TPU free\""
  remote "$OPT_WORKER" "$rcmd"
}

cmd_delete() {
  run_cmd "${GC[@]}" delete "$OPT_NAME" "${LOC[@]}" --quiet
}

"cmd_$SUBCMD"

#!/usr/bin/env bash
# Cloud TPU VMs and pod slices for specjax: create, list, delete, set up, copy code, run, logs.
# Every step is one `gcloud compute tpus tpu-vm` command; --dry-run prints them instead.
# launch/README.md has the walk-through (single VM, pod slice, sweeps, Colab).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu.sh [--dry-run] [--zone Z] [--project P] COMMAND [ARGS]

commands:
  create NAME --type TYPE [--version V] [--spot|--preemptible] [-- GCLOUD_FLAGS...]
                         create a TPU VM or pod slice (TYPE: v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ...;
                         V defaults to the runtime Google recommends for TYPE)
  list                   list TPU VMs in the zone
  delete NAME [--yes]    delete a TPU VM (--yes: no confirmation prompt)
  copy NAME              pack the working tree (git ls-files: tracked and untracked files, not
                         ignored ones; no .venv, .git, runs/, logs/) and unpack it into ~/specjax
                         on every worker
  setup NAME             on every worker: create ~/specjax/.venv if missing (Python >= 3.11) and
                         pip install -e '.[tpu]' when setup.py changed since the last setup
  run NAME --workdir DIR [--wait] [--skip-done] -- CONFIG [FLAGS...]
                         on every worker: SPECJAX_DISTRIBUTED=1 python -m specjax.main
                         --config CONFIG --workdir DIR FLAGS..., in the background (nohup), appending
                         to ~/specjax/logs/NAME/worker-<i>.log; DIR is relative to ~/specjax or gs://.
                         After exit 0 the run writes DIR/DONE. --wait: stay attached, exit with the
                         run's status (worker 0's output also on the terminal). --skip-done: do
                         nothing when DIR/DONE exists.
  stop NAME              kill the run started by `run` on every worker
  logs NAME [--worker I|all] [--lines N] [--no-follow]
                         tail worker I's log (default 0, following); `all`: last lines of each
  ssh NAME [--worker I|all] [-- COMMAND...]
                         ssh into worker I (default 0), or run COMMAND there

options (anywhere before `--`):
  --dry-run              print each command instead of running it (also SPECJAX_DRY_RUN=1)
  --zone Z               zone (default $SPECJAX_TPU_ZONE, else gcloud's compute/zone)
  --project P            project (default $SPECJAX_TPU_PROJECT, else gcloud's core/project)
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ZONE="${SPECJAX_TPU_ZONE:-}"
PROJECT="${SPECJAX_TPU_PROJECT:-}"
DRY_RUN=0
case "${SPECJAX_DRY_RUN:-0}" in ""|0|false|False) ;; *) DRY_RUN=1 ;; esac
REMOTE_DIR='~/specjax'  # on every worker; `~` expands there, not here

usage_error() {
  echo "tpu.sh: error: $*" >&2
  usage | sed -n 1p >&2
  echo "commands: create list delete copy setup run stop logs ssh (launch/tpu.sh --help for details)" >&2
  exit 2
}

# One shell word, quoted only when it needs to be, so printed commands can be pasted back.
q() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

qwords() {
  local out=() w
  for w in "$@"; do out+=("$(q "$w")"); done
  printf '%s' "${out[*]}"
}

# Runs a command, or prints it under --dry-run.
invoke() {
  if (( DRY_RUN )); then
    qwords "$@"
    echo
  else
    "$@"
  fi
}

gcloud_tpu() {
  local flags=()
  [[ -n $ZONE ]] && flags+=("--zone=$ZONE")
  [[ -n $PROJECT ]] && flags+=("--project=$PROJECT")
  invoke gcloud compute tpus tpu-vm "$@" ${flags[@]+"${flags[@]}"}
}

# Runs a bash script on workers. The remote login shell of TPU VM images is bash.
remote() {  # remote NAME WORKER SCRIPT
  gcloud_tpu ssh "$1" "--worker=$2" --command "$3"
}

# `--opt=value` -> `--opt value` (up to `--`), so each parser handles one form.
normalize() {
  NORM=()
  while [[ $# -gt 0 ]]; do
    if [[ $1 == -- ]]; then NORM+=("$@"); return; fi
    if [[ $1 == --*=* ]]; then NORM+=("${1%%=*}" "${1#*=}"); else NORM+=("$1"); fi
    shift
  done
}

need_value() {  # need_value "$@": the option in $1 must have a value in $2
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || usage_error "$1 needs a value"
}

# The options every command takes; sets USED to the number of words consumed (0: not ours).
common_opt() {
  USED=0
  case $1 in
    --zone) need_value "$@"; ZONE=$2; USED=2 ;;
    --project) need_value "$@"; PROJECT=$2; USED=2 ;;
    --dry-run) DRY_RUN=1; USED=1 ;;
    -h|--help) usage; exit 0 ;;
  esac
}

set_name() {  # set_name CMD WORD: the one positional NAME
  [[ $2 != -* ]] || usage_error "$1: unknown option '$2'"
  [[ -z $NAME ]] || usage_error "$1: unexpected argument '$2'"
  # Also a path component on the workers (logs/NAME), so keep to what gcloud allows.
  [[ $2 =~ ^[a-z0-9][-a-z0-9]*$ ]] || usage_error "$1: bad TPU name '$2' (lowercase letters, digits and hyphens)"
  NAME=$2
}

require_name() {
  [[ -n $NAME ]] || usage_error "$1: missing TPU name"
}

check_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+$ ]] || usage_error "--worker: expected a number or 'all', got '$1'"
}

# Runtime image per accelerator (cloud.google.com/tpu/docs/runtimes).
default_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

cmd_create() {
  local type="" version="" lifecycle="" extra=()
  NAME=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --type|--accelerator-type) need_value "$@"; type=$2; shift 2 ;;
      --version) need_value "$@"; version=$2; shift 2 ;;
      --spot|--preemptible)
        [[ -z $lifecycle || $lifecycle == "$1" ]] || usage_error "create: --spot and --preemptible exclude each other"
        lifecycle=$1; shift ;;
      --) shift; extra=("$@"); break ;;
      *) common_opt "$@"; if (( USED )); then shift "$USED"; else set_name create "$1"; shift; fi ;;
    esac
  done
  require_name create
  [[ -n $type ]] || usage_error "create: missing --type (e.g. v4-8, v5litepod-8, v4-32 for a pod slice)"
  local args=(create "$NAME" "--accelerator-type=$type" "--version=${version:-$(default_version "$type")}")
  [[ -n $lifecycle ]] && args+=("$lifecycle")
  gcloud_tpu "${args[@]}" ${extra[@]+"${extra[@]}"}
}

cmd_list() {
  NAME=""
  while [[ $# -gt 0 ]]; do
    common_opt "$@"
    (( USED )) || usage_error "list: unexpected argument '$1'"
    shift "$USED"
  done
  gcloud_tpu list
}

cmd_delete() {
  local yes=()
  NAME=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --yes|-y|--quiet) yes=(--quiet); shift ;;
      *) common_opt "$@"; if (( USED )); then shift "$USED"; else set_name delete "$1"; shift; fi ;;
    esac
  done
  require_name delete
  gcloud_tpu delete "$NAME" ${yes[@]+"${yes[@]}"}
}

# NUL-separated paths (relative to the repository) that `copy` ships: what git would commit
# plus untracked files it does not ignore (work in progress runs too). Without git (an
# uploaded copy), every file except the usual build and output folders.
list_files() {
  local f
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z --cached --others --exclude-standard
  else
    (cd "$REPO" && find . \( -name .git -o -name .venv -o -name __pycache__ -o -name '*.egg-info' \) -prune \
      -o -type f -print0 | sed -z 's|^\./||')
  fi | while IFS= read -r -d '' f; do
    case $f in .venv/*|.git/*|runs/*|logs/*) continue ;; esac
    [[ -f $REPO/$f ]] && printf '%s\0' "$f"  # skip tracked files deleted in the working tree
  done
}

cmd_copy() {
  NAME=""
  while [[ $# -gt 0 ]]; do
    common_opt "$@"
    if (( USED )); then shift "$USED"; else set_name copy "$1"; shift; fi
  done
  require_name copy
  local tarball="${TMPDIR:-/tmp}/specjax-$NAME-$$.tar.gz"
  local count
  count=$(list_files | tr -cd '\0' | wc -c)
  if (( DRY_RUN )); then
    echo "# pack $count files from $REPO (git ls-files) into $tarball"
  else
    trap 'rm -f "$tarball"' EXIT
    list_files | tar -czf "$tarball" -C "$REPO" --null -T -
    echo "packed $count files into $tarball ($(du -h "$tarball" | cut -f1))" >&2
  fi
  gcloud_tpu scp "$tarball" "$NAME:specjax.tar.gz" --worker=all
  # Unpacked over the old copy: .venv and logs/ stay; files deleted here stay there too.
  remote "$NAME" all "mkdir -p $REMOTE_DIR && tar -xzf ~/specjax.tar.gz -C $REMOTE_DIR && rm -f ~/specjax.tar.gz"
}

cmd_setup() {
  NAME=""
  while [[ $# -gt 0 ]]; do
    common_opt "$@"
    if (( USED )); then shift "$USED"; else set_name setup "$1"; shift; fi
  done
  require_name setup
  # Idempotent: a second setup with the same setup.py only checks the stamp.
  local script
  script=$(cat <<EOF
set -e
cd $REMOTE_DIR 2>/dev/null && test -f setup.py || { echo "\$(hostname): no ~/specjax/setup.py; run: launch/tpu.sh copy $(q "$NAME")" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  # jax needs Python >= 3.11; the TPU images (Ubuntu 22.04) ship 3.10, so fall back to a Python from uv.
  for py in python3.13 python3.12 python3.11 python3; do
    command -v \$py >/dev/null && \$py -c "import sys; sys.exit(sys.version_info < (3, 11))" && \$py -m venv .venv && break
    rm -rf .venv
  done
  if [ ! -x .venv/bin/python ]; then
    python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh
    ~/.local/bin/uv venv -q --seed --python 3.11 .venv
  fi
fi
stamp=.venv/.specjax-setup
want="\$(sha256sum setup.py | cut -d" " -f1) [tpu]"
if [ "\$(cat \$stamp 2>/dev/null)" = "\$want" ]; then
  echo "\$(hostname): up to date"
else
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[tpu]"
  echo "\$want" > \$stamp
  echo "\$(hostname): installed specjax[tpu]"
fi
EOF
)
  remote "$NAME" all "$script"
}

cmd_run() {
  local workdir="" wait=0 skip_done=0 job=()
  NAME=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --workdir) need_value "$@"; workdir=$2; shift 2 ;;
      --wait) wait=1; shift ;;
      --skip-done) skip_done=1; shift ;;
      --) shift; job=("$@"); break ;;
      *) common_opt "$@"; if (( USED )); then shift "$USED"; else set_name run "$1"; shift; fi ;;
    esac
  done
  require_name run
  [[ -n $workdir ]] || usage_error "run: missing --workdir DIR (relative to ~/specjax on the workers, or gs://...)"
  [[ ${#job[@]} -gt 0 && -n ${job[0]} ]] || usage_error "run: missing '-- CONFIG [FLAGS...]' (e.g. -- configs/generate.py:method=sps)"
  [[ ${job[0]} != -* ]] || usage_error "run: the first word after '--' must be the config file, got '${job[0]}'"

  local logdir="logs/$NAME" main
  main="SPECJAX_DISTRIBUTED=1 .venv/bin/python -m specjax.main --config $(q "${job[0]}") --workdir \"\$workdir\""
  (( ${#job[@]} > 1 )) && main+=" $(qwords "${job[@]:1}")"
  local script
  script=$(cat <<EOF
set -eo pipefail
cd $REMOTE_DIR
# The index of this worker in the slice (0 on a single VM).
i=\$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)
export i workdir=$(q "$workdir") cmdline=$(q "${job[*]}")
mkdir -p $(q "$logdir")
log=$(q "$logdir")/worker-\$i.log
done_exists() { case \$workdir in gs://*) gcloud storage ls "\$workdir/DONE" >/dev/null 2>&1 ;; *) test -e "\$workdir/DONE" ;; esac; }
# DONE lets a re-run sweep skip finished runs. A local workdir is per worker, so each marks its own.
mark_done() {
  case \$workdir in
    gs://*) if [ "\$i" = 0 ]; then echo -n | gcloud storage cp -q - "\$workdir/DONE"; fi ;;
    *) mkdir -p "\$workdir" && touch "\$workdir/DONE" ;;
  esac
}
job() {
  echo "=== \$(date -u +%FT%TZ) worker \$i: start \$cmdline, workdir \$workdir"
  $main || { rc=\$?; echo "=== worker \$i: exit \$rc"; return \$rc; }
  mark_done
  echo "=== worker \$i: done"
}
export -f job mark_done
EOF
)
  if (( skip_done )); then
    script+=$'\n'"if done_exists; then echo \"worker \$i: \$workdir/DONE exists, skipping\"; exit 0; fi"
  fi
  if (( wait )); then
    script+=$'\n'"if [ \"\$i\" = 0 ]; then job 2>&1 | tee -a \"\$log\"; else job >> \"\$log\" 2>&1; fi"
  else
    # setsid + nohup: the run outlives the ssh session; its process group id goes in the pid file for `stop`.
    script+=$'\n'"setsid nohup bash -c job >> \"\$log\" 2>&1 < /dev/null &"
    script+=$'\n'"echo \$! > $(q "$logdir")/worker-\$i.pid"
    script+=$'\n'"echo \"worker \$i: started pid \$!, log ~/specjax/\$log\""
  fi
  remote "$NAME" all "$script"
}

cmd_stop() {
  NAME=""
  while [[ $# -gt 0 ]]; do
    common_opt "$@"
    if (( USED )); then shift "$USED"; else set_name stop "$1"; shift; fi
  done
  require_name stop
  local pids
  pids="$REMOTE_DIR/$(q "logs/$NAME")/worker-*.pid"
  remote "$NAME" all "for f in $pids; do [ -f \"\$f\" ] || continue; kill -- -\$(cat \"\$f\") 2>/dev/null && echo \"\$(hostname): stopped \$(cat \"\$f\")\"; rm -f \"\$f\"; done"
}

cmd_logs() {
  local worker=0 lines=100 follow=1
  NAME=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --worker) need_value "$@"; check_worker "$2"; worker=$2; shift 2 ;;
      --lines|-n) need_value "$@"; [[ $2 =~ ^[0-9]+$ ]] || usage_error "--lines: expected a number, got '$2'"
                  lines=$2; shift 2 ;;
      --no-follow) follow=0; shift ;;
      *) common_opt "$@"; if (( USED )); then shift "$USED"; else set_name logs "$1"; shift; fi ;;
    esac
  done
  require_name logs
  local dir="$REMOTE_DIR/$(q "logs/$NAME")"
  if [[ $worker == all ]]; then
    remote "$NAME" all "tail -n $lines $dir/worker-*.log"
  elif (( follow )); then
    remote "$NAME" "$worker" "tail -n $lines -F $dir/worker-$worker.log"
  else
    remote "$NAME" "$worker" "tail -n $lines $dir/worker-$worker.log"
  fi
}

cmd_ssh() {
  local worker=0 command=()
  NAME=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --worker) need_value "$@"; check_worker "$2"; worker=$2; shift 2 ;;
      --) shift; command=("$@"); break ;;
      *) common_opt "$@"; if (( USED )); then shift "$USED"; else set_name ssh "$1"; shift; fi ;;
    esac
  done
  require_name ssh
  if (( ${#command[@]} )); then
    remote "$NAME" "$worker" "${command[*]}"
  else
    gcloud_tpu ssh "$NAME" "--worker=$worker"
  fi
}

main() {
  normalize "$@"
  set -- ${NORM[@]+"${NORM[@]}"}
  while [[ $# -gt 0 ]]; do
    common_opt "$@"
    (( USED )) || break
    shift "$USED"
  done
  [[ $# -gt 0 ]] || usage_error "missing command"
  local command=$1
  shift
  case $command in
    create|list|delete|copy|setup|run|stop|logs|ssh) "cmd_$command" "$@" ;;
    -*) usage_error "unknown option '$command'" ;;
    *) usage_error "unknown command '$command'" ;;
  esac
}

main "$@"

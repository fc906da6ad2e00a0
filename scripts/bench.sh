#!/usr/bin/env bash
# The benchmark: a host made from the same image and roles as the demo
# (inventories/bench, container chat-bench), the server side confined to one
# CPU with docker's cpuset, the load generator (bench/loadgen.py) pinned to
# the others with taskset, and traffic only to that container: https on its
# port 443 with the name localhost, as a browser of the site would.
#   scripts/bench.sh [run] [NAME]    deploy, measure, write bench/results/NAME/
#                                    (results.md, plot.png, commands, and the
#                                    raw samples in samples.json.xz)
#   scripts/bench.sh measure NAME [SCENARIO...]
#                                    measure the host deployed by run again,
#                                    only the named scenarios (e.g. fanout-100),
#                                    into bench/results/NAME/
#   scripts/bench.sh layouts [NAME]  the layout matrix: deploy once, then for
#                                    each chat_layout (split, daphne, uvicorn)
#                                    move the same host to it and measure
#                                    pages, /healthz, fan-out, the burst, idle
#                                    sockets and the servers' memory, into
#                                    bench/results/NAME/<layout>/, with tables
#                                    and plots of every measure per layout
#                                    (ratios to split) in NAME/results.md
#   scripts/bench.sh metrics [NAME [REV]]
#                                    what the app's own metrics cost: the
#                                    fan-out measured on one host with the app
#                                    as it is and with the app of REV (by
#                                    default the last one before
#                                    app/chat/metrics.py), in turn, twice each,
#                                    into NAME/with-N/ and NAME/without-N/, and
#                                    the ratios with/without in NAME/results.md
#   scripts/bench.sh ops [NAME]      the day-two runs timed (README, "Speed"):
#                                    a demo host (inventories/local, in a
#                                    container of its own) converged fresh,
#                                    rerun with nothing to change, and run with
#                                    --check --diff; then the cluster scenario's
#                                    eight hosts, converged, rerun over SSH and
#                                    run with --check --diff; the times against
#                                    issue 25's targets, the tasks and the
#                                    slowest roles in NAME/results.md
#                                    (CHAT_OPS_CLUSTER=0: the demo alone)
#   scripts/bench.sh soak NAME [DURATION [LAYOUT]]
#                                    stability over time (issue 26): a fresh
#                                    host in LAYOUT (split by default), then
#                                    DURATION seconds (3600 by default; 300 for
#                                    a smoke run) of bench/soak.py's mix: rooms
#                                    of 2, 20 and 200 posting, sockets joining
#                                    and leaving (closed, reset, silent, slow),
#                                    pages and /healthz, and a deploy of a
#                                    changed release half-way; memory and
#                                    descriptors per unit sampled every 30 s;
#                                    slopes, verdicts and plots in
#                                    bench/results/NAME/ (results.md, soak.png)
#   scripts/bench.sh profile NAME [BEFORE]
#                                    where the first Daphne instance (or
#                                    uvicorn worker) of the host deployed by
#                                    run spends its time in the room of 100
#                                    (issue 26): fanout-100 measured as by
#                                    measure, with py-spy sampling that
#                                    process's Python for 12 s of the send,
#                                    and each CPU's busy share meanwhile;
#                                    NAME/profile.md (tables, with BEFORE's
#                                    NAME/daphne.pyspy beside when given) and
#                                    the raw samples in NAME/daphne.pyspy
#   scripts/bench.sh compare A B     ratios B/A between two result folders
#   scripts/bench.sh down            remove the benchmark host
# Environment: CHAT_BENCH_QUICK=1 shortens every scenario (a smoke run);
# CHAT_BENCH_QUIET_LOAD=L waits (at most CHAT_BENCH_QUIET_WAIT s, 600 by
# default) before each fan-out scenario until the machine's 1-minute load
# average is below L, as latency follows other people's work on the machine;
# CHAT_BENCH_PROFILE=NAME deploys with bench/profiles/NAME.yml as extra vars
# and then runs bench/profiles/NAME.sh on the host if there is one (sizing to
# try before it goes into the roles);
# CHAT_BENCH_SERVER_CPUS / CHAT_BENCH_CLIENT_CPUS choose the CPU sets;
# CHAT_BENCH_NAME, CHAT_BENCH_PORT and CHAT_BENCH_TLS_PORT the container and
# the ports it publishes on 127.0.0.1 (http, which only redirects, and https),
# so that two checkouts can benchmark side by side.
# lint follows lib.sh (shellcheck -x); a plain `shellcheck scripts/bench.sh`
# passes too, without it.
# shellcheck source=scripts/lib.sh disable=SC1091
source "$(dirname "$0")/lib.sh"

BENCH_HOST="${CHAT_BENCH_NAME:-chat-bench}"
BENCH_PORT="${CHAT_BENCH_PORT:-8090}"
BENCH_TLS_PORT="${CHAT_BENCH_TLS_PORT:-8490}"
BENCH_VENV="$REPO_ROOT/bench/.venv"
SERVER_CPUS="${CHAT_BENCH_SERVER_CPUS:-0}"
CLIENT_CPUS="${CHAT_BENCH_CLIENT_CPUS:-1-$(($(nproc) - 1))}"
# The inventory reads the container's name and the https port (the origin).
export CHAT_BENCH_NAME="$BENCH_HOST" CHAT_BENCH_PORT="$BENCH_PORT" CHAT_BENCH_TLS_PORT="$BENCH_TLS_PORT"
# The site's self-signed certificate, fetched from the host: the load
# generator trusts it alone.
SITE_CERT="$REPO_ROOT/.cache/bench-$BENCH_HOST.crt"

ensure_bench_venv() {
  if [ ! -x "$BENCH_VENV/bin/python" ] \
    || ! cmp -s "$REPO_ROOT/bench/requirements.txt" "$BENCH_VENV/requirements.txt"; then
    log "bench virtualenv: $BENCH_VENV"
    python3 -m venv "$BENCH_VENV"
    "$BENCH_VENV/bin/pip" install -q -r "$REPO_ROOT/bench/requirements.txt"
    cp "$REPO_ROOT/bench/requirements.txt" "$BENCH_VENV/requirements.txt"
  fi
  # wrk measures the Nginx ceiling, which a Python client cannot reach.
  if ! command -v wrk >/dev/null; then
    log "installing wrk"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  fi
}

in_host() { docker exec "$BENCH_HOST" "$@"; }

# A location that only answers 200, on ports of its own: the proxy's ceiling
# on this machine, in clear and with the site's TLS settings and certificate
# (the default server of its port, so wrk, which sends an address as its TLS
# name, is not refused). Only the benchmark host gets it; the roles know
# nothing of it.
add_ceiling_server() {
  docker exec -i "$BENCH_HOST" sh -c 'cat > /etc/nginx/conf.d/chat-bench-ceiling.conf' <<'EOF'
# Added by scripts/bench.sh on the benchmark host only.
server {
	listen 8081 reuseport;
	listen 8444 ssl reuseport;
	ssl_certificate /etc/chat/tls/chat.crt;
	ssl_certificate_key /etc/chat/tls/chat.key;
	access_log off;
	location / { return 200 "ok\n"; }
}
EOF
  in_host nginx -t -q
  in_host systemctl reload nginx
  # The firewall role opens 80 and 443 only; the next site.yml run on this
  # host (a layout move) puts its ruleset back without this rule.
  in_host nft insert rule inet chat_firewall input tcp dport '{ 8081, 8444 }' accept comment '"bench ceiling"'
}

# Everything the results need to be reproduced and compared. The single
# quotes are meant: those expansions happen inside the host.
# shellcheck disable=SC2016
describe_host() {
  local out="$1"
  {
    echo "commit: $(git -C "$REPO_ROOT" rev-parse --short HEAD)$(git -C "$REPO_ROOT" diff --quiet || echo ' (modified)')"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo), $(uname -r)"
    echo "profile: ${CHAT_BENCH_PROFILE:-none (the inventory as it is)}"
    echo "server cpuset: $SERVER_CPUS (docker update --cpuset-cpus); load generator: taskset -c $CLIENT_CPUS"
    echo "host image: $(in_host sh -c '. /etc/os-release; echo "$PRETTY_NAME"')"
    echo "nginx: $(in_host nginx -v 2>&1 | sed 's/.*: //')"
    echo "redis: $(in_host redis-server --version | awk '{print $3}')"
    echo "python: $(in_host python3 --version)"
    echo "app packages: $(in_host sh -c 'ls -d /srv/chat/venvs/*/lib/python3*/site-packages/*.dist-info' \
      | sed 's#.*/##; s/\.dist-info//' \
      | grep -iE '^(django|channels|channels_redis|daphne|gunicorn|redis|twisted|autobahn)-' | tr '\n' ' ')"
    echo "channel layer: $(in_host sh -c 'grep -h ^CHANNEL_LAYER= /srv/chat/shared/chat.env' || echo default)"
    echo "layout: $(in_host cat /srv/chat/layout 2>/dev/null || echo unknown) (chat_layout)"
    echo "gunicorn worker class: $(in_host sh -c 'grep -h ^worker_class /etc/chat-gunicorn/gunicorn.conf.py 2>/dev/null' || echo 'none (no Gunicorn)')"
    echo "daphne instances: $(in_host sh -c 'systemctl list-units --plain --no-legend "chat-daphne@*.service" | wc -l')"
    echo "gunicorn processes (master + workers): $(in_host sh -c 'pgrep -c gunicorn' || true)"
    echo "nginx workers: $(in_host pgrep -c -f '^nginx: worker' || true)"
    echo "listen backlog that applies (ss -lx, Send-Q):"
    in_host ss -lxn | awk 'NR == 1 || /chat/ {print "    " $0}'
    echo "nginx sizing: $(in_host sh -c 'nginx -T 2>/dev/null' \
      | awk '/^[[:space:]]*(worker_processes|worker_connections|worker_rlimit_nofile)[[:space:]]/ {printf "%s ", $0}' \
      | tr -s ' \t' ' ')"
    echo "descriptor limits: loadgen $(ulimit -Hn) per process; app server $(in_host sh -c \
      'for unit in chat-daphne@1.service chat-gunicorn.service; do pid=$(systemctl show -p MainPID --value $unit); [ "$pid" -gt 0 ] && grep "open files" /proc/$pid/limits && break; done' | awk '{print $4}'); nginx worker $(in_host sh -c \
      'grep "open files" /proc/$(pgrep -f "nginx: worker" | head -1)/limits' | awk '{print $4}')"
    echo "uptime at the start: $(uptime)"
  } >"$out"
}

# The machine's load average, as uptime prints it: the share of the
# machine other people's work takes while a scenario runs.
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# Latency follows the machine's load: with CHAT_BENCH_QUIET_LOAD set, wait
# (bounded) for a quieter minute before a latency scenario.
wait_for_quiet() {
  local limit="${CHAT_BENCH_QUIET_LOAD:-}" waited=0 max="${CHAT_BENCH_QUIET_WAIT:-600}"
  [ -n "$limit" ] || return 0
  while awk -v limit="$limit" '{exit !($1 >= limit)}' /proc/loadavg && [ "$waited" -lt "$max" ]; do
    [ $((waited % 60)) -eq 0 ] && log "load average $(loadavg): waiting for the 1-minute one to fall below $limit"
    sleep 10
    waited=$((waited + 10))
  done
}

# The raw samples of a results folder: one xz-compressed JSON object,
# RESULTS/samples.json.xz, that maps each scenario's file name (fanout-100.json,
# memory.json, ...) to its JSON (bench/samples.py; report.py reads it).
samples() { "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/samples.py" "$@"; }

# One scenario: the exact command, the load average around it, its JSON,
# stored as NAME.json in the folder's samples.json.xz.
scenario() {
  local name="$1"; shift
  local cmd=(taskset -c "$CLIENT_CPUS" "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/loadgen.py" "$@")
  log "scenario $name"
  # %q: the line can be pasted back into a shell as it is.
  { printf '%s\t' "$name"; printf '%q ' "${cmd[@]}"; printf '\n'; } >>"$RESULTS/commands.txt"
  local before
  before="$(loadavg)"
  if ! timeout 900 "${cmd[@]}" >"$RESULTS/$name.json.tmp"; then
    log "scenario $name failed"
    rm -f "$RESULTS/$name.json.tmp"
    return 0
  fi
  samples add "$RESULTS" "$name.json" "$RESULTS/$name.json.tmp" \
    --set "loadavg_before=$before" --set "loadavg_after=$(loadavg)"
  rm -f "$RESULTS/$name.json.tmp"
}

wrk_scenario() {
  local name="$1" url="$2" cmd
  cmd=(taskset -c "$CLIENT_CPUS" wrk -t 1 -c 64 -d "${HTTP_SECONDS}s" --latency -H "Host: localhost" "$url")
  log "scenario $name (wrk)"
  { printf '%s\t' "$name"; printf '%q ' "${cmd[@]}"; printf '\n'; } >>"$RESULTS/commands.txt"
  local before
  before="$(loadavg)"
  "${cmd[@]}" >"$RESULTS/$name.wrk.txt" 2>&1 || log "wrk $name failed"
  printf 'load average: %s -> %s\n' "$before" "$(loadavg)" >>"$RESULTS/$name.wrk.txt"
}

# A fresh host every run: nothing a previous run (or profile) left behind
# is measured.
deploy() {
  "$VENV/bin/python" "$REPO_ROOT/scripts/host.py" down "$BENCH_HOST"
  rm -f "$REPO_ROOT/.cache/facts/"*"_chat-bench"
  CHAT_HOST_SUITE=bookworm "$VENV/bin/python" "$REPO_ROOT/scripts/host.py" up "$BENCH_HOST" "$BENCH_PORT" "$BENCH_TLS_PORT"
  site_run deploy "the deploy"
  add_ceiling_server
  if [ -n "${CHAT_BENCH_PROFILE:-}" ] && [ -f "$REPO_ROOT/bench/profiles/$CHAT_BENCH_PROFILE.sh" ]; then
    log "applying bench/profiles/$CHAT_BENCH_PROFILE.sh on the host"
    printf 'profile\tdocker exec -i %s sh < bench/profiles/%s.sh\n' "$BENCH_HOST" "$CHAT_BENCH_PROFILE" >>"$RESULTS/commands.txt"
    docker exec -i "$BENCH_HOST" sh <"$REPO_ROOT/bench/profiles/$CHAT_BENCH_PROFILE.sh" >>"$RESULTS/deploy.log"
  fi
}

# site.yml on the benchmark host, the way an operator runs it, with every
# CPU (the server side gets its own set only while it is measured) and the
# profile's settings on top. key names the command in commands.txt.
site_run() {
  local key="$1" what="$2"; shift 2
  docker update --cpuset-cpus "0-$(($(nproc) - 1))" "$BENCH_HOST" >/dev/null
  # The container by name as an extra var: Mitogen's docker connection takes
  # the inventory's templated ansible_host literally.
  local cmd=(ansible-playbook site.yml -i inventories/bench -e "ansible_host=$BENCH_HOST" "$@")
  if [ -n "${CHAT_BENCH_PROFILE:-}" ]; then
    cmd+=(-e "@bench/profiles/$CHAT_BENCH_PROFILE.yml")
  fi
  log "$what: ${cmd[*]}"
  printf '%s\t%s\n' "$key" "${cmd[*]}" >>"$RESULTS/commands.txt"
  (cd "$REPO_ROOT" && "${cmd[@]}") >>"$RESULTS/deploy.log" \
    || { tail -40 "$RESULTS/deploy.log" >&2; die "$what failed: $RESULTS/deploy.log"; }
}

# Moves the deployed host to another layout with the same site.yml.
move_to_layout() {
  site_run layout "the move to the $1 layout" -e "chat_layout=$1"
}

# Fresh server processes for each layout: a move keeps the Daphne instances
# that served the layout before (from split to daphne), and Python keeps the
# memory the previous layout's sockets took. Then the site must answer again.
# The single quotes are meant: those expansions happen inside the host.
# shellcheck disable=SC2016
restart_app_servers() {
  in_host sh -c 'systemctl restart $(systemctl list-units --plain --no-legend --type=service \
    "chat-daphne@*.service" chat-gunicorn.service | cut -d" " -f1)'
  in_host sh -c 'for i in $(seq 60); do curl -skf https://localhost/healthz -o /dev/null && exit 0; sleep 1; done; exit 1' \
    || die "the site did not answer after its servers restarted"
}

# The resident memory of the app's server units at rest (no client), and
# of Nginx's, in KiB: what a layout costs before any traffic.
memory_at_rest() {
  local app nginx
  app="$(docker exec -i "$BENCH_HOST" sh -s -- 'chat-daphne@*.service' chat-gunicorn.service \
    <"$REPO_ROOT/bench/server-rss.sh" | awk '{n++; s += $1} END {print s + 0, n + 0}')"
  nginx="$(docker exec -i "$BENCH_HOST" sh -s -- nginx.service <"$REPO_ROOT/bench/server-rss.sh" | awk '{s += $1} END {print s + 0}')"
  printf '{"scenario": "memory", "app_servers_rss_kib": %s, "app_server_processes": %s, "nginx_rss_kib": %s}\n' \
    "${app% *}" "${app#* }" "$nginx" | samples add "$RESULTS" memory.json
}

# Before a measure: the server side on its CPU set, the site's certificate
# fetched for the clients, the host described in host.txt. Sets BENCH_IP
# (the container's address the load goes to) and SITE_ARGS (https to its
# 443 with the site's name and origin, the certificate pinned).
confine_and_aim() {
  docker update --cpuset-cpus "$SERVER_CPUS" "$BENCH_HOST" >/dev/null
  in_host cat /etc/chat/tls/chat.crt >"$SITE_CERT"
  BENCH_IP="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$BENCH_HOST")"
  SITE_ARGS=(--connect "$BENCH_IP:443" --server-name localhost --cafile "$SITE_CERT"
    --origin "https://localhost:$BENCH_TLS_PORT")
  describe_host "$RESULTS/host.txt"
}

# Runs the scenarios named in "$@" (all of them when none is) against the
# deployed host, the server side on its CPU set.
measure() {
  local only=" $* "
  wanted() { [ "$only" = "  " ] || [[ "$only" == *" $1 "* ]]; }
  confine_and_aim

  local ip="$BENCH_IP" pid gunicorn
  pid="$(docker inspect -f '{{.State.Pid}}' "$BENCH_HOST")"
  # The host's root can reach the container's unix sockets through /proc.
  gunicorn="/proc/$pid/root/run/chat/gunicorn.sock"

  local quick="${CHAT_BENCH_QUICK:-0}" send=20 drain=20 hold=30 idle=20000 burst=10000
  HTTP_SECONDS=10
  if [ "$quick" = 1 ]; then send=5 drain=5 hold=5 idle=2000 burst=1000 HTTP_SECONDS=3; fi
  # Gunicorn's own socket: what Nginx sends it, so Django sees https.
  local direct=(--connect "$ip:443" --server-name localhost --plain)
  local forwarded=(--unix "$gunicorn" --header "X-Forwarded-Proto: https")
  # The container's CPU time in ns (its cgroup, systemd's slices inside
  # included): cgroup v1's cpuacct, or v2's cpu.stat.
  local cpu group
  group="$(awk -F: '$2 == "cpuacct" || $2 == "cpu,cpuacct" {print $3; exit}' "/proc/$pid/cgroup")"
  if [ -n "$group" ]; then
    cpu="cat /sys/fs/cgroup/cpuacct$group/cpuacct.usage"
  else
    group="$(awk -F: '$1 == "0" {print $3; exit}' "/proc/$pid/cgroup")"
    cpu="awk '/^usage_usec/ {print \$2 * 1000}' /sys/fs/cgroup$group/cpu.stat"
  fi

  # A room must have been posted to before its page exists in the lobby.
  local page
  for page in healthz:/healthz lobby:/ room:/chat/bench/; do
    local key="${page%%:*}" path="${page#*:}"
    wanted "http-nginx-$key" && scenario "http-nginx-$key" "${SITE_ARGS[@]}" --procs 2 http \
      --label "Nginx $key $path (https)" --path "$path" --duration "$HTTP_SECONDS"
  done
  for page in healthz:/healthz lobby:/ room:/chat/bench/; do
    local key="${page%%:*}" path="${page#*:}"
    wanted "http-gunicorn-$key" && scenario "http-gunicorn-$key" "${direct[@]}" --procs 2 http \
      --label "Gunicorn direct $key $path" --path "$path" "${forwarded[@]}" --duration "$HTTP_SECONDS"
  done
  wanted http-nginx-return200 && scenario http-nginx-return200 --connect "$ip:8081" --plain --procs 2 http \
    --label "Nginx return 200 (http)" --path / --duration "$HTTP_SECONDS"
  wanted http-nginx-return200-tls && scenario http-nginx-return200-tls --connect "$ip:8444" --server-name localhost \
    --cafile "$SITE_CERT" --procs 2 http --label "Nginx return 200 (https)" --path / --duration "$HTTP_SECONDS"
  wanted wrk-nginx-return200 && wrk_scenario wrk-nginx-return200 "http://$ip:8081/"
  wanted wrk-nginx-return200-tls && wrk_scenario wrk-nginx-return200-tls "https://$ip:8444/"

  if wanted fanout-100; then
    wait_for_quiet
    scenario fanout-100 "${SITE_ARGS[@]}" --procs 2 fanout --cpu-cmd "$cpu" --members 100 --senders 25 --rate 8 --duration "$send" --drain "$drain"
  fi
  if wanted fanout-1000; then
    wait_for_quiet
    scenario fanout-1000 "${SITE_ARGS[@]}" --procs 4 fanout --cpu-cmd "$cpu" --members 1000 --senders 1 --rate 5 --duration "$send" --drain "$drain"
  fi
  # Every handshake at once: they queue in Nginx, in Daphne (which waits
  # daphne_websocket_connect_timeout, 120 s, for the app) and in the client's
  # own TLS work (one core, Python), so each may wait longer than 30 s.
  wanted burst && scenario burst "${SITE_ARGS[@]}" --procs 4 --open-timeout 180 burst --count "$burst" --hold 5
  # Memory per connection: the resident memory of the app's server units
  # (Daphne's, or Gunicorn's uvicorn workers) and of Nginx (their cgroups'
  # processes) with every socket held, minus before.
  wanted idle && scenario idle "${SITE_ARGS[@]}" --procs 4 --open-timeout 60 idle --count "$idle" --hold "$hold" \
    --rss-cmd "docker exec -i $BENCH_HOST sh < $REPO_ROOT/bench/server-rss.sh"
  in_host ss -s >"$RESULTS/ss-after.txt" 2>&1 || true

  # A folder from before samples.json.xz, measured into again: its loose
  # JSON goes into the archive too.
  samples pack "$RESULTS" >/dev/null
  "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/report.py" table "$RESULTS" >/dev/null
  log "results: $RESULTS/results.md"
}

# Each CPU's busy share over $1 seconds, from /proc/stat: whether the
# server's CPU was saturated while it was profiled.
cpu_busy() {
  local before after
  before="$(grep -E '^cpu[0-9]' /proc/stat)"
  sleep "$1"
  after="$(grep -E '^cpu[0-9]' /proc/stat)"
  paste <(echo "$before") <(echo "$after") | awk '{
    total = 0; for (i = 2; i <= 9; i++) total -= $i; for (i = 13; i <= 20; i++) total += $i
    idle = ($16 + $17) - ($5 + $6)
    printf "%s busy %.0f %%\n", $1, 100 * (total - idle) / total }'
}

# fanout-100 as measure runs it, with py-spy on the first app server process
# during the send (after 8 s of it, for 12 s), into $RESULTS.
profile_fanout() {
  local before="$1" pid
  pid="$(docker top "$BENCH_HOST" -eo pid,args | awk '/serve_daphne/ {print $1; exit}')"
  # The uvicorn layout: the newest Gunicorn process is a worker.
  [ -n "$pid" ] || pid="$(docker top "$BENCH_HOST" -eo pid,args | awk '/gunicorn/ {p = $1} END {print p}')"
  [ -n "$pid" ] || die "no Daphne or Gunicorn process on $BENCH_HOST"
  measure fanout-100 &
  local measuring=$!
  sleep 8
  cpu_busy 12 >"$RESULTS/cpu-busy.txt" &
  local busy=$!
  "$BENCH_VENV/bin/py-spy" record --pid "$pid" --duration 12 --rate 200 --gil --nonblocking \
    --format raw --output "$RESULTS/daphne.pyspy" >"$RESULTS/py-spy.log" 2>&1 \
    || { cat "$RESULTS/py-spy.log" >&2; die "py-spy could not sample process $pid"; }
  wait "$busy"
  wait "$measuring" || die "the fan-out measure failed"
  {
    printf '# Where the time goes: fanout-100, process %s\n\n' "$(docker top "$BENCH_HOST" -eo pid,args | awk -v p="$pid" '$1 == p {$1 = ""; print}')"
    printf 'Each CPU during the samples (the server side on %s):\n\n%s\n\n' "$SERVER_CPUS" \
      "$(sed 's/^/    /' "$RESULTS/cpu-busy.txt")"
    "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/profile.py" "$RESULTS/daphne.pyspy" ${before:+"$before/daphne.pyspy"}
  } >"$RESULTS/profile.md"
  log "profile: $RESULTS/profile.md"
}

# The soak (bench/soak.py) against a fresh host in layout $2 for $1 seconds,
# the server side on its CPU set, a deploy of a changed release half-way.
soak() {
  local duration="$1" layout="$2" release
  if ! [[ "$duration" =~ ^[0-9]+$ ]] || [ "$duration" -lt 300 ] || [ "$duration" -gt 14400 ]; then
    die "DURATION: seconds, 300 to 14400 (four hours)"
  fi
  case "$layout" in split|daphne|uvicorn) ;; *) die "LAYOUT: split, daphne or uvicorn" ;; esac
  deploy
  [ "$layout" = split ] || move_to_layout "$layout"
  restart_app_servers
  confine_and_aim
  # The release deployed half-way: app/ with one file more, so a new
  # release id; the same lock file.
  release="$(mktemp -d)"
  cp -a "$REPO_ROOT/app" "$release/app"
  rm -rf "$release/app/.venv"* "$release/app/staticfiles"
  echo "soak $(date -u +%s)" >"$release/app/SOAK_MARK"
  local deploy_cmd
  deploy_cmd="cd $(printf '%q' "$REPO_ROOT") && ansible-playbook playbooks/deploy.yml -i inventories/bench"
  deploy_cmd+=" -e ansible_host=$BENCH_HOST -e chat_app_source_dir=$release/app -e chat_layout=$layout"
  local cmd=(taskset -c "$CLIENT_CPUS" "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/soak.py" run "${SITE_ARGS[@]}"
    --duration "$duration" --deploy-at "$((duration / 2))" --deploy-cmd "$deploy_cmd"
    --deploy-log "$RESULTS/deploy-mid.log"
    --sample-cmd "docker exec -i $BENCH_HOST sh < $REPO_ROOT/bench/soak-sample.sh")
  { printf 'soak\t'; printf '%q ' "${cmd[@]}"; printf '\n'; } >>"$RESULTS/commands.txt"
  log "soak: $((duration / 60)) minutes in the $layout layout (samples on stderr every 30 s)"
  if ! timeout "$((duration + 900))" "${cmd[@]}" >"$RESULTS/soak.json.tmp"; then
    rm -rf "$release"
    die "the soak failed; its deploy's log: $RESULTS/deploy-mid.log"
  fi
  rm -rf "$release"
  mv "$RESULTS/soak.json.tmp" "$RESULTS/soak.json"
  xz -9 -k -f "$RESULTS/soak.json" && rm -f "$RESULTS/soak.json"
  "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/soak.py" report "$RESULTS" >/dev/null
  log "soak: $RESULTS/results.md"
}

# One timed day-two run: KEY names its log (ops-KEY.log) and its row, WHAT
# says it, the rest is the command, run from the repository.
ops_run() {
  local key="$1" what="$2" started; shift 2
  log "$what: $*"
  printf '%s\t%s\n' "$key" "$*" >>"$RESULTS/commands.txt"
  started="$(date +%s.%N)"
  (cd "$REPO_ROOT" && "$@") >"$RESULTS/ops-$key.log" 2>&1 \
    || { tail -40 "$RESULTS/ops-$key.log" >&2; die "$what failed: $RESULTS/ops-$key.log"; }
  printf '%s\t%s\t%s\n' "$key" "$what" "$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')" \
    >>"$RESULTS/ops-times.tsv"
}

# The demo's inventory on a container of its own (the demo, if there is
# one, is left alone): its own ports, secrets and fact cache, so that the
# first run is a fresh converge.
ops_demo() {
  local host="${CHAT_OPS_NAME:-chat-ops}"
  export CHAT_PUBLISHED_PORT="${CHAT_OPS_PORT:-8095}" CHAT_PUBLISHED_TLS_PORT="${CHAT_OPS_TLS_PORT:-8495}"
  export CHAT_SECRETS_DIR="$REPO_ROOT/.secrets/ops" ANSIBLE_CACHE_PLUGIN_CONNECTION="$REPO_ROOT/.cache/facts-ops"
  rm -rf "$ANSIBLE_CACHE_PLUGIN_CONNECTION"
  ensure_host_image bookworm
  "$VENV/bin/python" "$REPO_ROOT/scripts/host.py" down "$host"
  "$VENV/bin/python" "$REPO_ROOT/scripts/host.py" up "$host" "$CHAT_PUBLISHED_PORT" "$CHAT_PUBLISHED_TLS_PORT"
  # The container by name as an extra var, as site_run does.
  local cmd=(ansible-playbook site.yml -i inventories/local -e "ansible_host=$host")
  ops_run demo-fresh "demo: fresh converge (image built)" "${cmd[@]}"
  ops_run demo-rerun "demo: rerun, nothing to change" "${cmd[@]}"
  ops_run demo-check "demo: --check --diff" "${cmd[@]}" --check --diff
  "$VENV/bin/python" "$REPO_ROOT/scripts/host.py" down "$host"
}

# The cluster scenario's hosts (Molecule creates and converges them, under
# names and ports of their own), then site.yml over SSH as an operator runs it.
ops_cluster() {
  export CHAT_HOST_SUITE=bookworm MOLECULE_EPHEMERAL_DIRECTORY=/tmp/chat-molecule/cluster-ops \
    CHAT_CLUSTER_NAME="${CHAT_OPS_CLUSTER_NAME:-chat-ops-cluster}" \
    CHAT_CLUSTER_HTTP_PORT="${CHAT_OPS_CLUSTER_PORT:-8096}" CHAT_CLUSTER_TLS_PORT="${CHAT_OPS_CLUSTER_TLS_PORT:-8496}"
  log "the cluster's hosts: molecule create and converge (output in $RESULTS/ops-cluster-setup.log)"
  (cd "$REPO_ROOT" && molecule destroy -s cluster && molecule create -s cluster && molecule converge -s cluster) \
    >"$RESULTS/ops-cluster-setup.log" 2>&1 || { tail -40 "$RESULTS/ops-cluster-setup.log" >&2; die "the cluster's setup failed"; }
  local cmd=(env ANSIBLE_CONFIG="$MOLECULE_EPHEMERAL_DIRECTORY/ansible.cfg" ANSIBLE_ROLES_PATH="$REPO_ROOT/roles"
             ansible-playbook site.yml -i "$MOLECULE_EPHEMERAL_DIRECTORY/inventory")
  ops_run cluster-rerun "cluster: rerun over SSH, nothing to change" "${cmd[@]}"
  ops_run cluster-check "cluster: --check --diff over SSH" "${cmd[@]}" --check --diff
  (cd "$REPO_ROOT" && molecule destroy -s cluster) >>"$RESULTS/ops-cluster-setup.log" 2>&1
}

start_results() {
  RESULTS="$REPO_ROOT/bench/results/$1"
  mkdir -p "$RESULTS"
  require_root
  ensure_toolchain
  ensure_bench_venv
}

case "${1:-run}" in
  run)
    shift || true
    start_results "${1:-$(date -u +%Y%m%dT%H%M)}"
    : >"$RESULTS/commands.txt"
    ensure_host_image bookworm
    deploy
    measure
    ;;
  measure)
    [ "$#" -ge 2 ] || die "usage: $0 measure NAME [SCENARIO...]"
    start_results "$2"
    shift 2
    docker container inspect "$BENCH_HOST" >/dev/null 2>&1 || die "no $BENCH_HOST: run '$0 run' first"
    printf 'measure\t%s\n' "scripts/bench.sh measure $(basename "$RESULTS") $*" >>"$RESULTS/commands.txt"
    measure "$@"
    ;;
  layouts)
    shift || true
    start_results "${1:-layouts-$(date -u +%Y%m%dT%H%M)}"
    base="$RESULTS"
    : >"$base/commands.txt"
    ensure_host_image bookworm
    deploy
    # The same host (CPU set, memory, descriptors) for every layout; the
    # HTTP scenarios through Nginx only, as Gunicorn's own socket is not in
    # every layout.
    for layout in split daphne uvicorn; do
      RESULTS="$base/$layout"
      mkdir -p "$RESULTS"
      : >"$RESULTS/commands.txt"
      [ "$layout" = split ] || move_to_layout "$layout"
      restart_app_servers
      memory_at_rest
      measure http-nginx-healthz http-nginx-lobby http-nginx-room fanout-100 fanout-1000 burst idle
    done
    RESULTS="$base"
    "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/report.py" layouts "$base" >/dev/null
    log "layout matrix: $base/results.md"
    ;;
  metrics)
    shift || true
    start_results "${1:-metrics-$(date -u +%Y%m%dT%H%M)}"
    base="$RESULTS"
    rev="${2:-$(git -C "$REPO_ROOT" log --diff-filter=A --format=%H -1 -- app/chat/metrics.py)^}"
    rev="$(git -C "$REPO_ROOT" rev-parse --short "$rev")"
    without="$(mktemp -d)"
    git -C "$REPO_ROOT" archive "$rev" app | tar -x -C "$without"
    : >"$base/commands.txt"
    ensure_host_image bookworm
    deploy
    # Alternating, so that a machine that gets busier does not favour one.
    for round in 1 2; do
      for variant in with without; do
        RESULTS="$base/$variant-$round"
        mkdir -p "$RESULTS"
        : >"$RESULTS/commands.txt"
        if [ "$variant" = without ]; then
          site_run deploy "the app of $rev" -e "chat_app_source_dir=$without/app"
        else
          # Served, and scraped every 15 s as Prometheus would.
          site_run deploy "the app as it is, its metrics served" \
            -e daphne_metrics_listen=127.0.0.1:9201 -e gunicorn_metrics_listen=127.0.0.1:9200
        fi
        restart_app_servers
        [ "$variant" = without ] || docker exec -d "$BENCH_HOST" sh -c \
          'for i in $(seq 80); do for port in 9200 9201 9202 9203; do
             curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$port/metrics"; done; sleep 15; done # chat-bench-scrape'
        measure fanout-100 fanout-1000
        docker exec "$BENCH_HOST" pkill -f chat-bench-scrape || true
      done
    done
    RESULTS="$base"
    {
      printf '# The app'"'"'s metrics: the fan-out with them (this commit) and without (%s)\n\n' "$rev"
      for round in 1 2; do
        printf '\n## Round %s\n\n' "$round"
        "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/report.py" compare "$base/without-$round" "$base/with-$round"
      done
    } >"$base/results.md"
    rm -rf "$without"
    log "metrics cost: $base/results.md"
    ;;
  ops)
    shift || true
    start_results "${1:-ops-$(date -u +%Y%m%dT%H%M)}"
    : >"$RESULTS/commands.txt"
    : >"$RESULTS/ops-times.tsv"
    ensure_engine
    ops_demo
    [ "${CHAT_OPS_CLUSTER:-1}" = 0 ] || ops_cluster
    "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/ops.py" report "$RESULTS" >"$RESULTS/results.md"
    cat "$RESULTS/results.md"
    ;;
  soak)
    [ "$#" -ge 2 ] || die "usage: $0 soak NAME [DURATION [LAYOUT]]"
    start_results "$2"
    : >"$RESULTS/commands.txt"
    ensure_host_image bookworm
    soak "${3:-3600}" "${4:-split}"
    ;;
  profile)
    [ "$#" -ge 2 ] || die "usage: $0 profile NAME [BEFORE]"
    start_results "$2"
    docker container inspect "$BENCH_HOST" >/dev/null 2>&1 || die "no $BENCH_HOST: run '$0 run' first"
    printf 'profile\t%s\n' "scripts/bench.sh profile $(basename "$RESULTS") ${3:-}" >>"$RESULTS/commands.txt"
    profile_fanout "${3:-}"
    ;;
  compare)
    [ "$#" -eq 3 ] || die "usage: $0 compare RESULTS_A RESULTS_B"
    ensure_bench_venv
    "$BENCH_VENV/bin/python" "$REPO_ROOT/bench/report.py" compare "$2" "$3"
    ;;
  down)
    ensure_toolchain
    "$VENV/bin/python" "$REPO_ROOT/scripts/host.py" down "$BENCH_HOST"
    rm -f "$REPO_ROOT/.cache/facts/"*"_chat-bench"
    ;;
  *) die "usage: $0 [run [NAME]|measure NAME [SCENARIO...]|layouts [NAME]|metrics [NAME [REV]]|ops [NAME]|soak NAME [DURATION [LAYOUT]]|profile NAME [BEFORE]|compare A B|down]" ;;
esac

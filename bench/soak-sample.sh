# Runs on the benchmark host (scripts/bench.sh soak: docker exec -i HOST sh <
# this) every 30 s of a soak: one line per running unit of the app's servers,
# Nginx and Redis, "UNIT RSS_KIB OPEN_FDS PROCESSES" over every process of
# the unit's cgroup (a Daphne instance restarted by a deploy stays the same
# unit), then "redis-clients N": the TCP connections Redis holds.
set -eu
units="$(systemctl list-units --plain --no-legend --state=running --type=service \
  'chat-*.service' nginx.service redis-server.service | cut -d' ' -f1)"
for unit in $units; do
  group="$(systemctl show -p ControlGroup --value "$unit")"
  # cgroup v1 (systemd's named hierarchy) or v2 (unified).
  pids=""
  for procs in "/sys/fs/cgroup/systemd$group/cgroup.procs" "/sys/fs/cgroup$group/cgroup.procs"; do
    if [ -r "$procs" ]; then
      pids="$(cat "$procs")"
      break
    fi
  done
  rss=0 fds=0 count=0
  for pid in $pids; do
    kib="$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
    [ -n "$kib" ] || continue
    open="$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
    rss=$((rss + kib)) fds=$((fds + open)) count=$((count + 1))
  done
  echo "$unit $rss $fds $count"
done
echo "redis-clients $(ss -Htn state established '( sport = :6379 )' | wc -l)"

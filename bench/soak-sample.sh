# Runs on the benchmark host (scripts/bench.sh soak: docker exec -i HOST sh <
# this) every 30 s of a soak: one line per running unit of the app's servers,
# Nginx and Redis, "UNIT RSS_KIB OPEN_FDS PROCESSES PSS_KIB PRIVATE_KIB" over
# every process of the unit's cgroup (a Daphne instance restarted by a deploy
# stays the same unit), then "redis-clients N": the TCP connections Redis holds.
# RSS counts a shared page once in every process that touched it: Nginx's
# workers each count all of the shared zones (the TLS session cache, the
# limit zones) they have written to, so their RSS grows as those fill up to
# their configured size. Private memory (smaps_rollup's Private_*) is what a
# leak grows; PSS shares each page out among the processes that map it.
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
  rss=0 fds=0 count=0 pss=0 private=0
  for pid in $pids; do
    # "RSS PSS PRIVATE" in KiB; empty if the process is gone.
    kib="$(awk '/^Rss:/ {r = $2} /^Pss:/ {p = $2} /^Private_(Clean|Dirty):/ {v += $2}
                END {if (r != "") print r, p, v}' "/proc/$pid/smaps_rollup" 2>/dev/null || true)"
    [ -n "$kib" ] || continue
    # shellcheck disable=SC2086 # split into the three figures on purpose
    set -- $kib
    open="$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"
    rss=$((rss + $1)) pss=$((pss + $2)) private=$((private + $3)) fds=$((fds + open)) count=$((count + 1))
  done
  echo "$unit $rss $fds $count $pss $private"
done
echo "redis-clients $(ss -Htn state established '( sport = :6379 )' | wc -l)"

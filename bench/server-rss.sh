# Runs on the benchmark host (scripts/bench.sh: docker exec -i HOST sh < this,
# or sh -s -- UNIT... to name the units): prints the resident memory, in KiB,
# of every process in the cgroups of the app's server units (Daphne's
# instances, Gunicorn's, whichever the layout runs) and of Nginx. The units'
# cgroups rather than process names: Daphne runs as `python -m
# chatservice.serve_daphne`, and a worker Nginx starts is in nginx.service's
# cgroup whatever it is called.
set -eu
[ "$#" -gt 0 ] || set -- 'chat-daphne@*.service' chat-gunicorn.service nginx.service
units="$(systemctl list-units --plain --no-legend --state=active "$@" | cut -d' ' -f1)"
for unit in $units; do
  group="$(systemctl show -p ControlGroup --value "$unit")"
  # cgroup v1 (systemd's named hierarchy) or v2 (unified).
  for procs in "/sys/fs/cgroup/systemd$group/cgroup.procs" "/sys/fs/cgroup$group/cgroup.procs"; do
    if [ -r "$procs" ]; then
      cat "$procs"
      break
    fi
  done
done | sort -un | paste -sd, | xargs -r -I PIDS ps -o rss= -p PIDS

# Runs on the benchmark host after the deploy (scripts/bench.sh, profile
# "sized"): Daphne binds its own socket with a listen backlog the kernel
# honours, which is what the daphne role should do. With the role's systemd
# socket, Twisted listens again on the adopted socket with its default
# backlog of 50 (ss -lx shows 50, not the unit's Backlog=2048), and a burst of
# handshakes gets 502 from Nginx. The flags are the role's own ExecStart.
set -eu
dropin=/etc/systemd/system/chat-daphne@.service.d
mkdir -p "$dropin"
cat >"$dropin/zz-bench-backlog.conf" <<'UNIT'
[Unit]
Requires=
After=network.target

[Service]
ReadWritePaths=/run/chat
ExecStartPre=-/bin/rm -f /run/chat/daphne-%i.sock
ExecStart=
ExecStart=/srv/chat/current/.venv/bin/daphne --endpoint unix:/run/chat/daphne-%i.sock:backlog=4096:mode=666:lockfile=0 --proxy-headers --ping-interval 20 --ping-timeout 30 --websocket_connect_timeout 10 --application-close-timeout 10 -v 0 chatservice.asgi:application
UNIT
systemctl daemon-reload
for service in $(systemctl list-units --plain --no-legend 'chat-daphne@*.service' | awk '{print $1}'); do
  systemctl stop "${service%.service}.socket" "$service"
  systemctl start "$service"
done
sleep 3
ss -lxn | grep daphne

#!/usr/bin/env bash
# The local demo: a Debian 12 systemd host in a container, turned into the
# running chat service by site.yml, with Nginx's https on
# https://localhost:$CHAT_PUBLISHED_TLS_PORT/ (127.0.0.1, a self-signed
# certificate) and its http, which only redirects, on 127.0.0.1:$CHAT_PUBLISHED_PORT;
# Prometheus and Alertmanager on 127.0.0.1:9090 and :9093
# (CHAT_PUBLISHED_PROMETHEUS_PORT, CHAT_PUBLISHED_ALERTMANAGER_PORT).
#   scripts/demo.sh up     set up what is missing, create the host, deploy
#   scripts/demo.sh down   remove the host (the image and secrets stay)
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

DEMO_HOST=chat-demo
export CHAT_PUBLISHED_PORT="${CHAT_PUBLISHED_PORT:-8080}"
export CHAT_PUBLISHED_TLS_PORT="${CHAT_PUBLISHED_TLS_PORT:-8443}"
PROMETHEUS_PORT="${CHAT_PUBLISHED_PROMETHEUS_PORT:-9090}"
ALERTMANAGER_PORT="${CHAT_PUBLISHED_ALERTMANAGER_PORT:-9093}"

case "${1:-up}" in
  up)
    require_root
    ensure_toolchain
    ensure_host_image "$CHAT_HOST_SUITE"
    "$VENV/bin/python" "$REPO_ROOT/scripts/host.py" up "$DEMO_HOST" "$CHAT_PUBLISHED_PORT" "$CHAT_PUBLISHED_TLS_PORT" \
      --publish "9090:$PROMETHEUS_PORT" --publish "9093:$ALERTMANAGER_PORT"
    log "deploying with: ansible-playbook site.yml -i inventories/local"
    (cd "$REPO_ROOT" && ansible-playbook site.yml -i inventories/local)
    log "the chat is at https://localhost:$CHAT_PUBLISHED_TLS_PORT/ (self-signed certificate: see docs/operating.md, 'HTTPS certificates')"
    log "its monitoring: Prometheus http://127.0.0.1:$PROMETHEUS_PORT/consoles/chat.html, Alertmanager http://127.0.0.1:$ALERTMANAGER_PORT/ (alerts also in: docker exec $DEMO_HOST journalctl -u chat-alert-log)"
    ;;
  down)
    ensure_toolchain
    "$VENV/bin/python" "$REPO_ROOT/scripts/host.py" down "$DEMO_HOST"
    # A new demo host must not inherit the old one's cached facts.
    rm -f "$REPO_ROOT/.cache/facts/"*"_$DEMO_HOST"
    ;;
  *)
    die "usage: $0 [up|down]"
    ;;
esac

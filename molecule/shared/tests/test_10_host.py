"""The host: packages, units, sockets, files and Redis exposure."""

import pytest

APP_UNITS = ["chat-gunicorn.socket", "chat-gunicorn.service"]


@pytest.mark.parametrize("name", ["nginx", "redis-server", "python3-venv"])
def test_package_installed(host, name):
    assert host.package(name).is_installed


@pytest.mark.parametrize("unit", ["nginx", "redis-server", *APP_UNITS])
def test_unit_active_and_enabled(host, unit):
    service = host.service(unit)
    assert service.is_running, f"{unit} is not active"
    assert service.is_enabled, f"{unit} is not enabled at boot"


def test_one_daphne_per_cpu_at_least_two(host, daphne_instances):
    cpus = int(host.check_output("nproc"))
    assert daphne_instances == list(range(1, max(cpus, 2) + 1))


def test_every_daphne_instance_active_and_enabled(host, daphne_instances):
    for n in daphne_instances:
        for unit in (f"chat-daphne@{n}.socket", f"chat-daphne@{n}.service"):
            service = host.service(unit)
            assert service.is_running, f"{unit} is not active"
            assert service.is_enabled, f"{unit} is not enabled at boot"


def test_system_not_degraded(host):
    assert host.run("systemctl is-system-running").stdout.strip() == "running", \
        host.run("systemctl --failed --no-legend").stdout


def _assert_app_socket(host, path):
    socket = host.file(path)
    assert socket.exists and socket.is_socket, f"{path} is not a socket"
    assert socket.user == "chat"
    assert socket.group == "www-data", "Nginx must reach the socket through its group"
    assert socket.mode == 0o660


def test_gunicorn_socket(host):
    _assert_app_socket(host, "/run/chat/gunicorn.sock")


def test_daphne_sockets(host, daphne_instances):
    for n in daphne_instances:
        _assert_app_socket(host, f"/run/chat/daphne-{n}.sock")


def test_nginx_config_valid(host):
    result = host.run("nginx -t")
    assert result.rc == 0, result.stderr


def test_nginx_upstream_lists_every_daphne(host, daphne_instances):
    site = host.file("/etc/nginx/sites-enabled/chat.conf").content_string
    for n in daphne_instances:
        assert f"server unix:/run/chat/daphne-{n}.sock;" in site
    assert "least_conn;" in site
    assert not host.file("/etc/nginx/sites-enabled/default").exists


def test_server_tokens_off(host):
    assert "server_tokens off;" in host.file("/etc/nginx/nginx.conf").content_string


def test_redis_listens_on_loopback_only(host):
    listeners = [s for s in host.socket.get_listening_sockets() if s.endswith(":6379")]
    assert listeners, "redis-server is not listening"
    for address in listeners:
        assert address in ("tcp://127.0.0.1:6379", "tcp://::1:6379"), f"Redis listens on {address}"


def test_redis_refuses_commands_without_password(host):
    result = host.run("redis-cli -h 127.0.0.1 SET probe 1")
    assert "NOAUTH" in result.stdout + result.stderr


def test_redis_config_not_world_readable(host):
    conf = host.file("/etc/redis/redis.conf")
    assert conf.mode & 0o007 == 0


def test_env_file_private(host):
    env = host.file("/srv/chat/shared/chat.env")
    assert env.user == "root"
    assert env.group == "chat"
    assert env.mode == 0o640
    assert "SECRET_KEY=" in host.check_output("cat /srv/chat/shared/chat.env")


def test_live_release_is_owned_by_root(host):
    current = host.file("/srv/chat/current")
    assert current.is_symlink
    release = host.file(current.linked_to)
    assert release.user == "root", "the app user must not be able to change its code"
    assert host.file(current.linked_to + "/.venv/bin/daphne").exists


def test_app_units_are_sandboxed(host):
    props = host.check_output(
        "systemctl show chat-gunicorn.service -p NoNewPrivileges -p ProtectSystem -p PrivateTmp -p User")
    assert "NoNewPrivileges=yes" in props
    assert "ProtectSystem=strict" in props
    assert "PrivateTmp=yes" in props
    assert "User=chat" in props

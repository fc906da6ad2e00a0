"""A wrong inventory stops in preflight, before any host is touched.

These run site.yml for real against inventories that must be refused, and
check both the message an operator gets and that no play beyond preflight
started. None of them reaches a remote host: the first preflight play runs
on the controller only, and the second gathers facts of a local host.
"""

import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
FIRST_CHANGING_PLAY = "PLAY [Base system]"


def run_site(inventory, *extra):
    # Facts of the probe host (this controller) go to a cache of their own,
    # not into the project's.
    env = dict(os.environ, ANSIBLE_CACHE_PLUGIN_CONNECTION=str(pathlib.Path(inventory) / ".facts"))
    result = subprocess.run(
        ["ansible-playbook", "site.yml", "-i", str(inventory), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    return result.returncode, result.stdout + result.stderr


def assert_refused_before_any_change(rc, output, *reasons):
    """The run failed, said each reason, and no play that changes a host began."""
    assert rc != 0
    for reason in reasons:
        assert reason in output, output[-3000:]
    assert FIRST_CHANGING_PLAY not in output


def write_inventory(tmp_path, groups, extra_vars="", certificate_source="self_signed"):
    """An inventory of one local host (the controller) in the given groups,
    laid out as the repository's: the environment 'test' holds every host,
    and its settings are in group_vars/test/."""
    children = "".join(f"        {group}:\n          hosts:\n            probe:\n" for group in groups)
    (tmp_path / "hosts.yml").write_text(
        "all:\n"
        "  vars:\n"
        "    ansible_connection: local\n"
        "    ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n"
        "  children:\n"
        "    test:\n"
        "      children:\n" + children
    )
    (tmp_path / "group_vars" / "all").mkdir(parents=True)
    (tmp_path / "group_vars" / "all" / "00-shared.yml").symlink_to(REPO / "group_vars" / "all.yml")
    (tmp_path / "group_vars" / "test").mkdir(exist_ok=True)
    (tmp_path / "group_vars" / "test" / "main.yml").write_text(
        "chat_secret_key: " + "k" * 50 + "\n"
        "chat_redis_password: " + "p" * 32 + "\n"
        "chat_redis_admin_password: " + "a" * 32 + "\n"
        "chat_server_name: chat.test\n"
        "chat_public_origins: ['https://chat.test']\n"
        "chat_tls_certificate_source: " + certificate_source + "\n"
        + extra_vars
    )
    return tmp_path


def add_app_host(tmp_path, address=None):
    """Another host of the environment, alone in group app (at chat_private_address
    address, if given): a layout of hosts apart."""
    (tmp_path / "hosts.yml").write_text(
        (tmp_path / "hosts.yml").read_text() + "        app:\n          hosts:\n            other:\n"
        + (f"              chat_private_address: {address}\n" if address else ""))


# A run limited to some hosts leaves out the implicit localhost: the
# controller's checks then run on the first host of the limit, still
# without contacting it.
@pytest.mark.parametrize("limit", [[], ["--limit", "web"]], ids=["whole", "limited"])
@pytest.mark.parametrize("environment", ["staging", "production"])
def test_environment_without_vault_stops_before_any_host(environment, limit):
    vault = REPO / "inventories" / environment / "group_vars" / environment / "vault.yml"
    assert not vault.exists(), f"{vault} exists; this test needs it absent"
    rc, output = run_site(REPO / "inventories" / environment, *limit)
    assert_refused_before_any_change(rc, output, "vault.yml is missing", "ansible-vault encrypt")
    assert "Gathering Facts" not in output, "preflight contacted a host"


def test_missing_tier_is_refused(tmp_path):
    rc, output = run_site(write_inventory(tmp_path, ["web", "app"]))
    assert_refused_before_any_change(rc, output, "no host in group 'redis'")


def test_hosts_sharing_a_private_address_are_refused(tmp_path):
    """A multi-host layout whose hosts the others could not tell apart."""
    inventory = write_inventory(tmp_path, ["web", "redis"])
    # Both are this controller: the same default IPv4 address.
    add_app_host(tmp_path)
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "needs its own private", "Shared by several hosts")


def test_a_loopback_private_address_is_refused(tmp_path):
    inventory = write_inventory(tmp_path, ["web", "redis"])
    add_app_host(tmp_path, "127.0.0.2")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "Not an IP address other than loopback: other")


def test_an_app_host_the_web_host_cannot_reach_is_refused(tmp_path):
    """192.0.2.7 (TEST-NET-1) never answers: the web host is told before any change."""
    inventory = write_inventory(tmp_path, ["web", "redis"])
    add_app_host(tmp_path, "192.0.2.7")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "got no answer on the private network from 192.0.2.7")


@pytest.mark.parametrize(("variable", "value"), [
    ("chat_secret_key", "short"),
    ("chat_secret_key", "k" * 49),  # Django's check --deploy wants 50+
    ("chat_secret_key", "k" * 49 + "'"),  # would end chat.env's quoting
    ("chat_redis_password", "p" * 31 + "@"),  # would break REDIS_URL
    ("chat_redis_admin_password", "a" * 31 + " "),
    ("chat_redis_password", "p" * 31),  # passwords want 32+
    # The vault example's placeholders, long enough to pass a length check.
    ("chat_redis_password", "CHANGE-ME-32-random-characters-xyz"),
    ("chat_secret_key", "CHANGE-ME-50-random-characters-" + "k" * 30),
    # One value for two secrets.
    ("chat_redis_password", "a" * 32),
    # A rotated-out key: too short, not a list, or the key now.
    ("chat_secret_key_fallbacks", ["o" * 49]),
    ("chat_secret_key_fallbacks", "o" * 50),
    ("chat_secret_key_fallbacks", ["k" * 50]),
    # The Redis password before a rotation: unsafe, or the password now.
    ("chat_redis_password_previous", "o" * 31 + "@"),
    ("chat_redis_password_previous", "p" * 32),
    # The same for the admin's.
    ("chat_redis_admin_password_previous", "o" * 31 + "@"),
    ("chat_redis_admin_password_previous", "a" * 32),
])
def test_short_or_unsafe_secret_is_refused(tmp_path, variable, value):
    inventory = write_inventory(tmp_path, ["web", "app", "redis"])
    rc, output = run_site(inventory, "-e", json.dumps({variable: value}))
    assert_refused_before_any_change(rc, output, "lacks chat_secret_key")


def test_rotated_out_secrets_pass_preflight(tmp_path):
    """The control for the rotated-out secrets above: other values of the same rules."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis"])
    rc, output = run_site(inventory, "-e", json.dumps({"chat_secret_key_fallbacks": ["o" * 50],
                                                       "chat_redis_password_previous": "o" * 32,
                                                       "chat_redis_admin_password_previous": "q" * 32}),
                          "--tags", "never")
    assert rc == 0, output[-3000:]


def vault_inventory(tmp_path, encrypted):
    """A good inventory whose secrets live in a vault file, encrypted or not."""
    # Where an environment keeps it (group_vars/test/), and the password
    # beside the inventory's files in a name Ansible does not read as one.
    (tmp_path / "group_vars" / "test").mkdir(parents=True)
    vault = tmp_path / "group_vars" / "test" / "vault.yml"
    vault.write_text("vault_note: a value only the vault holds\n")
    password = tmp_path / "vault-password.txt"
    password.write_text("test-only-vault-password\n")
    if encrypted:
        subprocess.run(["ansible-vault", "encrypt", "--vault-password-file", str(password), str(vault)],
                       check=True, capture_output=True, timeout=60)
    certificate = ("chat_tls_certificate: '-----BEGIN CERTIFICATE-----'\n"
                   "chat_tls_key: '-----BEGIN PRIVATE KEY-----'\n")
    inventory = write_inventory(tmp_path, ["web", "app", "redis"], f"chat_vault_file: {vault}\n" + certificate,
                                certificate_source="provided")
    return inventory, ["--vault-password-file", str(password)]


def test_vault_in_clear_is_refused(tmp_path):
    inventory, options = vault_inventory(tmp_path, encrypted=False)
    rc, output = run_site(inventory, *options)
    assert_refused_before_any_change(rc, output, "vault.yml is not encrypted")


def test_encrypted_vault_passes_preflight(tmp_path):
    """The control for the test above: the same inventory, vault encrypted."""
    inventory, options = vault_inventory(tmp_path, encrypted=True)
    rc, output = run_site(inventory, *options, "--tags", "never")
    assert rc == 0, output[-3000:]


@pytest.mark.parametrize("extra", [
    {"chat_tls_certificate_source": "letsencrypt"},
    {"chat_tls_certificate_source": "provided"},  # no certificate or key
    {"chat_tls_certificate_source": "provided", "chat_tls_certificate": "x", "chat_tls_key": "y"},
], ids=["unknown-source", "provided-without-pem", "provided-not-pem"])
def test_certificate_source_is_checked(tmp_path, extra):
    rc, output = run_site(write_inventory(tmp_path, ["web", "app", "redis"]), "-e", json.dumps(extra))
    assert_refused_before_any_change(rc, output, "chat_tls_certificate_source is")


ACME = {"chat_tls_certificate_source": "acme", "chat_tls_acme_email": "ops@example.com"}


@pytest.mark.parametrize(("extra", "shown"), [
    ({"chat_tls_acme_email": ""}, "now ''"),
    ({"chat_tls_acme_email": "ops at example.com"}, "now 'ops at example.com'"),
    ({"chat_tls_acme_directory_url": "http://ca.example.com/directory"}, "now 'http://ca.example.com/directory'"),
], ids=["acme-without-email", "acme-bad-email", "acme-plain-http-directory"])
def test_acme_settings_are_checked(tmp_path, extra, shown):
    rc, output = run_site(write_inventory(tmp_path, ["web", "app", "redis"]),
                          "-e", json.dumps({**ACME, **extra}))
    assert_refused_before_any_change(rc, output, "the acme certificate source needs", shown)


def test_acme_settings_pass_preflight(tmp_path):
    """The control for the test above."""
    rc, output = run_site(write_inventory(tmp_path, ["web", "app", "redis"]), "-e", json.dumps(ACME),
                          "--tags", "never")
    assert rc == 0, output[-3000:]


PROVIDED = {"chat_tls_certificate_source": "provided",
            "chat_tls_certificate": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
            "chat_tls_key": "-----BEGIN PRIVATE KEY-----\ny\n-----END PRIVATE KEY-----\n"}


@pytest.mark.parametrize(("extra", "shown"), [
    ({"chat_rotate_tls_key": "soon"}, "now 'soon'"),
    ({**PROVIDED, "chat_rotate_tls_key": True}, "comes from the vault"),
], ids=["not-a-boolean", "provided"])
def test_a_tls_key_rotation_is_checked(tmp_path, extra, shown):
    rc, output = run_site(write_inventory(tmp_path, ["web", "app", "redis"]), "-e", json.dumps(extra))
    assert_refused_before_any_change(rc, output, "chat_rotate_tls_key", shown)


@pytest.mark.parametrize("extra", [
    {"chat_rotate_tls_key": "true"},  # as -e chat_rotate_tls_key=true gives it
    {**ACME, "chat_rotate_tls_key": True},
    PROVIDED,
], ids=["self-signed", "acme", "provided-without-rotation"])
def test_a_tls_key_rotation_passes_preflight(tmp_path, extra):
    """The controls for the test above."""
    rc, output = run_site(write_inventory(tmp_path, ["web", "app", "redis"]), "-e", json.dumps(extra),
                          "--tags", "never")
    assert rc == 0, output[-3000:]


def test_self_signed_certificate_is_refused_where_there_is_a_vault(tmp_path):
    inventory, options = vault_inventory(tmp_path, encrypted=True)
    rc, output = run_site(inventory, *options, "-e", "chat_tls_certificate_source=self_signed")
    assert_refused_before_any_change(rc, output, "cannot use self_signed")


@pytest.mark.parametrize(("variable", "value", "complaint"), [
    ("chat_app_channel_layer", "bogus", "chat_app_channel_layer"),
    ("gunicorn_timeout", "soon", "gunicorn_timeout"),
    ("redis_maxmemory_policy", "evict-everything", "redis_maxmemory_policy"),
    ("daphne_verbosity", "7", "daphne_verbosity"),
])
def test_wrong_variable_is_refused_before_any_change(tmp_path, variable, value, complaint):
    inventory = write_inventory(tmp_path, ["web", "app", "redis"], f"{variable}: {value}\n")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, complaint, "Validate role variables")


@pytest.mark.parametrize("layout", ["gunicorn", "Split", ""])
def test_unknown_layout_is_refused(tmp_path, layout):
    inventory = write_inventory(tmp_path, ["web", "app", "redis"], f"chat_layout: '{layout}'\n")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, f'sets chat_layout to "{layout}"',
                                     "one of split, daphne, uvicorn")


@pytest.mark.parametrize("layout", ["daphne", "uvicorn"])
def test_a_layout_other_than_split_is_refused_on_hosts_apart(tmp_path, layout):
    inventory = write_inventory(tmp_path, ["web", "redis"], f"chat_layout: {layout}\n")
    add_app_host(tmp_path, "192.0.2.7")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "supported only on one host", "leave chat_layout unset")


@pytest.mark.parametrize("layout", ["split", "daphne", "uvicorn"])
def test_every_layout_passes_preflight(tmp_path, layout):
    """The control for the test above."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis"], f"chat_layout: {layout}\n")
    rc, output = run_site(inventory, "--tags", "never")
    assert rc == 0, output[-3000:]


def test_good_inventory_passes_preflight(tmp_path):
    """The control for the tests above: the same inventory, valid, passes."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis"])
    rc, output = run_site(inventory, "--tags", "never")
    assert rc == 0, output[-3000:]


def test_inventory_without_site_name_is_refused(tmp_path):
    inventory = write_inventory(tmp_path, ["web", "app", "redis"])
    settings = tmp_path / "group_vars" / "test" / "main.yml"
    settings.write_text(settings.read_text().replace("chat_server_name: chat.test\n", ""))
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "lacks chat_server_name")


def test_http_origin_is_refused(tmp_path):
    inventory = write_inventory(tmp_path, ["web", "app", "redis"])
    rc, output = run_site(inventory, "-e", json.dumps({"chat_public_origins": ["http://chat.test"]}))
    assert_refused_before_any_change(rc, output, "one or more https:// origins")


@pytest.mark.parametrize("environment", ["local", "staging", "production"])
def test_site_syntax(environment):
    result = subprocess.run(
        ["ansible-playbook", "site.yml", "-i", f"inventories/{environment}", "--syntax-check"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


DB_PASSWORD = "chat_db_password: " + "d" * 32 + "\n"


def test_postgresql_without_a_backup_host_is_refused(tmp_path):
    """Backups on: pgBackRest's repository needs a host of its own."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "db"], DB_PASSWORD)
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "no host is in group 'backup'", "chat_backups_enabled: false")


def test_postgresql_without_backups_on_purpose_passes_preflight(tmp_path):
    """The control for the test above: backups turned off on purpose."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "db"], DB_PASSWORD + "chat_backups_enabled: false\n")
    rc, output = run_site(inventory, "--tags", "never")
    assert rc == 0, output[-3000:]


@pytest.mark.parametrize("previous", ["o" * 31 + "@", "d" * 32])
def test_an_unsafe_database_password_before_a_rotation_is_refused(tmp_path, previous):
    """chat_db_password_previous: the rules of chat_db_password, and not that password itself."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "db"], DB_PASSWORD + "chat_backups_enabled: false\n")
    rc, output = run_site(inventory, "-e", json.dumps({"chat_db_password_previous": previous}))
    assert_refused_before_any_change(rc, output, "chat_db_password_previous) is neither")


def test_a_database_password_before_a_rotation_passes_preflight(tmp_path):
    """The control for the test above."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "db"], DB_PASSWORD + "chat_backups_enabled: false\n")
    rc, output = run_site(inventory, "-e", json.dumps({"chat_db_password_previous": "o" * 32}), "--tags", "never")
    assert rc == 0, output[-3000:]


def test_the_backup_host_may_not_be_the_db_host(tmp_path):
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "db", "backup"], DB_PASSWORD)
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "a backup on the disk it protects is lost with it")


@pytest.mark.parametrize("passphrase", ["", "short", "b" * 31 + "'", "d" * 32],
                         ids=["missing", "short", "unsafe", "same as the db password"])
def test_backup_passphrase_is_checked(tmp_path, passphrase):
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "db"],
                                DB_PASSWORD + f"chat_backup_passphrase: \"{passphrase}\"\n")
    # Another host holds the repository: the passphrase is what is wrong.
    (tmp_path / "hosts.yml").write_text((tmp_path / "hosts.yml").read_text()
                                        + "        backup:\n          hosts:\n            other:\n"
                                        + "              chat_private_address: 192.0.2.8\n")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "chat_backup_passphrase")


def test_prometheus_on_a_public_address_is_refused(tmp_path):
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "monitoring"],
                                "chat_monitoring_ui_address: 0.0.0.0\n")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "chat_monitoring_ui_address is 0.0.0.0")


def test_an_exporter_missing_from_the_catalogue_is_refused(tmp_path):
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "monitoring"],
                                "chat_exporters_here: [node, nosuch]\n")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "chat_exporters has no entry with a package for nosuch")


def add_redis_hosts(tmp_path, count, group="redis"):
    """Group GROUP: the probe host and COUNT more at TEST-NET-1 addresses (a replicated Redis, or
    PostgreSQL with Patroni, of COUNT + 1)."""
    (tmp_path / "hosts.yml").write_text(
        (tmp_path / "hosts.yml").read_text() + f"        {group}:\n          hosts:\n            probe:\n"
        + "".join(f"            {group}{n}:\n              chat_private_address: 192.0.2.{20 + n}\n"
                  for n in range(count)))


@pytest.mark.parametrize("more", [1, 3], ids=["two", "four"])
def test_an_even_number_of_redis_hosts_is_refused(tmp_path, more):
    """Two or four sentinels: losing one (or a split in halves) leaves no majority to fail over."""
    inventory = write_inventory(tmp_path, ["web", "app"])
    add_redis_hosts(tmp_path, more)
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, f"Group 'redis' has {more + 1} hosts", "a majority of the sentinels")


@pytest.mark.parametrize("quorum", [1, 4])
def test_a_sentinel_quorum_outside_the_majority_is_refused(tmp_path, quorum):
    inventory = write_inventory(tmp_path, ["web", "app"], f"redis_sentinel_quorum: {quorum}\n")
    add_redis_hosts(tmp_path, 2)
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, f"redis_sentinel_quorum is {quorum} for 3 sentinels", "(2 to 3)")


def test_three_redis_hosts_pass_the_inventory_checks(tmp_path):
    """The control for the two above: three Redis hosts get past them (to the network check,
    where the TEST-NET hosts, which do not exist, give no answer)."""
    inventory = write_inventory(tmp_path, ["web", "app"])
    add_redis_hosts(tmp_path, 2)
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "got no answer on the private network from 192.0.2.20")
    assert "a majority of the sentinels" not in output and "redis_sentinel_quorum is" not in output


@pytest.mark.parametrize("more", [1, 3])
def test_an_even_number_of_postgresql_hosts_is_refused(tmp_path, more):
    """Two or four etcd members under Patroni: losing one (or a split in halves) leaves no majority."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis", "backup"], "chat_db_password: " + "d" * 32 + "\n")
    add_redis_hosts(tmp_path, more, group="db")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, f"Group 'db' has {more + 1} hosts", "a majority of the etcd members")


@pytest.mark.parametrize("admin, refused", [("", True), ("a" * 40, False)])
def test_a_database_password_rotation_under_patroni_needs_an_admin_password_of_its_own(tmp_path, admin, refused):
    """Patroni's own passwords derive from chat_db_admin_password (by default chat_db_password): a
    rotation of chat_db_password must not change them, so it needs that password set apart first."""
    extra = "chat_db_password: " + "d" * 32 + "\nchat_backups_enabled: false\n"
    inventory = write_inventory(tmp_path, ["web", "app", "redis"],
                                extra + (f"chat_db_admin_password: {admin}\n" if admin else ""))
    add_redis_hosts(tmp_path, 2, group="db")
    rc, output = run_site(inventory, "-e", json.dumps({"chat_db_password_previous": "o" * 32}))
    if refused:
        assert_refused_before_any_change(rc, output, "chat_db_admin_password is chat_db_password itself")
    else:
        # Past the secrets, to the network check (192.0.2.x answers nobody).
        assert_refused_before_any_change(rc, output, "got no answer on the private network from 192.0.2.20")


def test_three_postgresql_hosts_pass_the_inventory_checks(tmp_path):
    """The control: three db hosts (Patroni) get past the count and the roles' checks, to the network check."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis"], "chat_db_password: " + "d" * 32 + "\n"
                                "chat_backups_enabled: false\n")
    add_redis_hosts(tmp_path, 2, group="db")
    rc, output = run_site(inventory)
    assert_refused_before_any_change(rc, output, "got no answer on the private network from 192.0.2.20")
    assert "a majority of the etcd members" not in output

"""A wrong inventory stops in preflight, before any host is touched.

These run site.yml for real against inventories that must be refused, and
check both the message an operator gets and that no play beyond preflight
started. None of them reaches a remote host: the first preflight play runs
on the controller only, and the second gathers facts of a local host.
"""

import os
import pathlib
import subprocess
import textwrap

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


def write_inventory(tmp_path, groups, extra_vars=""):
    """An inventory of one local host (the controller) in the given groups."""
    children = "".join(f"    {group}:\n      hosts:\n        probe:\n" for group in groups)
    (tmp_path / "hosts.yml").write_text(
        "all:\n"
        "  vars:\n"
        "    ansible_connection: local\n"
        "    ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n"
        "    chat_secret_key: " + "k" * 50 + "\n"
        "    chat_redis_password: " + "p" * 32 + "\n"
        "    chat_redis_admin_password: " + "a" * 32 + "\n"
        + textwrap.indent(extra_vars, "    ")
        + "  children:\n" + children
    )
    group_vars = tmp_path / "group_vars" / "all"
    group_vars.mkdir(parents=True)
    (group_vars / "00-shared.yml").symlink_to(REPO / "group_vars" / "all.yml")
    return tmp_path


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_environment_without_vault_stops_before_any_host(environment):
    vault = REPO / "inventories" / environment / "group_vars" / "all" / "vault.yml"
    assert not vault.exists(), f"{vault} exists; this test needs it absent"
    rc, output = run_site(REPO / "inventories" / environment)
    assert rc != 0
    assert "vault.yml is missing" in output
    assert "ansible-vault encrypt" in output
    assert "Gathering Facts" not in output, "preflight contacted a host"
    assert FIRST_CHANGING_PLAY not in output


def test_missing_tier_is_refused(tmp_path):
    rc, output = run_site(write_inventory(tmp_path, ["web", "app"]))
    assert rc != 0
    assert "no host in group 'redis'" in output
    assert FIRST_CHANGING_PLAY not in output


def test_web_host_outside_app_is_refused(tmp_path):
    inventory = write_inventory(tmp_path, ["web", "redis"])
    (tmp_path / "hosts.yml").write_text(
        (tmp_path / "hosts.yml").read_text() + "    app:\n      hosts:\n        other:\n")
    rc, output = run_site(inventory)
    assert rc != 0
    assert "are not in group 'app'" in output
    assert FIRST_CHANGING_PLAY not in output


def test_short_secret_is_refused(tmp_path):
    inventory = write_inventory(tmp_path, ["web", "app", "redis"])
    rc, output = run_site(inventory, "-e", "chat_secret_key=short")
    assert rc != 0
    assert "lacks chat_secret_key" in output
    assert FIRST_CHANGING_PLAY not in output


@pytest.mark.parametrize(("variable", "value", "complaint"), [
    ("chat_app_channel_layer", "bogus", "chat_app_channel_layer"),
    ("gunicorn_timeout", "soon", "gunicorn_timeout"),
    ("redis_maxmemory_policy", "evict-everything", "redis_maxmemory_policy"),
    ("daphne_verbosity", "7", "daphne_verbosity"),
])
def test_wrong_variable_is_refused_before_any_change(tmp_path, variable, value, complaint):
    inventory = write_inventory(tmp_path, ["web", "app", "redis"], f"{variable}: {value}\n")
    rc, output = run_site(inventory)
    assert rc != 0
    assert complaint in output
    assert "Validate role variables" in output
    assert FIRST_CHANGING_PLAY not in output


def test_good_inventory_passes_preflight(tmp_path):
    """The control for the tests above: the same inventory, valid, passes."""
    inventory = write_inventory(tmp_path, ["web", "app", "redis"])
    rc, output = run_site(inventory, "--tags", "never")
    assert rc == 0, output[-3000:]


@pytest.mark.parametrize("environment", ["local", "staging", "production"])
def test_site_syntax(environment):
    result = subprocess.run(
        ["ansible-playbook", "site.yml", "-i", f"inventories/{environment}", "--syntax-check"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

"""The operator's path: over SSH as a user with sudo, secrets from an encrypted vault.

Only the cluster scenario reaches its hosts that way; elsewhere these are skipped.
"""

import os
import re
import subprocess

import pytest
import yaml

from clients import changed_per_host, playbook_env, run_playbook, why_failed

SCENARIO = os.environ.get("MOLECULE_SCENARIO_DIRECTORY", "")
VAULT = os.path.join(SCENARIO, "group_vars", "staging", "vault.yml")


@pytest.fixture(scope="module", autouse=True)
def over_ssh(host):
    if host.ansible.get_variables().get("ansible_user") != "deploy":
        pytest.skip("SKIPPED: only the cluster scenario reaches its hosts as the deploy user")


@pytest.fixture(scope="module")
def secrets():
    """The vault's values, decrypted with the scenario's password file."""
    # The password file is the scenario's vault_password_file setting.
    out = subprocess.run(["ansible-vault", "view", VAULT], capture_output=True, text=True,
                         check=True, env=playbook_env()).stdout
    values = [str(value) for value in yaml.safe_load(out).values()]
    assert values and all(len(value) >= 32 for value in values)
    return values


def test_commands_run_as_deploy_through_sudo(host):
    assert host.check_output("echo $SUDO_USER") == "deploy"
    assert host.check_output("id -un") == "root"


@pytest.mark.parametrize("path", [pytest.param("/srv/chat/shared/chat.env", marks=pytest.mark.needs("app")),
                                  pytest.param("/etc/redis/redis.conf", marks=pytest.mark.needs("redis")),
                                  pytest.param("/etc/redis/users.conf", marks=pytest.mark.needs("redis"))])
def test_files_with_secrets_are_closed_to_the_deploy_user_without_sudo(host, path):
    assert host.file(path).exists
    result = host.run(f"runuser -u deploy -- cat {path}")
    assert result.rc != 0 and "Permission denied" in result.stderr


@pytest.mark.needs("web")
def test_a_dry_run_over_ssh_changes_nothing_and_prints_no_secret(secrets):
    # An operator's first move before a real run: --check --diff on the
    # converged host must agree with Molecule's idempotence step (no task
    # that only "changes" in check mode), and the diff of a file holding
    # secrets must not print them.
    result = run_playbook("site.yml", "--check", "--diff", "-v")
    assert result.returncode == 0, why_failed(result)
    changed = [line for line in result.stdout.splitlines() if line.startswith("changed:")]
    recaps = changed_per_host(result.stdout)
    assert recaps and set(recaps.values()) == {0}, "\n".join(changed)
    # A diff is printed only for what would change.
    assert not re.search(r"^[-+]{3} (before|after)", result.stdout, re.MULTILINE), result.stdout[-5000:]
    for value in secrets:
        assert value not in result.stdout, "a secret from the vault appears in the Ansible output"


@pytest.mark.needs("web")
def test_a_wrong_vault_password_stops_before_any_host_is_touched(host, tmp_path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    # Every host has the firewall's ruleset; a converge writes it.
    ruleset = host.file("/etc/nftables.conf")
    before = ruleset.mtime
    result = run_playbook("site.yml", env={"ANSIBLE_VAULT_PASSWORD_FILE": str(wrong)})
    assert result.returncode != 0
    assert "Decryption failed" in result.stdout, result.stdout[-3000:]
    # No task reached the host.
    for name in host.ansible.get_variables()["groups"]["all"]:
        assert f"[{name}]" not in result.stdout.replace(f"[{name} -> localhost]", "")
    assert ruleset.mtime == before

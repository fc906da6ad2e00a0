"""Each inventory's own settings are the ones every entry point sees.

group_vars/all.yml at the repository root is loaded at playbook level by
any playbook there (site.yml), where it outranks an inventory's group
'all'. It must therefore set nothing an environment sets: these tests read
the site's name, origins and open-file limit of every environment the three
ways an operator does (an ad-hoc `ansible` from the root and from elsewhere,
`ansible-inventory --host`, and a play at the repository root) and expect
the environment's own values each time.
"""

import json
import os
import pathlib
import subprocess
import uuid

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
PROBE = "{{ {'name': chat_server_name, 'origins': chat_public_origins, 'nofile': common_nofile_limit | int} | to_json }}"

ENVIRONMENTS = {
    "local": ("chat-demo", {"name": "localhost", "origins": ["https://localhost:8443"], "nofile": 20000}),
    "staging": ("chat-staging.example.com",
                {"name": "chat-staging.example.com", "origins": ["https://chat-staging.example.com"], "nofile": 65536}),
    "production": ("chat.example.com",
                   {"name": "chat.example.com", "origins": ["https://chat.example.com"], "nofile": 65536}),
}


def run(command, cwd):
    # The local demo's origins read CHAT_PUBLISHED_TLS_PORT: its default here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_NOCOLOR="1")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def probe_message(output):
    """The probe's message out of the json callback's report of one task."""
    report = json.JSONDecoder().raw_decode(output[output.index("{"):])[0]
    (result,) = report["plays"][0]["tasks"][0]["hosts"].values()
    return json.loads(result["msg"])


@pytest.mark.parametrize("environment", ENVIRONMENTS)
@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_ad_hoc_sees_the_environment(environment, cwd, tmp_path):
    host, expected = ENVIRONMENTS[environment]
    output = run(["ansible", "-i", str(REPO / "inventories" / environment), host,
                  "-m", "ansible.builtin.debug", "-a", f"msg={PROBE}"],
                 cwd=REPO if cwd == "root" else tmp_path)
    assert probe_message(output) == expected


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_inventory_lists_the_environment(environment):
    host, expected = ENVIRONMENTS[environment]
    # ansible-inventory shows values as written: the local origins hold a
    # template, the others are plain.
    hostvars = json.loads(run(["ansible-inventory", "-i", f"inventories/{environment}", "--host", host],
                              cwd=REPO))
    assert hostvars["chat_server_name"] == expected["name"]
    if environment != "local":
        assert hostvars["chat_public_origins"] == expected["origins"]


@pytest.mark.parametrize("environment", ENVIRONMENTS)
def test_play_at_the_root_sees_the_environment(environment):
    host, expected = ENVIRONMENTS[environment]
    playbook = REPO / f".probe-{uuid.uuid4().hex}.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Probe", "hosts": host, "gather_facts": False,
        "tasks": [{"name": "Show", "ansible.builtin.debug": {"msg": PROBE}}],
    }]))
    try:
        output = run(["ansible-playbook", "-i", f"inventories/{environment}", playbook.name], cwd=REPO)
    finally:
        playbook.unlink()
    assert probe_message(output) == expected


def test_no_inventory_sets_what_the_shared_file_sets():
    """What preflight refuses at run time, checked over every inventory in
    the repository (Molecule's included) without running anything."""
    shared = yaml.safe_load((REPO / "group_vars" / "all.yml").read_text())
    files = [f for pattern in ("inventories/*/group_vars/all/*.yml", "molecule/*/group_vars/all/*.yml")
             for f in REPO.glob(pattern)]
    assert files
    for path in files:
        if path.resolve() == (REPO / "group_vars" / "all.yml").resolve():
            continue
        text = path.read_text()
        if text.startswith("$ANSIBLE_VAULT"):
            continue
        overlap = set(yaml.safe_load(text) or {}) & set(shared)
        assert not overlap, f"{path.relative_to(REPO)} sets {sorted(overlap)}, which group_vars/all.yml outranks"

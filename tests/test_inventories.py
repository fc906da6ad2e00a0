"""An environment overrides the shared defaults the ordinary way.

group_vars/all.yml (the defaults and the wiring) is group 'all', loaded from
each inventory and again at playbook level for site.yml. Each environment
is a group holding all its hosts, whose group_vars rank above group 'all'
wherever that is loaded. This reads every default that an environment's
group_vars change, from the repository root, the two ways an operator does
(an ad-hoc `ansible` and a play beside site.yml), and expects the
environment's value both times.
"""

import json
import os
import pathlib
import subprocess
import uuid

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = yaml.safe_load((REPO / "group_vars" / "all.yml").read_text())


def plain(value):
    """A value as written, with nothing for Ansible to template."""
    return "{{" not in json.dumps(value)


def environment(name):
    """The environment's web host, and the shared defaults its group_vars change (plain values only)."""
    inventory = yaml.safe_load((REPO / "inventories" / name / "hosts.yml").read_text())
    tiers = inventory["all"]["children"][name]["children"]
    host = next(iter(tiers["web"]["hosts"]))
    overrides = {}
    for path in sorted((REPO / "inventories" / name / "group_vars" / name).glob("*.yml")):
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            if key in SHARED and plain(value) and plain(SHARED[key]):
                overrides[key] = value
    return host, overrides


def run(command):
    # The local demo's origins read CHAT_PUBLISHED_TLS_PORT: its default here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json", ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
               ANSIBLE_NOCOLOR="1")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index("{"):])[0]
    (answer,) = report["plays"][0]["tasks"][0]["hosts"].values()
    return json.loads(answer["msg"])


@pytest.mark.parametrize("name", ["local", "staging", "production", "bench"])
def test_an_environment_overrides_the_shared_defaults(name):
    host, overrides = environment(name)
    assert overrides, f"inventories/{name} changes no default of group_vars/all.yml: nothing to show"
    for key, value in overrides.items():
        assert SHARED[key] != value, f"{key}: the environment sets the default itself"
    probe = "{{ {" + ", ".join(f"'{key}': {key}" for key in overrides) + "} | to_json }}"
    ad_hoc = run(["ansible", "-i", f"inventories/{name}", host, "-m", "ansible.builtin.debug", "-a", f"msg={probe}"])
    playbook = REPO / f".probe-{uuid.uuid4().hex}.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Probe", "hosts": host, "gather_facts": False,
        "tasks": [{"name": "Show", "ansible.builtin.debug": {"msg": probe}}],
    }]))
    try:
        play = run(["ansible-playbook", "-i", f"inventories/{name}", playbook.name])
    finally:
        playbook.unlink()
    assert ad_hoc == overrides
    assert play == overrides

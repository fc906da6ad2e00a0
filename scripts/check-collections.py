#!/usr/bin/env python3
"""Lint: every collection the project uses is in requirements.yml, pinned to the installed version.

A collection is "used" where a file of the project names one of its
plugins by its full name (community.crypto.openssh_keypair, a lookup, a
filter, a callback). Only collections installed on the controller count,
so a file name such as release.tar.gz is never taken for one. Exits 1 with
one line per problem.
"""

import json
import pathlib
import re
import subprocess
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
# What the playbooks, roles, scenarios and inventories are made of.
SOURCES = ["site.yml", "ansible.cfg", "playbooks", "roles", "molecule", "inventories", "group_vars"]
SUFFIXES = {".yml", ".yaml", ".j2", ".cfg"}
FQCN = re.compile(r"\b([a-z0-9_]+)\.([a-z0-9_]+)\.[a-z0-9_]+\b")
# Part of ansible-core itself, never installed from a requirements file.
CORE = {"ansible.builtin", "ansible.legacy"}


def installed():
    """{name: version} of the collections the controller has."""
    out = subprocess.run(["ansible-galaxy", "collection", "list", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for collections in json.loads(out).values():
        for name, info in collections.items():
            found.setdefault(name, info["version"])
    return found


def used(names):
    """{collection: first file that uses it}, for the installed collections."""
    uses = {}
    for source in SOURCES:
        path = REPO / source
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
        for file in files:
            if ".venv" in file.parts or ".collections" in file.parts:
                continue
            for match in FQCN.finditer(file.read_text(errors="replace")):
                name = f"{match.group(1)}.{match.group(2)}"
                if name in names and name not in CORE:
                    uses.setdefault(name, file.relative_to(REPO))
    return uses


def main():
    versions = installed()
    listed = {entry["name"]: str(entry.get("version", ""))
              for entry in yaml.safe_load((REPO / "requirements.yml").read_text())["collections"]}
    problems = []
    for name, where in sorted(used(versions).items()):
        if name not in listed:
            problems.append(f"{name} is used ({where}) but not listed in requirements.yml")
    for name, version in sorted(listed.items()):
        if version != versions.get(name):
            problems.append(f"requirements.yml pins {name} to {version or 'nothing'!r}; "
                            f"the controller has {versions.get(name, 'none')}: pin the exact version")
    for line in problems:
        print(f"check-collections: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

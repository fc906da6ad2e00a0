#!/usr/bin/env python3
"""The raw samples of a results folder of bench.sh, in one compressed file.

Every scenario's JSON (fanout-100.json, burst.json, http-nginx-room.json, a
layout's memory.json, ...) is kept in RESULTS/samples.json.xz: one JSON object,
xz-compressed, that maps each file name to what the file held. Python reads it
without extra packages:

    python3 -c 'import json, lzma, sys; print(json.load(lzma.open(sys.argv[1]))["fanout-100.json"])' \\
        bench/results/NAME/samples.json.xz
    xzcat bench/results/NAME/samples.json.xz | less

    samples.py add RESULTS NAME.json [FILE] [--set KEY=VALUE]...
                                 store FILE's JSON object (stdin without FILE)
                                 as NAME.json, KEY=VALUE strings added to it,
                                 replacing a sample of that name
    samples.py pack DIR...       fold the loose *.json of every folder under DIR
                                 into its samples.json.xz and delete them (how
                                 the runs from before were converted)
    samples.py cat RESULTS [NAME.json]
                                 print every sample, or one
"""

import argparse
import json
import lzma
import os
import pathlib
import sys

ARCHIVE = "samples.json.xz"
# The best xz does; the samples are small, so its time does not matter.
PRESET = 9 | lzma.PRESET_EXTREME


def read_archive(folder):
    path = pathlib.Path(folder) / ARCHIVE
    if not path.exists():
        return {}
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def write_archive(folder, samples):
    """Sorted by name, one field a line: the same samples give the same bytes."""
    path = pathlib.Path(folder) / ARCHIVE
    text = json.dumps(dict(sorted(samples.items())), indent=1, ensure_ascii=False) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(text.encode("utf-8"), preset=PRESET))
    os.replace(tmp, path)


def loose(folder):
    return {p.name: json.loads(p.read_text()) for p in sorted(pathlib.Path(folder).glob("*.json"))}


def load(folder):
    """Every sample of a folder, name (without .json) -> object, by file name.

    A loose *.json (a run from before samples.json.xz, not packed yet) counts
    too and wins over an archived sample of the same name."""
    samples = read_archive(folder)
    samples.update(loose(folder))
    return {name[: -len(".json")]: samples[name] for name in sorted(samples)}


def add(folder, name, source, fields):
    if not name.endswith(".json") or "/" in name:
        sys.exit(f"a sample's name is a file name ending in .json: {name}")
    data = json.load(source)
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep:
            sys.exit(f"--set wants KEY=VALUE: {field}")
        data[key] = value
    samples = read_archive(folder)
    samples[name] = data
    write_archive(folder, samples)
    # A loose file of that name is from before: this sample replaces it.
    (pathlib.Path(folder) / name).unlink(missing_ok=True)


def pack(folder):
    folder = pathlib.Path(folder)
    found = loose(folder)
    if not found:
        return False
    samples = read_archive(folder)
    for name, data in found.items():
        if name in samples and samples[name] != data:
            sys.exit(f"{folder}/{name} differs from the one in {ARCHIVE}: resolve by hand")
        samples[name] = data
    write_archive(folder, samples)
    # Delete the loose files only once the archive reads back to the same.
    if {k: v for k, v in read_archive(folder).items() if k in found} != found:
        sys.exit(f"{folder}/{ARCHIVE} does not read back as written")
    for name in found:
        (folder / name).unlink()
    print(f"{folder}/{ARCHIVE}: {len(found)} files packed, {len(samples)} samples")
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add")
    a.add_argument("results")
    a.add_argument("name")
    a.add_argument("file", nargs="?")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p = sub.add_parser("pack")
    p.add_argument("dirs", nargs="+")
    c = sub.add_parser("cat")
    c.add_argument("results")
    c.add_argument("name", nargs="?")
    args = parser.parse_args()

    if args.command == "add":
        if args.file:
            with open(args.file) as source:
                add(args.results, args.name, source, args.set)
        else:
            add(args.results, args.name, sys.stdin, args.set)
    elif args.command == "pack":
        for root in args.dirs:
            root = pathlib.Path(root)
            if not root.is_dir():
                sys.exit(f"not a folder: {root}")
            for folder in sorted({root, *(p.parent for p in root.rglob("*.json"))}):
                pack(folder)
    else:
        samples = {f"{name}.json": data for name, data in load(args.results).items()}
        if args.name:
            if args.name not in samples:
                sys.exit(f"no sample {args.name} in {args.results}")
            samples = samples[args.name]
        json.dump(samples, sys.stdout, indent=1, ensure_ascii=False)
        print()


if __name__ == "__main__":
    main()

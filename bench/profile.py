"""Where one server process spends its time: py-spy's raw samples as tables.

    python bench/profile.py RAW [RAW_BEFORE] > profile.md

RAW is `py-spy record --gil --format raw` output (one line per distinct
stack, frames joined by ";", then the sample count). With --gil only the
thread holding the interpreter is sampled, so samples are the process's
Python time (its own threads included), not its waits. Printed: how many
samples there are (over 12 s at 200 Hz, 2,400 would be all of the time), the
work they went to (grouped by the frames below), and the functions with the
most samples of their own and in all. With RAW_BEFORE, each group's samples
before and after side by side.
"""

import collections
import sys

# The first group whose frame is in a stack takes the sample.
GROUPS = [
    ("storing posts (the writer thread)", ["_store_posts"]),
    ("database reads (reader threads)", ["_WorkItem.run"]),
    ("sending frames to the room's sockets", ["Hub._send_to", "Subscriber._drain", "Subscriber.send_now"]),
    ("Twisted writing buffered frames", ["FileDescriptor.doWrite"]),
    ("reading frames from sockets", ["dataReceived"]),
    ("the consumer's receive (parse, rate limits)", ["ChatConsumer.receive"]),
    ("the channel layer's receive (Redis pub/sub)", ["Hub._read", "_async_proxy", "PubSub", "RedisPubSubChannelLayer"]),
    ("posting (the hub: store, deliver, publish)", ["Hub._write_posts", "Hub.post", "_publish_one"]),
    ("batching a room's messages", ["Hub._flush"]),
    ("the thread hop before every event (channels' aclose_old_connections)", ["aclose_old_connections"]),
    ("waiting in epoll", ["EpollSelector.select"]),
]


def read(path):
    stacks = []
    for line in open(path, encoding="utf-8"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame):
    """'func (path/to/file.py:12)' -> 'func (to/file.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(where.split('/')[-2:])})" if where else name


def groups(stacks):
    counts = collections.Counter()
    for frames, count in stacks:
        joined = ";".join(frames)
        for name, keys in GROUPS:
            if any(key in joined for key in keys):
                counts[name] += count
                break
        else:
            counts["other"] += count
    return counts


def functions(stacks):
    own, anywhere = collections.Counter(), collections.Counter()
    for frames, count in stacks:
        names = [short(frame) for frame in frames]
        own[names[-1]] += count
        for name in set(names):
            anywhere[name] += count
    return own, anywhere


def main(path, before_path=None):
    stacks = read(path)
    total = sum(count for _, count in stacks)
    if not total:
        sys.exit(f"{path}: no samples")
    print(f"{total:,} samples of the process running Python.\n")
    counted = groups(stacks)
    if before_path:
        before = groups(read(before_path))
        before_total = sum(before.values())
        print(f"| work | samples before ({before_total:,}) | share | samples after ({total:,}) | share |")
        print("|---|---:|---:|---:|---:|")
        for name in sorted(set(counted) | set(before), key=lambda n: -(before[n] + counted[n])):
            print(f"| {name} | {before[name]:,} | {100 * before[name] / before_total:.1f} % "
                  f"| {counted[name]:,} | {100 * counted[name] / total:.1f} % |")
    else:
        print("| work | samples | share |")
        print("|---|---:|---:|")
        for name, count in counted.most_common():
            print(f"| {name} | {count:,} | {100 * count / total:.1f} % |")
    own, anywhere = functions(stacks)
    for title, counter in (("Most samples of their own", own), ("Most samples in all (callers included)", anywhere)):
        print(f"\n{title}:\n\n| function | share |\n|---|---:|")
        for name, count in counter.most_common(20):
            print(f"| `{name}` | {100 * count / total:.1f} % |")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(*sys.argv[1:])

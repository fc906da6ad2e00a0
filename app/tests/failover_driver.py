"""An app process for test_pg_failover.py: the real settings, DATABASE_URL from its environment.

Reads one JSON command per line from stdin and answers each with one line
"RESULT {json}" on stdout (the app's own log lines go there too):

    {"op": "post", "posts": [[room, nickname, body, client_id], ...]}  -> {"ok": [[seq, body, repeat], ...]}
    {"op": "health"}                                                  -> {"ok": "ok" or the check's error text}
    {"op": "set", "name": "DATABASE_FAILOVER_WAIT", "value": 2}        -> {"ok": null}

or {"error": "Class: text"}, each with "seconds", the time the call took.
"""

import json
import os
import sys
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")
django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402

from chat import health, store  # noqa: E402


def run(command):
    if command["op"] == "post":
        return [[m.seq, m.body, m.repeat] for m in store.post_messages([tuple(p) for p in command["posts"]])]
    if command["op"] == "health":
        return health.check_database()
    if command["op"] == "set":
        setattr(settings, command["name"], command["value"])
        return None
    raise ValueError(f"unknown op {command['op']!r}")


def main():
    for line in sys.stdin:
        started = time.monotonic()
        try:
            result = {"ok": run(json.loads(line))}
        except Exception as error:
            result = {"error": f"{type(error).__name__}: {error}"}
        finally:
            # As after a request: the connection goes back to the pool.
            connection.close()
        result["seconds"] = round(time.monotonic() - started, 3)
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

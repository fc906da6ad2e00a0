"""Gunicorn server hooks: the workers' metrics, summed and served by the master.

Gunicorn's workers are processes of their own, each with its own metric
values. With ``PROMETHEUS_MULTIPROC_DIR`` set (an empty directory, emptied
at each start: systemd's ``RuntimeDirectory=``), prometheus_client writes
each worker's values to files there, and the master serves their sum (gauges
as chat/metrics.py says) on ``CHAT_METRICS_LISTEN`` (ADDRESS:PORT) at
``/metrics``. The Gunicorn config names the hooks, importing this module when
they are called (from the release in the working directory)::

    def when_ready(server):
        from chatservice import gunicorn_hooks
        gunicorn_hooks.when_ready(server)

    def child_exit(server, worker):
        from chatservice import gunicorn_hooks
        gunicorn_hooks.child_exit(server, worker)

Of the app, the master imports only this module and metrics_listen.py (with
Django's exceptions module), which the workers never import: forked workers
inherit what the master imported, and a graceful reload (HUP) must give them
the new release's code.
"""

import os

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


def _multiproc_dir():
    return os.environ.get(MULTIPROC_DIR) or None


def when_ready(server):
    """In the master, once it listens: serve the summed metrics on CHAT_METRICS_LISTEN.

    A bad CHAT_METRICS_LISTEN, a PROMETHEUS_MULTIPROC_DIR that is not a
    directory, or an address that cannot be bound stop the start with one
    line (RuntimeError: Gunicorn prints it and exits with 1). Without
    PROMETHEUS_MULTIPROC_DIR the workers' values cannot be summed: nothing is
    served, and the log says why.
    """
    from django.core.exceptions import ImproperlyConfigured

    from .metrics_listen import VARIABLE as LISTEN, metrics_listen

    try:
        listen = metrics_listen()
    except ImproperlyConfigured as error:
        raise RuntimeError(str(error)) from None
    path = _multiproc_dir()
    if path is None:
        if listen is not None:
            server.log.warning("%s is set but %s is not: no metrics are served", LISTEN, MULTIPROC_DIR)
        return
    if not os.path.isdir(path):
        raise RuntimeError(f"{MULTIPROC_DIR}={path!r} is not a directory")
    if any(name.endswith(".db") for name in os.listdir(path)):
        # Files of an earlier run would be summed in: the unit's
        # RuntimeDirectory= is emptied at each start, this one was not.
        server.log.warning("%s=%s holds metric files from before this start: their values count too",
                           MULTIPROC_DIR, path)
    if listen is None:
        return
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    address, port = listen
    try:
        # A daemon thread of the master, serving scrapes one thread each.
        start_http_server(port, addr=address, registry=registry)
    except OSError as error:
        raise RuntimeError(f"cannot serve metrics on {LISTEN}={address}:{port}: {error}") from None
    server.log.info("Serving metrics at http://%s:%d/metrics",
                    f"[{address}]" if ":" in address else address, port)


def child_exit(server, worker):
    """In the master, after a worker exited: its live gauges (open sockets, release) stop counting."""
    path = _multiproc_dir()
    if path is None or not os.path.isdir(path):
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, path)

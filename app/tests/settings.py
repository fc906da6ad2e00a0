"""Settings for the test suite: the real settings plus test-only defaults.

The environment is filled in here, before chatservice.settings reads it,
because pytest-django imports settings before any conftest runs.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("SECRET_KEY", "tests-only-not-a-secret")

from chatservice.settings import *  # noqa: E402,F403
from chatservice.settings import DATABASES  # noqa: E402

# The manifest exists only after collectstatic; the real-server test covers it.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# Consumers run here in the same process as WSGI-style tests; like Daphne, do
# not keep connections, or worker threads hold them open past the test run.
DATABASES["default"]["CONN_MAX_AGE"] = 0

# Consumers reach the database from a worker thread. An in-memory SQLite
# database shares tables between threads through a shared cache whose table
# locks fail at once instead of waiting, so tests use a file. Django removes
# the file but not SQLite's -wal/-shm companions, hence a folder of its own.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    _test_db_dir = tempfile.mkdtemp(prefix="chat-tests-")
    atexit.register(shutil.rmtree, _test_db_dir, ignore_errors=True)
    DATABASES["default"]["TEST"] = {"NAME": os.path.join(_test_db_dir, "db.sqlite3")}

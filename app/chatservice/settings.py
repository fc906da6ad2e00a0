"""Settings for the chat service; every deploy-time value comes from the environment.

README.md lists each variable with its default.
"""

from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from . import dburl, pgauth
from .env import env_bool, env_float, env_host_ports, env_int, env_list, env_networks, env_str
from .layers import build_channel_layers

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set the SECRET_KEY environment variable "
            "(or DEBUG=true for local development only)."
        )
    SECRET_KEY = "django-insecure-local-development-only"
# Keys that were SECRET_KEY before a rotation: what they signed (sessions,
# signed values) still verifies, while everything new is signed with
# SECRET_KEY. Dropped once what they signed has expired.
SECRET_KEY_FALLBACKS = env_list("SECRET_KEY_FALLBACKS")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1")
if DEBUG:
    ALLOWED_HOSTS += [h for h in ("localhost", "127.0.0.1", "[::1]") if h not in ALLOWED_HOSTS]
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
# Origins (scheme://host[:port]) the site is served from: a WebSocket
# handshake must come from one of them exactly. Empty (development): any
# origin whose host is in ALLOWED_HOSTS.
PUBLIC_ORIGINS = [origin.lower().rstrip("/") for origin in env_list("PUBLIC_ORIGINS")]



def _release_id():
    """The release this code belongs to.

    A deployed release carries its id in release.env beside the code. Read
    from there rather than from the process environment, because Gunicorn's
    graceful reload (HUP) starts workers of a new release under a master
    whose environment still names the old one.
    """
    release_file = BASE_DIR / "release.env"
    if release_file.is_file():
        for line in release_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "RELEASE" and value.strip():
                return value.strip()
    return env_str("RELEASE", "dev")


RELEASE = _release_id()

INSTALLED_APPS = [
    # First, so that `manage.py runserver` serves ASGI (HTTP and WebSockets).
    "daphne",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chat",
]

MIDDLEWARE = [
    # First: counts the responses clients get (chat_http_responses_total).
    "chat.middleware.ResponseMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: a view that failed for want of a database primary answers 503.
    "chat.middleware.NoPrimaryMiddleware",
]

ROOT_URLCONF = "chatservice.urls"
WSGI_APPLICATION = "chatservice.wsgi.application"
ASGI_APPLICATION = "chatservice.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
# asgi.py sets CHAT_INTERFACE=asgi before Django starts. Under ASGI, database work
# runs in a thread pool whose threads outlive requests, so persistent connections
# would pile up per thread: they are closed after each use instead.
INTERFACE = env_str("CHAT_INTERFACE", "wsgi")
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR)))
_conn_max_age = 0 if INTERFACE == "asgi" else env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0)
DATABASES = {
    # PostgreSQL may name several hosts (chatservice/dburl.py): with
    # ?target_session_attrs=read-write, libpq connects to whichever is the
    # primary, so a failover needs no change here.
    "default": dburl.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"),
        conn_max_age=_conn_max_age,
        conn_health_checks=_conn_max_age > 0,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # Gunicorn workers and Daphne share one file: WAL lets readers run while
            # a message is written, IMMEDIATE takes the write lock when a transaction
            # starts (no lock-upgrade deadlock), and timeout waits for it.
            "init_command": "PRAGMA journal_mode=WAL;",
            "transaction_mode": "IMMEDIATE",
            # Seconds a writer waits for the lock. A sender waits that long at
            # most before it is told (store_failed): bounded, and short under
            # ASGI; longer for management commands and pages.
            "timeout": env_float("DATABASE_BUSY_TIMEOUT", 5.0 if INTERFACE == "asgi" else 20.0,
                                 minimum=0.1),
        }
    )
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A pool per process: a request or a message borrows an open connection
    # instead of opening one (and the ASGI threads keep none of their own).
    # Django's pool requires persistent connections off. With health checks
    # on, Django gives the pool psycopg's check_connection: a connection that
    # died with the server (a PostgreSQL restart) is replaced when borrowed,
    # instead of failing the next query on it.
    DATABASES["default"].update(CONN_MAX_AGE=0, CONN_HEALTH_CHECKS=True)
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env_int("DATABASE_POOL_SIZE", 4, minimum=1),
        # Waiting longer than this for a free connection is an error, not a
        # stall: with PostgreSQL down the pool has none to lend, and /healthz
        # must answer 503 within a client's patience, not after 10 s.
        "timeout": env_float("DATABASE_POOL_TIMEOUT", 3.0, minimum=0.1),
        # A connection the pool fails to open is not retried by the pool on
        # its own backoff (1, 2, 4, ... s, for 5 minutes, which would leave
        # the app without connections for seconds after a failover is
        # over); the pool opens connections when asked for one instead, at
        # the pace of chat/failover.py's wait for the primary.
        "reconnect_timeout": 0,
    }
    # During a rotation of the role's password (chatservice/pgauth.py): the
    # password the role had until now, tried when the new one is refused.
    _db_password_previous = env_str("DATABASE_PASSWORD_PREVIOUS", "")
    if _db_password_previous:
        DATABASES["default"]["OPTIONS"]["pool"]["connection_class"] = pgauth.connection_class(_db_password_previous)
_postgresql = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
# Seconds a post (DATABASE_FAILOVER_WAIT) and /healthz's database check
# (HEALTH_DATABASE_FAILOVER_WAIT) wait for a PostgreSQL primary when there is
# none (chat/failover.py): a planned switchover leaves none for 1-5 s, and
# should cost a delay, not refused posts and a failing health check. 0: no
# wait. SQLite has no failover: never.
DATABASE_FAILOVER_WAIT = env_float("DATABASE_FAILOVER_WAIT", 10.0, minimum=0.0) if _postgresql else 0.0
HEALTH_DATABASE_FAILOVER_WAIT = env_float("HEALTH_DATABASE_FAILOVER_WAIT", 5.0, minimum=0.0) if _postgresql else 0.0
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and the channel layer ----------------------------------------------
# Every Redis connection (channel layer, watchdog, rate limit, /healthz) is
# built by chatservice/redisconn.py from these.
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# HOST:PORT,HOST:PORT,... of Redis Sentinels; empty: REDIS_URL is the Redis.
# Set, the app asks them for the master of REDIS_SENTINEL_MASTER whenever it
# connects, so a failover needs no change here and no restart, and REDIS_URL
# gives only the data nodes' user, password and database number.
REDIS_SENTINELS = env_host_ports("REDIS_SENTINELS")
REDIS_SENTINEL_MASTER = env_str("REDIS_SENTINEL_MASTER").strip() or "chat"
# The sentinels' own credentials (Redis 6.2+ ACL user, or their requirepass
# with the username empty); empty: they ask for none.
REDIS_SENTINEL_USERNAME = env_str("REDIS_SENTINEL_USERNAME")
REDIS_SENTINEL_PASSWORD = env_str("REDIS_SENTINEL_PASSWORD")
CHANNEL_LAYERS = build_channel_layers()
# /healthz must answer quickly even when Redis is unreachable.
HEALTH_REDIS_TIMEOUT = env_float("HEALTH_REDIS_TIMEOUT", 2.0, minimum=0.1)
# Seconds /healthz waits for SQLite's write lock, and the free space in
# DATA_DIR below which it reports the disk as failing.
HEALTH_DATABASE_TIMEOUT = env_float("HEALTH_DATABASE_TIMEOUT", 1.0, minimum=0.0)
HEALTH_MIN_FREE_MB = env_int("HEALTH_MIN_FREE_MB", 16, minimum=0)
# Networks (comma-separated, e.g. 10.0.5.0/24,2001:db8::/64) whose requests
# through the proxy see the health endpoints' detail (release, host, server,
# database, each check's result); everyone else sees the status only.
HEALTH_DETAIL_SOURCES = env_networks("HEALTH_DETAIL_SOURCES")

# --- Chat behaviour -----------------------------------------------------------
CHAT_MAX_BODY_LENGTH = env_int("CHAT_MAX_BODY_LENGTH", 2000, minimum=1)
CHAT_RATE_PER_SECOND = env_float("CHAT_RATE_PER_SECOND", 10.0, minimum=0.001)
CHAT_RATE_BURST = env_int("CHAT_RATE_BURST", 20, minimum=1)
# Messages per second from one address (an IPv6 /64), over all its sockets,
# processes and hosts (counted in Redis); 0: no limit. 50 lets an office
# behind one NAT address chat (that is 3,000 messages a minute) and keeps
# one address from storing a thousand a second.
CHAT_MESSAGES_PER_ADDRESS_PER_SECOND = env_int("CHAT_MESSAGES_PER_ADDRESS_PER_SECOND", 50, minimum=0)
# Days a message is kept; 0: for ever. The prune runs from a timer
# (chat-manage prune_messages), not in the request path.
CHAT_MESSAGE_RETENTION_DAYS = env_int("CHAT_MESSAGE_RETENTION_DAYS", 0, minimum=0)
CHAT_HISTORY_ON_JOIN = 50
CHAT_HISTORY_PAGE = 200

# --- Static files -------------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"},
}

# --- Security behind a reverse proxy -------------------------------------------
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
USE_X_FORWARDED_HOST = False
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
# The proxy serves https only and redirects http itself; these make Django
# agree (and `check --deploy` see it). The proxy sends Strict-Transport-Security
# on every response, so the deployment passes the same values to both.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
# Preloading is a one-way request to browsers' built-in lists, an operator's
# decision rather than a deployment defect: when it is off, say so once here
# instead of in every `check --deploy`.
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Logging: everything to stdout, one line per record -------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(
        f"LOG_LEVEL={LOG_LEVEL!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL."
    )
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "line": {
            "()": "chatservice.logformat.OneLineFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        },
    },
    "filters": {
        "fold_connection_errors": {"()": "chatservice.logformat.FoldConnectionErrors"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "line",
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Django's own handlers would print a second, multi-line copy of errors.
        "django": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        # Its pub/sub reader logs a traceback per failed read while Redis is
        # away. A logger's filters see only its own records, hence each module.
        "channels_redis.pubsub": {"level": LOG_LEVEL, "filters": ["fold_connection_errors"]},
        "channels_redis.core": {"level": LOG_LEVEL, "filters": ["fold_connection_errors"]},
    },
}

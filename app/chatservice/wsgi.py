"""WSGI entry point for Gunicorn: ``chatservice.wsgi:application`` (HTTP only)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")

application = get_wsgi_application()

from django.conf import settings  # noqa: E402

from chat import metrics  # noqa: E402

metrics.set_release(settings.RELEASE, "wsgi")

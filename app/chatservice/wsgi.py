"""WSGI entry point for Gunicorn: ``chatservice.wsgi:application`` (HTTP only)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatservice.settings")

application = get_wsgi_application()

import socket

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.db import connection
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from . import failover, health
from .models import Room, is_valid_room_name

LOBBY_ROOM_COUNT = 100

# Pages answer GET and HEAD (require_safe): monitors and link checkers use HEAD.


# Rendered inside: the query runs when the template reads the rooms.
@failover.read
def _lobby(request, status=200, error="", room_input=""):
    rooms = Room.objects.filter(last_seq__gt=0).order_by("-last_activity")[:LOBBY_ROOM_COUNT]
    context = {"rooms": rooms, "error": error, "room_input": room_input}
    return render(request, "chat/lobby.html", context, status=status)


@require_safe
def lobby(request):
    return _lobby(request)


@require_safe
def enter(request):
    """Target of the lobby form: normalise the name, then go to the room."""
    room_input = request.GET.get("room", "")
    name = room_input.strip().lower()
    if not is_valid_room_name(name):
        return _lobby(
            request,
            status=400,
            error="A room name is 1-50 characters: a-z, 0-9, '_' or '-'.",
            room_input=room_input,
        )
    return redirect("chat:room", room=name)


@require_safe
def room(request, room):
    if not is_valid_room_name(room):
        raise Http404("No such room")
    context = {
        "room": room,
        "max_body_length": settings.CHAT_MAX_BODY_LENGTH,
    }
    return render(request, "chat/room.html", context)


@never_cache
@require_safe
def healthz(request):
    redis_result, redis_master = health.check_redis()
    checks = {"database": health.check_database(), "disk": health.check_disk(), "redis": redis_result}
    healthy = all(result == "ok" for result in checks.values())
    if not health.detail_allowed(request.META.get("HTTP_X_FORWARDED_FOR")):
        return JsonResponse({"status": "ok" if healthy else "fail"}, status=200 if healthy else 503)
    asgi = isinstance(request, ASGIRequest)
    payload = {
        "status": "ok" if healthy else "fail",
        "release": settings.RELEASE,
        # From the request class, so it reports the server actually in front.
        "interface": "asgi" if asgi else "wsgi",
        # gunicorn, daphne or uvicorn: which layout (chat_layout) answered.
        "server": health.server_software(asgi),
        # Which host answered: behind a web host's Nginx, any app host may.
        "host": socket.gethostname(),
        # sqlite or postgresql: which database this deployment runs on.
        "database": connection.vendor,
        "checks": checks,
    }
    if redis_master is not None:
        # Through sentinels: which master answered, so a failover is visible from outside.
        payload["redis_master"] = redis_master
    return JsonResponse(payload, status=200 if healthy else 503)

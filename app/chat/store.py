"""Storing and reading messages; synchronous, called from consumers through a thread."""

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from .models import Message, Room


def post_message(room_name, nickname, body):
    """Store a message with the room's next seq and return it.

    The UPDATE comes first: it takes the row lock on PostgreSQL (and the write
    lock on SQLite, whose transactions start IMMEDIATE here), so a concurrent
    poster waits and then increments the committed value. Reading last_seq
    first and writing it back would hand two posters the same number.
    """
    Room.objects.get_or_create(name=room_name)
    now = timezone.now()
    with transaction.atomic():
        Room.objects.filter(name=room_name).update(last_seq=F("last_seq") + 1, last_activity=now)
        room = Room.objects.get(name=room_name)
        return Message.objects.create(room=room, seq=room.last_seq, nickname=nickname, body=body)


def recent_messages(room_name, limit):
    """The last `limit` messages of a room, oldest first."""
    newest = list(
        Message.objects.filter(room__name=room_name).select_related("room").order_by("-seq")[:limit]
    )
    newest.reverse()
    return newest


def messages_since(room_name, since, limit):
    """Up to `limit` messages with seq > since, oldest first."""
    return list(
        Message.objects.filter(room__name=room_name, seq__gt=since)
        .select_related("room")
        .order_by("seq")[:limit]
    )

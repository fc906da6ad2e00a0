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


def post_messages(posts):
    """Store several (room_name, nickname, body) posts in one transaction; return them in order.

    One transaction, one connection and one seq increment per room instead of
    one of each per message: under ASGI every database call also opens a new
    connection, so a busy room's posts queue behind each other otherwise.
    Seqs are allocated as in post_message (UPDATE first), so single and
    batched posters can run side by side.
    """
    by_room = {}
    for index, (room_name, nickname, body) in enumerate(posts):
        by_room.setdefault(room_name, []).append((index, nickname, body))
    stored = [None] * len(posts)
    now = timezone.now()
    for room_name in by_room:
        Room.objects.get_or_create(name=room_name)
    with transaction.atomic():
        for room_name, entries in by_room.items():
            Room.objects.filter(name=room_name).update(
                last_seq=F("last_seq") + len(entries), last_activity=now
            )
            room = Room.objects.get(name=room_name)
            first = room.last_seq - len(entries) + 1
            messages = Message.objects.bulk_create(
                Message(room=room, seq=first + offset, nickname=nickname, body=body)
                for offset, (_, nickname, body) in enumerate(entries)
            )
            for (index, _, _), message in zip(entries, messages):
                stored[index] = message
    return stored


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

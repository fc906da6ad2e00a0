"""Storing and reading messages; synchronous, called from consumers through a thread."""

import copy

from django.conf import settings
from django.utils import timezone

from . import failover
from .models import Message, Room


def post_message(room_name, nickname, body, client_id=None):
    """Store a message with the room's next seq and return it (see post_messages)."""
    return post_messages([(room_name, nickname, body, client_id)])[0]


def post_messages(posts):
    """Store several (room_name, nickname, body[, client_id]) posts in one transaction.

    Returns the messages in the order of the posts, each with `repeat`: True
    when a message with that client_id was already stored in its room (a
    client resending a post it got no answer for, or the same post twice in
    one batch), in which case the stored message is returned and nothing new
    is written.

    One transaction and one seq increment per room instead of one of each
    per message, so a busy room's posts do not queue behind each other.

    The room's row is locked before anything is read (SELECT ... FOR UPDATE
    on PostgreSQL; SQLite's transactions start IMMEDIATE here, which takes
    the write lock), so a concurrent poster waits, then sees the committed
    seq and client ids: reading them unlocked would hand two posters the same
    seq, or store a resent post twice.

    While PostgreSQL has no primary (a failover) the whole transaction is
    tried again on a fresh connection for up to DATABASE_FAILOVER_WAIT
    seconds (chat/failover.py); a connection found read-only or broken is
    closed, so that the pool does not lend it out again. A post with a
    client_id is stored once however often it is tried; one without would
    be stored twice if a COMMIT whose outcome is unknown (the connection
    lost during it) were repeated, so a batch holding such a post is tried
    again only after failures before COMMIT.
    """
    posts = [tuple(post) + (None,) * (4 - len(post)) for post in posts]
    repeatable = all(client_id is not None for *_, client_id in posts)
    return failover.ride_through(lambda attempt: _post_messages(posts, attempt),
                                 settings.DATABASE_FAILOVER_WAIT, "write", repeatable=repeatable)


def _post_messages(posts, attempt):
    by_room = {}
    for index, (room_name, nickname, body, client_id) in enumerate(posts):
        by_room.setdefault(room_name, []).append((index, nickname, body, client_id))
    stored = [None] * len(posts)
    now = timezone.now()
    with attempt.atomic():
        for room_name, entries in by_room.items():
            try:
                room = Room.objects.select_for_update().get(name=room_name)
            except Room.DoesNotExist:
                # The room's first post: a room exists once posted to.
                # get_or_create survives another process creating it at the
                # same moment (a savepoint, then a read).
                Room.objects.get_or_create(name=room_name)
                room = Room.objects.select_for_update().get(name=room_name)
            ids = {client_id for *_, client_id in entries if client_id is not None}
            known = {m.client_id: m for m in Message.objects.filter(room=room, client_id__in=ids)} if ids else {}
            fresh, repeats, claimed = [], [], set()
            for entry in entries:
                client_id = entry[3]
                if client_id is not None and (client_id in known or client_id in claimed):
                    repeats.append(entry)
                else:
                    fresh.append(entry)
                    if client_id is not None:
                        claimed.add(client_id)
            if fresh:
                # The row is locked, so the seq read above is the latest and
                # no other poster can move it before this commits.
                first = room.last_seq + 1
                room.last_seq += len(fresh)
                room.last_activity = now
                Room.objects.filter(pk=room.pk).update(last_seq=room.last_seq, last_activity=now)
                messages = Message.objects.bulk_create(
                    Message(room=room, seq=first + offset, nickname=nickname, body=body, client_id=client_id)
                    for offset, (_, nickname, body, client_id) in enumerate(fresh)
                )
                for (index, *_), message in zip(fresh, messages):
                    message.repeat = False
                    stored[index] = message
                    if message.client_id is not None:
                        known[message.client_id] = message
            for index, *_, client_id in repeats:
                # A copy: the same message may be returned as new for one post.
                message = copy.copy(known[client_id])
                message.room = room
                message.repeat = True
                stored[index] = message
    return stored


def recent_messages(room_name, limit):
    """The last `limit` messages of a room, oldest first."""
    newest = list(
        Message.objects.filter(room__name=room_name).select_related("room").order_by("-seq")[:limit]
    )
    newest.reverse()
    return newest


def history_frame(room_name, since, limit):
    """A history frame: up to limit messages after since, and "first", the
    lowest seq the room still holds, when the messages right after since
    were pruned (the retention time), so that a client skips them."""
    messages = [m.as_frame() for m in messages_since(room_name, since, limit)]
    frame = {"type": "history", "messages": messages}
    if not messages or messages[0]["seq"] > since + 1:
        first = Message.objects.filter(room__name=room_name).order_by("seq").values_list("seq", flat=True).first()
        if first is not None and first > since + 1:
            frame["first"] = first
    return frame


def messages_since(room_name, since, limit):
    """Up to `limit` messages with seq > since, oldest first."""
    return list(
        Message.objects.filter(room__name=room_name, seq__gt=since)
        .select_related("room")
        .order_by("seq")[:limit]
    )

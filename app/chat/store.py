"""Storing and reading messages; synchronous, called from consumers through a thread."""

import copy

from django.conf import settings
from django.db import connection
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
    with attempt.atomic(), connection.cursor() as cursor:
        sql = _post_sql()
        for room_name, entries in by_room.items():
            room = _locked_room(cursor, sql, room_name)
            if room is None:
                # The room's first post: a room exists once posted to.
                # get_or_create survives another process creating it at the
                # same moment (a savepoint, then a read).
                Room.objects.get_or_create(name=room_name)
                room = _locked_room(cursor, sql, room_name)
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
                messages = _insert_messages(cursor, sql, room, first, fresh, now)
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


# The posting path's SQL, written once per database vendor. Through the ORM
# Django built the same three statements anew for every post. In the room of
# 100 that was over half of the writer thread's time, and the database's own
# work about a tenth. Written once, the thread's share of the process's Python
# fell from 33 % to 11 %, and the server's CPU per 1,000 deliveries by 12 %
# (docs/benchmark.md). Rare steps (a room's first post, looking up client
# ids) stay in the ORM.
_POST_SQL = {}


def _post_sql():
    sql = _POST_SQL.get(connection.vendor)
    if sql is None:
        name = connection.ops.quote_name
        room, message = Room._meta, Message._meta

        def column(meta, field):
            return name(meta.get_field(field).column)

        rid, seq = column(room, "id"), column(room, "last_seq")
        columns = ", ".join(column(message, field)
                            for field in ("room", "seq", "nickname", "body", "created", "client_id"))
        sql = _POST_SQL[connection.vendor] = {
            # FOR UPDATE where there is one: SQLite's IMMEDIATE transaction
            # already holds the database's write lock.
            "lock": f"SELECT {rid}, {seq} FROM {name(room.db_table)} WHERE {column(room, 'name')} = %s"
                    + (" FOR UPDATE" if connection.features.has_select_for_update else ""),
            "move": f"UPDATE {name(room.db_table)} SET {seq} = %s, {column(room, 'last_activity')} = %s "
                    f"WHERE {rid} = %s",
            "insert": f"INSERT INTO {name(message.db_table)} ({columns}) VALUES ",
            "row": "(%s, %s, %s, %s, %s, %s)",
            "returning": f" RETURNING {column(message, 'id')}, {column(message, 'seq')}",
        }
    return sql


def _locked_room(cursor, sql, room_name):
    """The room, its row locked until the transaction ends; None when there is none."""
    cursor.execute(sql["lock"], [room_name])
    row = cursor.fetchone()
    if row is None:
        return None
    room = Room(id=row[0], name=room_name, last_seq=row[1])
    room._state.adding = False
    return room


def _insert_messages(cursor, sql, room, first, fresh, now):
    """Moves the room's seq and stores the fresh entries as seqs first, first + 1, ...; returns them."""
    created = connection.ops.adapt_datetimefield_value(now)
    cursor.execute(sql["move"], [room.last_seq, created, room.id])
    params = []
    for offset, (_, nickname, body, client_id) in enumerate(fresh):
        params += [room.id, first + offset, nickname, body, created, client_id]
    cursor.execute(sql["insert"] + ", ".join([sql["row"]] * len(fresh)) + sql["returning"], params)
    # Mapped by seq: SQLite does not promise RETURNING's rows in the order inserted.
    ids = {seq: id_ for id_, seq in cursor.fetchall()}
    messages = []
    for offset, (_, nickname, body, client_id) in enumerate(fresh):
        message = Message(id=ids[first + offset], room=room, seq=first + offset, nickname=nickname, body=body,
                          created=now, client_id=client_id)
        message._state.adding = False
        messages.append(message)
    return messages


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

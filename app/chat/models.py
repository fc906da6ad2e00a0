import re

from django.db import models

# A room name is a slug: 1-50 characters of lower-case ASCII letters, digits,
# "_" and "-". It is part of URLs and Redis group names, so it stays that plain.
ROOM_NAME_RE = re.compile(r"^[a-z0-9_-]{1,50}$")


def is_valid_room_name(name):
    return isinstance(name, str) and ROOM_NAME_RE.fullmatch(name) is not None


class Room(models.Model):
    name = models.CharField(max_length=50, unique=True)
    created = models.DateTimeField(auto_now_add=True)
    # The highest seq handed out in this room. Messages are never deleted, so it
    # is also the room's message count.
    last_seq = models.PositiveBigIntegerField(default=0)
    last_activity = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Message(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    # Per-room sequence number, 1, 2, 3, ... without gaps: clients use it to see
    # that they missed a message and to ask for exactly the missing ones.
    seq = models.PositiveBigIntegerField()
    nickname = models.CharField(max_length=32)
    body = models.TextField()
    created = models.DateTimeField(auto_now_add=True)
    # The id the posting client gave the message (its idempotency key): a
    # client that resends a post it got no answer for (its socket dropped)
    # gets the stored message back instead of a second copy. None: the client
    # gave none, and nothing is deduplicated.
    client_id = models.CharField(max_length=64, null=True, blank=True)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="chat_message_room_seq_unique"),
            # Partial: posts without an id are not deduplicated (and on SQLite
            # a partial index is added in place, without copying the table).
            models.UniqueConstraint(fields=["room", "client_id"], condition=models.Q(client_id__isnull=False),
                                    name="chat_message_room_client_id_unique"),
        ]

    def __str__(self):
        return f"{self.room.name}#{self.seq} {self.nickname}"

    def as_frame(self):
        """The message as sent to clients, live and in history frames."""
        return {
            "type": "message",
            "id": self.id,
            "seq": self.seq,
            "room": self.room.name,
            "nickname": self.nickname,
            "body": self.body,
            "created": self.created.isoformat(),
            "client_id": self.client_id,
        }

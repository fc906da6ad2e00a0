"""The retention time: chat-manage prune_messages, and history saying where a room starts."""

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from chat import store
from chat.models import Message, Room

pytestmark = pytest.mark.django_db


def post(room, count):
    return [store.post_message(room, "n", f"b{n}") for n in range(count)]


def age(room, seqs, days):
    Message.objects.filter(room__name=room, seq__in=seqs).update(created=timezone.now() - timedelta(days=days))


def test_prune_deletes_only_messages_older_than_the_retention(capsys):
    post("kept", 5)
    post("pruned", 5)
    age("pruned", [1, 2, 3], days=40)
    age("kept", [1], days=10)
    call_command("prune_messages", days=30)
    assert "deleted 3 messages" in capsys.readouterr().out
    assert list(Message.objects.filter(room__name="pruned").values_list("seq", flat=True)) == [4, 5]
    assert Message.objects.filter(room__name="kept").count() == 5
    # The room's seq goes on where it was: the next message is 6, not 3.
    assert Room.objects.get(name="pruned").last_seq == 5
    assert post("pruned", 1)[0].seq == 6


def test_prune_takes_its_retention_from_the_settings(settings):
    post("room", 2)
    age("room", [1], days=3)
    settings.CHAT_MESSAGE_RETENTION_DAYS = 2
    call_command("prune_messages")
    assert list(Message.objects.filter(room__name="room").values_list("seq", flat=True)) == [2]


def test_prune_without_a_retention_refuses(settings):
    settings.CHAT_MESSAGE_RETENTION_DAYS = 0
    with pytest.raises(CommandError, match="no retention time"):
        call_command("prune_messages")


def test_history_names_the_first_seq_after_a_prune():
    post("room", 6)
    age("room", [1, 2, 3], days=40)
    call_command("prune_messages", days=30)
    history = store.history_frame("room", 1, 200)
    assert history["first"] == 4
    assert [m["seq"] for m in history["messages"]] == [4, 5, 6]
    # Nothing pruned right after since: no "first".
    assert "first" not in store.history_frame("room", 4, 200)

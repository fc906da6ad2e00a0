"""The retention time: a daily timer deletes messages older than chat_message_retention_days.

The cluster runs staging's inventory (30 days): the timer is there, and its
service, started now, deletes a message made 40 days old and keeps a new
one. The default scenario runs local's (no retention): no timer.
"""

import json
import shlex
import uuid

import pytest

from clients import inventory_value

UNIT = "chat-prune-messages"


@pytest.fixture(scope="module")
def retention_days(host):
    return int(inventory_value(host.backend.get_hostname(), "chat_app_message_retention_days"))


def manage(host, code):
    """Runs Python in the app's Django shell on the host; its last line of output, as JSON."""
    return json.loads(host.check_output(f"chat-manage shell -c {shlex.quote(code)}").splitlines()[-1])


@pytest.mark.needs("app")
def test_old_messages_are_deleted_by_the_daily_timer_and_new_ones_kept(host, retention_days):
    if retention_days == 0:
        assert not host.file(f"/etc/systemd/system/{UNIT}.timer").exists, "a prune timer without a retention time"
        return
    timer = host.service(f"{UNIT}.timer")
    assert timer.is_enabled and timer.is_running
    room = f"retention-{uuid.uuid4().hex[:8]}"
    seqs = manage(host, (
        "import json, datetime; from django.utils import timezone; from chat import store; "
        "from chat.models import Message; "
        f"old = store.post_message({room!r}, 'old', 'from long ago'); "
        f"new = store.post_message({room!r}, 'new', 'from today'); "
        "Message.objects.filter(id=old.id).update("
        f"created=timezone.now() - datetime.timedelta(days={retention_days + 10})); "
        "print(json.dumps([old.seq, new.seq]))"))
    host.run_expect([0], f"systemctl start {UNIT}.service")
    left = manage(host, (
        "import json; from chat.models import Message; "
        f"print(json.dumps(list(Message.objects.filter(room__name={room!r}).values_list('seq', flat=True))))"))
    assert left == [seqs[1]], f"stored {seqs}, left after the prune {left}"
    assert "deleted" in host.check_output(f"journalctl -u {UNIT}.service -n 20 -o cat")

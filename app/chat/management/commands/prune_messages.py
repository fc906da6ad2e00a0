"""chat-manage prune_messages: delete messages older than the retention time.

Run daily by chat-prune-messages.timer where chat_app_message_retention_days is set.
Each room's seq goes on where it was (Room.last_seq is never lowered), so a
client's seqs stay unique and increasing; a history frame names the first
seq the room still holds ("first"), and the page takes what lies below it
as gone, not missing.
"""

from datetime import timedelta

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from chat.models import Message

# Rows deleted per transaction: short transactions, so posts are never held
# up for long by the prune (SQLite has one writer at a time).
BATCH = 2000


class Command(BaseCommand):
    help = "Delete messages older than CHAT_MESSAGE_RETENTION_DAYS (or --days)."

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=None,
                            help="keep this many days (default: CHAT_MESSAGE_RETENTION_DAYS)")

    def handle(self, *args, days=None, **options):
        days = settings.CHAT_MESSAGE_RETENTION_DAYS if days is None else days
        if days <= 0:
            raise CommandError("no retention time: set CHAT_MESSAGE_RETENTION_DAYS or --days to 1 or more")
        cutoff = timezone.now() - timedelta(days=days)
        deleted = 0
        while True:
            ids = list(Message.objects.filter(created__lt=cutoff).order_by("id").values_list("id", flat=True)[:BATCH])
            if not ids:
                break
            deleted += Message.objects.filter(id__in=ids).delete()[0]
        self.stdout.write(f"deleted {deleted} messages older than {days} days (before {cutoff.isoformat()})")

"""A log formatter that keeps every record on one line.

journald and most log shippers split on newlines, so a multi-line traceback
would otherwise arrive as unrelated records.
"""

import logging


class OneLineFormatter(logging.Formatter):
    def format(self, record):
        return super().format(record).replace("\r", "").replace("\n", " \\n ")

"""A log formatter that keeps every record on one line.

journald and most log shippers split on newlines, so a multi-line traceback
would otherwise arrive as unrelated records.
"""

import logging


class OneLineFormatter(logging.Formatter):
    def format(self, record):
        return super().format(record).replace("\r", "").replace("\n", " \\n ")


class FoldConnectionErrors(logging.Filter):
    """Turns a library's traceback per failed Redis read into a line now and then.

    channels_redis' pub/sub reader logs a full traceback each time a read
    fails, about once a second while Redis is away: a storm in the journal
    that says nothing new. A record whose exception is a connection error
    becomes one line without the traceback, and at most one such line per
    logger passes every `every` seconds. Other records pass untouched.
    """

    def __init__(self, every=30.0):
        super().__init__()
        self.every = float(every)
        self._last = {}

    @staticmethod
    def _is_connection_error(error):
        import redis.exceptions  # noqa: PLC0415 (logging is configured before apps load)

        return isinstance(error, (OSError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not self._is_connection_error(error):
            return True
        last = self._last.get(record.name)
        if last is not None and record.created - last < self.every:
            return False
        self._last[record.name] = record.created
        record.msg = f"{record.getMessage()}: {type(error).__name__}: {error} (repeats folded for {self.every:g} s)"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True

"""Django middleware of the chat."""

import logging

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpResponse

from . import failover, metrics

log = logging.getLogger(__name__)

# What a page asked while PostgreSQL has no primary gets once its wait
# (DATABASE_FAILOVER_WAIT) is over: the database is coming back, so not a
# 500 that says the app is broken; browsers and probes may ask again.
NO_PRIMARY_RETRY_AFTER = 5


class ResponseMetricsMiddleware:
    """Counts every HTTP response by status class (chat_http_responses_total).

    First in MIDDLEWARE, so it sees the response the client gets: the other
    middlewares' own answers (redirects, a refused Host) and a view's error
    turned into a 500 included. Sync and async alike, so that under ASGI
    it adds no thread hop.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.async_mode:
            return self.__acall__(request)
        response = self.get_response(request)
        metrics.http_response(response.status_code)
        return response

    async def __acall__(self, request):
        response = await self.get_response(request)
        metrics.http_response(response.status_code)
        return response


class NoPrimaryMiddleware:
    """Answers 503 with Retry-After, not 500, when a view failed for want of
    a PostgreSQL primary (a failover still under way after the view's wait:
    chat/failover.py). Any other error stays Django's own 500. Sync and
    async alike (no thread hop under ASGI)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not failover.no_primary(exception):
            return None
        log.warning("database: %s %s answered 503, no primary yet: %s", request.method, request.path,
                    f"{type(exception).__name__}: {exception}"[:200])
        response = HttpResponse("The chat's database is changing hosts; try again in a few seconds.\n",
                                status=503, content_type="text/plain; charset=utf-8")
        response["Retry-After"] = str(NO_PRIMARY_RETRY_AFTER)
        return response

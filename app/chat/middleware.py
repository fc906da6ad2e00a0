"""Django middleware of the chat."""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from . import metrics


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

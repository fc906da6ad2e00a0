"""Gunicorn's uvicorn worker with the chat's WebSocket settings (the uvicorn layout).

    gunicorn --worker-class chatservice.uvicorn_worker.ChatUvicornWorker chatservice.asgi:application

uvicorn-worker's own class runs uvicorn with uvicorn's defaults: WebSocket
messages up to 16 MiB and a lifespan probe that Django answers with an error
at every start. This one takes the limits the Daphne instances have
(`daphne_*` in the deployment), so that a layout does not change what a
client may send, from the service's environment:

- ``CHAT_WS_MAX_MESSAGE_SIZE`` (32768): a larger message closes the socket
  with 1009 before it is parsed;
- ``CHAT_WS_PING_INTERVAL`` (20) and ``CHAT_WS_PING_TIMEOUT`` (30) seconds.
"""

from uvicorn_worker import UvicornWorker

from .env import env_float, env_int


class ChatUvicornWorker(UvicornWorker):
    CONFIG_KWARGS = {
        **UvicornWorker.CONFIG_KWARGS,
        "lifespan": "off",
        "ws_max_size": env_int("CHAT_WS_MAX_MESSAGE_SIZE", 32768, minimum=1024),
        "ws_ping_interval": env_float("CHAT_WS_PING_INTERVAL", 20.0, minimum=1),
        "ws_ping_timeout": env_float("CHAT_WS_PING_TIMEOUT", 30.0, minimum=1),
    }

"""gunicorn's worker for the ASGI app (the Dockerfile's `-k datacollector.workers.UvicornWorker`)."""

from typing import Any

import uvicorn_worker


class UvicornWorker(uvicorn_worker.UvicornWorker):
    """uvicorn's gunicorn worker with the WebSocket options of `make run`.

    Messages of the live hub (/ws) are a few hundred bytes, written to every subscribed socket:
    permessage-deflate would compress each one once per socket (a third of the hub's CPU per push,
    `python -m benchmarks hub`) to save a hundred bytes of each. The sans-I/O websockets protocol is the
    one the hub is measured and tested with.
    """

    CONFIG_KWARGS: dict[str, Any] = {
        **uvicorn_worker.UvicornWorker.CONFIG_KWARGS,
        "ws": "websockets-sansio",
        "ws_per_message_deflate": False,
    }

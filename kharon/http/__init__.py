"""The HTTP API: an ASGI app (FastAPI) over one `Kharon` instance."""

from kharon.http._app import DEFAULT_MAX_BODY_SIZE, create_app

__all__ = ["DEFAULT_MAX_BODY_SIZE", "create_app"]

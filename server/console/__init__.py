"""The operator console: a FastAPI app over the run store, with its page vendored in static/."""

from consortia.server.console.app import create_app, serve
from consortia.server.console.auth import ConsoleToken, TokenError, default_token_file

__all__ = ["ConsoleToken", "TokenError", "create_app", "default_token_file", "serve"]

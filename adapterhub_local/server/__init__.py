"""Interface layer: the OpenAI-compatible HTTP server over the inference engine (``adapterhub serve``)."""

from adapterhub_local.server.app import create_app
from adapterhub_local.server.state import ServerConfig

__all__ = ["ServerConfig", "create_app"]

"""Process-wide compute settings: how many CPU threads torch uses.

One place decides the thread count for every compute command (``--threads`` or
``$ADAPTERHUB_THREADS``), so that the CLI, the trainer, the sweep and the server agree.
"""

from __future__ import annotations

import os

import torch

from adapterhub_local.errors import ConfigError

THREADS_ENV = "ADAPTERHUB_THREADS"


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count from ``threads`` or ``$ADAPTERHUB_THREADS``; return the count in use.

    ``None`` with no environment variable keeps torch's default.
    """
    if threads is None:
        raw = os.environ.get(THREADS_ENV, "").strip()
        if raw:
            try:
                threads = int(raw)
            except ValueError:
                raise ConfigError([f"${THREADS_ENV}={raw!r} is not an integer"],
                                  "set it to a thread count such as 2", what="environment") from None
    if threads is not None:
        if threads < 1:
            raise ConfigError([f"--threads must be at least 1 (got {threads})"], "pass a positive thread count",
                              what="options")
        torch.set_num_threads(threads)
    return torch.get_num_threads()

"""A real S3-compatible server for the object-store tests: moto's server (the same WSGI app and request
handler ``ThreadedMotoServer`` runs), started on a free port in a background thread.

It is served **one request at a time** (``threaded=False``). moto checks ``If-None-Match: *`` and then
stores the object as two steps in Python, so with concurrent request threads two conditional creates of
one key could both pass the check; S3 itself makes the create atomic. Serialising requests gives the
test server S3's atomicity, so the concurrency tests check our protocol, not moto's race.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Run the server; yields its endpoint URL."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=False,
                         request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def environment(endpoint: str) -> dict[str, str]:
    """The variables that point s3fs (and so ``--registry s3://…``) at the test server."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


def new_bucket(endpoint: str) -> str:
    """Create a bucket with a fresh name; returns the name."""
    name = f"reg-{uuid.uuid4().hex[:12]}"
    filesystem(endpoint).mkdir(name)
    return name


def filesystem(endpoint: str) -> Any:
    import s3fs

    os.environ.update(CREDENTIALS)
    return s3fs.S3FileSystem(use_listings_cache=False,
                             client_kwargs={"endpoint_url": endpoint})

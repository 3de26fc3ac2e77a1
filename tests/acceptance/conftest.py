"""Fixtures shared by the acceptance tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

# What the local file server answers to every GET: download tasks fetch it.
DOWNLOAD_BODY = b"throttled bytes\n" * 64


class _FileHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(DOWNLOAD_BODY)))
        self.end_headers()
        self.wfile.write(DOWNLOAD_BODY)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


@pytest.fixture
def file_server() -> Iterator[str]:
    """A local HTTP server for download tasks; yields the URL of its one file."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/file.txt"
    server.shutdown()
    server.server_close()

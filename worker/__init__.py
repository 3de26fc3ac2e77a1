"""The ARQ worker: runs the catalog's tasks and records every outcome in the database."""

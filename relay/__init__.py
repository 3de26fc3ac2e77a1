"""The relay: moves admitted tasks from the SQL outbox into ARQ (`python -m relay`)."""

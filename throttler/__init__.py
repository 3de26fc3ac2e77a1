"""Shared core of ARQ Task Throttler: settings, database, models, outbox and throttle."""

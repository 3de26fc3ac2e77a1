"""Measurements run by hand (``python -m bench.intake``), never by the test suite."""

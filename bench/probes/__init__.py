"""Probes: small scripts that print one figure each (``python -m bench.probes.NAME``)."""

"""Small reproducible probes: one figure each, measured on this or another checkout."""

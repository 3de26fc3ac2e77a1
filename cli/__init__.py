"""``throttler``: a command line for the REST API (submit, list, cancel, limits, top)."""

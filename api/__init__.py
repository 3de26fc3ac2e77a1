"""The REST intake: accepts tasks into the outbox and reports their progress."""

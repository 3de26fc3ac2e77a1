"""One router per resource: tasks and health."""

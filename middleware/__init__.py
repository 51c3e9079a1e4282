"""ASGI middleware that gives every request its own ambient scope."""

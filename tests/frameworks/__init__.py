"""Example apps: the middleware in each framework's own idiom, importable as ``module:app``."""

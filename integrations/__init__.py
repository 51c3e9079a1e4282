"""Integrations of ambient with frameworks, databases, transports and telemetry.

Each module is a leaf that imports its third-party library at the top; install the matching
extra (``pip install 'ambient-context[psycopg]'``) before importing it.
"""

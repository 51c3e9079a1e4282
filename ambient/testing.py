"""Pytest plugin and helpers for testing applications built on ambient.

Registered through the ``pytest11`` entry point, so its fixtures are available in every
project that installs ``ambient-context``.
"""

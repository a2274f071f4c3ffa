"""Integrations of tidings with other frameworks, each behind its own extra."""

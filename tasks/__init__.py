"""Prefect tasks: thin wrappers that add retries, caching and logging to package functions.

They take and return paths (as strings) and small JSON-able values only; the
resolved configuration travels as its JSON dump so it is part of every cache key.
"""

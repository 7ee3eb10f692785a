"""Prefect flows of the factory: ``factory`` (one dataset version) and ``gpu_stage``."""

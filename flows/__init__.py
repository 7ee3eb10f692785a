"""Prefect flows of the factory: ``factory`` (one dataset version) and the GPU flows
``category`` and ``detect`` (``flows/gpu.py``)."""

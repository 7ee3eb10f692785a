"""anomaly-factory: synthetic, versioned, quality-gated anomaly datasets.

>>> import anomaly_factory
>>> anomaly_factory.__version__
'0.1.0'
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_dataset"]


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    """Stream a published dataset version as a ``webdataset.WebDataset``.

    See :func:`anomaly_factory.storage.consume.load_dataset`; imported lazily so
    that ``import anomaly_factory`` stays light.
    """
    from anomaly_factory.storage.consume import load_dataset as _load

    return _load(*args, **kwargs)

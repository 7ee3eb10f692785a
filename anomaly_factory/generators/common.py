"""What every generator shares: its seeding scheme, its device, and manifest paths.

One seeding scheme for all generators: pair ``i`` of (category, type) gets
``pair_seed(section_seed, category, anomaly_type, i)``, where ``section_seed`` is the
``seed`` of the generator's own config section. The seed depends on nothing else (not
on ``n_pairs``, not on the batch), so a resumed run draws exactly what an uninterrupted
one would, and every random choice of the pair (its normal image, reference, noise) is
drawn from ``numpy.random.default_rng(seed)`` or ``torch.Generator().manual_seed(seed)``.

>>> pair_seed(0, "nut", "crack", 3) == pair_seed(0, "nut", "crack", 3)
True
>>> len({pair_seed(0, "nut", "crack", i) for i in range(100)})
100
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from anomaly_factory.config import ModelSection


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, names, indices), stable across runs and machines."""
    text = json.dumps([str(p) for p in parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def pair_seed(section_seed: int, category: str, anomaly_type: str, index: int) -> int:
    """The seed of pair ``index`` of (category, type): the one seeding scheme."""
    return derive_seed(section_seed, category, anomaly_type, index)


def resolve_device(model: ModelSection) -> torch.device:
    """``auto`` picks CUDA when present; an explicit ``cuda`` without a GPU is an error."""
    import torch

    from anomaly_factory.errors import InfrastructureError

    if model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model.device == "cuda" and not torch.cuda.is_available():
        raise InfrastructureError("model.device: 'cuda' requested but no CUDA device is available")
    return torch.device(model.device)


def resolve_dtype(model: ModelSection, device: torch.device) -> torch.dtype:
    """Half precision only on GPU: CPU kernels for fp16 convolutions are slow or missing."""
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    return dtypes[model.dtype] if device.type == "cuda" else torch.float32


def resolve_path(path: str, manifest_path: Path | None) -> Path:
    """A manifest path, relative paths taken against the manifest's folder if not found as is."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and manifest_path is not None:
        alt = Path(manifest_path).parent / p
        if alt.exists():
            return alt
    return p

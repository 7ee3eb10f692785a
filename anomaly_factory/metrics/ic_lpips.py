"""Intra-cluster LPIPS, the papers' diversity score (CONTEXT §3, "IC-LPIPS").

Per anomaly type: assign every generated image to its nearest few-shot training
anomaly image by LPIPS; within each cluster take the first ``max_per_cluster``
members (in pair-key order) and average LPIPS over all their pairs; average over
clusters (those with at least 2 members), then over types.

The distance is the ``lpips`` package's. The paper profile uses LPIPS-VGG at
256 px with ImageNet trunk weights (a local file or the torch hub cache, never
downloaded here). Offline profiles use a seeded random trunk with the package's
bundled linear layers; the output's ``backbone`` label says which.

>>> d = np.array([[0, .2, .4], [.2, 0, .6], [.4, .6, 0]])
>>> round(ic_lpips_from_distances(np.array([0, 0, 0]), lambda i, j: d[i, j], 50).score, 6)
0.4
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from anomaly_factory.metrics.features import as_rgb, resize, sha256_state_dict

MIN_CLUSTER = 2  # a mean pairwise distance needs one pair
BATCH = 32
# torchvision's file names of the ImageNet trunks (their hash prefixes are in the name)
TRUNK_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class LPIPSError(ValueError):
    """The LPIPS network cannot be built offline as configured."""


@dataclass
class ICLPIPSResult:
    score: float  # mean over clusters with >= 2 members; NaN when none
    cluster_sizes: list[int]  # members per few-shot image (before the cap)
    cluster_scores: list[float | None] = field(default_factory=list)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["score"] = self.score if math.isfinite(self.score) else None
        return d


def ic_lpips_from_distances(
    assignment: np.ndarray,
    distance: Callable[[int, int], float],
    max_per_cluster: int,
    n_clusters: int | None = None,
) -> ICLPIPSResult:
    """IC-LPIPS from cluster assignments and a pairwise distance between generated images."""
    if n_clusters is None:
        n_clusters = int(assignment.max()) + 1 if len(assignment) else 0
    sizes, scores = [], []
    for c in range(n_clusters):
        members = np.flatnonzero(assignment == c)
        sizes.append(len(members))
        kept = members[:max_per_cluster]
        if len(kept) < MIN_CLUSTER:
            scores.append(None)
            continue
        scores.append(float(np.mean([distance(int(i), int(j)) for i, j in combinations(kept, 2)])))
    used = [s for s in scores if s is not None]
    note = "" if used else f"no cluster has >= {MIN_CLUSTER} generated images"
    return ICLPIPSResult(float(np.mean(used)) if used else math.nan, sizes, scores, note)


# --------------------------------------------------------------------------- network
def _trunk_weights(net: str, weights: Path | None) -> Path:
    import torch

    if weights is not None:
        if not Path(weights).is_file():
            raise LPIPSError(f"gates.lpips.weights: {weights} does not exist")
        return Path(weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TRUNK_FILES[net]
    if cached.is_file():
        return cached
    raise LPIPSError(
        f"LPIPS-{net} with pretrained=true needs torchvision's {TRUNK_FILES[net]}: not found at "
        f"{cached} and gates.lpips.weights is unset. Copy it there from a connected machine, "
        "or set gates.lpips.pretrained: false (random trunk; not comparable with papers)."
    )


def _load_trunk(model: Any, path: Path) -> None:
    """Copy torchvision ``features.<i>.*`` weights into lpips' ``net.slice<k>.<i>.*``."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    where = {}
    for sname, sl in model.net.named_children():
        for idx in sl._modules:
            where[idx] = sname
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1] in where:
            mapped[f"{where[parts[1]]}.{parts[1]}.{'.'.join(parts[2:])}"] = value
    missing, _ = model.net.load_state_dict(mapped, strict=False)
    if missing:
        raise LPIPSError(f"{path}: trunk weights lack {missing[:5]} for LPIPS-{model.pnet_type}")


def load_lpips(
    net: str, pretrained: bool, weights: Path | None, seed: int = 0, device: str = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """An LPIPS module that never downloads, and the label of what it is."""
    import warnings

    import lpips
    import torch

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # lpips calls torchvision's deprecated pretrained=False; nothing is downloaded
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        torch.manual_seed(seed)
        # pnet_rand=True: lpips would otherwise ask torchvision to download the trunk.
        # pretrained=True loads only the linear layers bundled inside the lpips package.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if pretrained:
        path = _trunk_weights(net, weights)
        _load_trunk(model, path)
        trunk = f"imagenet ({path.name})"
    else:
        trunk = f"RANDOM_INIT seed {seed} (not pretrained)"
    model = model.to(device).eval()
    label = {
        "backbone": f"lpips={net}, pretrained={pretrained}",
        "net": net,
        "trunk": trunk,
        "linear_layers": f"lpips v{model.version} bundled",
        "weights_sha256": sha256_state_dict(model.state_dict()),
    }
    return model, label


# --------------------------------------------------------------------------- images
def to_tensor(images: Sequence[np.ndarray], resolution: int) -> Any:
    """uint8 HxWx3 images -> float N x 3 x R x R in [-1, 1] (LPIPS input range)."""
    import torch

    arr = np.stack([resize(as_rgb(im), resolution) for im in images]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def lpips_pairs(model: Any, a: Any, b: Any) -> np.ndarray:
    """LPIPS between rows of ``a`` and ``b`` (same length), batched."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(a), BATCH):
            d = model(a[s : s + BATCH].to(device), b[s : s + BATCH].to(device))
            out.append(d.reshape(-1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def ic_lpips(
    model: Any,
    generated: Sequence[np.ndarray],
    fewshot: Sequence[np.ndarray],
    resolution: int,
    max_per_cluster: int,
) -> ICLPIPSResult:
    """IC-LPIPS of one anomaly type (generated images in pair-key order)."""
    if not fewshot or not generated:
        return ICLPIPSResult(math.nan, [], [], "no generated or no few-shot images")
    gen = to_tensor(generated, resolution)
    shots = to_tensor(fewshot, resolution)
    n_gen, n_shot = len(gen), len(shots)
    to_shot = np.stack(
        [
            lpips_pairs(model, gen, shots[f : f + 1].expand(n_gen, -1, -1, -1))
            for f in range(n_shot)
        ],
        axis=1,
    )
    assignment = to_shot.argmin(axis=1)
    pairs = []
    for c in range(n_shot):
        kept = np.flatnonzero(assignment == c)[:max_per_cluster]
        pairs.extend(combinations(kept.tolist(), 2))
    values = {}
    if pairs:
        ia, ib = (list(x) for x in zip(*pairs, strict=True))
        values = dict(zip(pairs, lpips_pairs(model, gen[ia], gen[ib]).tolist(), strict=True))
    return ic_lpips_from_distances(assignment, lambda i, j: values[(i, j)], max_per_cluster, n_shot)

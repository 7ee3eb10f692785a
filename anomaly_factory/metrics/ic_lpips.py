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

from anomaly_factory.errors import InputError
from anomaly_factory.metrics.features import as_rgb, resize, sha256_state_dict

MIN_CLUSTER = 2  # a mean pairwise distance needs one pair
BATCH = 32
# torchvision's file names of the ImageNet trunks (their hash prefixes are in the name)
TRUNK_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class LPIPSError(InputError):
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


# LPIPS(x, y) runs the trunk on x and on y, then compares the unit-normalised layers
# through the linear heads. IC-LPIPS compares each generated image with every few-shot
# image and with up to ``max_per_cluster - 1`` cluster mates, so running the trunk per
# pair repeats each image's trunk pass up to ~50 times (bench/gates.py: 7x slower). Below,
# the trunk runs once per image and only the heads run per pair, with the operations and
# pair batches of ``lpips.LPIPS.forward``. On CPU a convolution's result for one image
# does not depend on the other images in its batch, but a batch of ONE takes another
# oneDNN kernel whose last bits differ; so trunk batches of one are padded to two, except
# where ``lpips_pairs`` itself ran a batch of one (``alone``). The distances are then
# bit-identical to ``lpips_pairs`` (checked by bench/gates.py).
def _check_plain_lpips(model: Any) -> None:
    if not model.lpips or model.spatial or model.version != "0.1":
        raise LPIPSError("feature-cached LPIPS needs lpips=True, spatial=False, version 0.1")


def lpips_features(model: Any, images: Any, alone: bool = False) -> list[Any]:
    """Unit-normalised trunk layers of ``images`` (N x 3 x R x R in [-1, 1]), batched.

    ``alone`` runs every image in a batch of its own (what ``lpips_pairs`` does for a
    last batch of one pair); otherwise no trunk batch holds a single image.
    """
    import lpips
    import torch

    _check_plain_lpips(model)
    device = next(model.parameters()).device
    step = 1 if alone else BATCH
    layers: list[list[Any]] = [[] for _ in range(model.L)]
    with torch.no_grad():
        for s in range(0, len(images), step):
            x = images[s : s + step].to(device)
            m = len(x)
            if m == 1 and not alone:
                x = torch.cat([x, x])
            outs = model.net.forward(model.scaling_layer(x))
            for kk in range(model.L):
                layers[kk].append(lpips.normalize_tensor(outs[kk])[:m])
    return [torch.cat(parts) for parts in layers]


def lpips_from_features(model: Any, fa: list[Any], fb: list[Any]) -> np.ndarray:
    """LPIPS between rows of two feature sets from ``lpips_features`` (same length)."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(fa[0]), BATCH):
            val = 0
            for kk in range(model.L):
                diff = (fa[kk][s : s + BATCH] - fb[kk][s : s + BATCH]) ** 2
                val += model.lins[kk](diff).mean([2, 3], keepdim=True)
            out.append(val.reshape(-1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _rows(features: list[Any], idx: Any) -> list[Any]:
    return [layer[idx] for layer in features]


def _distances_to_shots(model: Any, gen: Any, shots: Any) -> np.ndarray:
    """n_gen x n_shot LPIPS, one trunk pass per generated image."""
    n_gen, n_shot = len(gen), len(shots)
    shot_feats = {False: lpips_features(model, shots)}
    out = np.zeros((n_gen, n_shot))
    for s in range(0, n_gen, BATCH):
        m = len(gen[s : s + BATCH])
        alone = m == 1
        if alone not in shot_feats:
            shot_feats[alone] = lpips_features(model, shots, alone)
        chunk = lpips_features(model, gen[s : s + BATCH], alone)
        for f in range(n_shot):
            shot = [layer[f : f + 1].expand(m, *layer.shape[1:]) for layer in shot_feats[alone]]
            out[s : s + m, f] = lpips_from_features(model, chunk, shot)
    return out


def _distances_of_pairs(model: Any, gen: Any, pairs: list[tuple[int, int]]) -> np.ndarray:
    """LPIPS of index pairs of ``gen``, in order; each image's trunk runs once.

    Features are kept from an image's first pair batch to its last, so memory holds
    about one cluster's images (pairs come grouped by cluster).
    """
    import torch

    batches = [pairs[s : s + BATCH] for s in range(0, len(pairs), BATCH)]
    last_use = {i: b for b, batch in enumerate(batches) for pair in batch for i in pair}
    cache: dict[int, list[Any]] = {}
    out = []
    for b, batch in enumerate(batches):
        if len(batch) == 1:
            (i, j), *_ = batch
            fa, fb = (lpips_features(model, gen[[k]], alone=True) for k in (i, j))
            out.append(lpips_from_features(model, fa, fb))
            continue
        missing = sorted({i for pair in batch for i in pair} - cache.keys())
        if missing:
            feats = lpips_features(model, gen[missing])
            cache.update({i: _rows(feats, slice(k, k + 1)) for k, i in enumerate(missing)})
        fa, fb = (
            [torch.cat(layer) for layer in zip(*(cache[p[side]] for p in batch), strict=True)]
            for side in (0, 1)
        )
        out.append(lpips_from_features(model, fa, fb))
        for i in [i for i in cache if last_use[i] == b]:
            del cache[i]
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
    n_shot = len(shots)
    assignment = _distances_to_shots(model, gen, shots).argmin(axis=1)
    pairs = []
    for c in range(n_shot):
        kept = np.flatnonzero(assignment == c)[:max_per_cluster]
        pairs.extend(combinations(kept.tolist(), 2))
    values = dict(zip(pairs, _distances_of_pairs(model, gen, pairs).tolist(), strict=True))
    return ic_lpips_from_distances(assignment, lambda i, j: values[(i, j)], max_per_cluster, n_shot)

"""Supervised localization with DRAEM's discriminative network (CONTEXT §3).

The protocol of MAGIC / AnomalyDiffusion: DRAEM's discriminative U-Net (anomalib's
``DiscriminativeSubNetwork``, 3 input channels, 2 output classes) is trained on
normal ``train`` images plus generated pairs, about half of each per batch, with
focal loss (anomalib's DRAEM loss term: kornia ``FocalLoss``, alpha 1) and Adam.
The anomaly map is the softmax probability of the anomaly class; the image score is
the maximum of the map after k x k average pooling (k = 21 in the papers).

Model selection never sees the test split: either a fixed schedule (the last epoch)
or the best epoch on a validation split carved from the training data
(``detector.selection``); which one, and its outcome, is recorded in ``schedule``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from anomaly_factory.config import DetectorSection
from anomaly_factory.detectors.data import Sample, load_image, load_mask
from anomaly_factory.detectors.evaluate import localization_metrics
from anomaly_factory.errors import InputError

VALIDATION_METRIC = "pixel_ap"  # threshold-free and sensitive to small defects
PREDICT_BATCH = 32


@dataclass
class Localizer:
    """A trained network plus the record of how it was trained and selected."""

    network: torch.nn.Module
    resolution: int
    score_pool: int
    schedule: dict[str, Any] = field(default_factory=dict)


def build_network(base_width: int) -> torch.nn.Module:
    """DRAEM's discriminative subnetwork, reused from anomalib as is."""
    from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork

    return DiscriminativeSubNetwork(in_channels=3, out_channels=2, base_width=base_width)


def _stack(samples: list[Sample], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 N x 3 x H x W (a quarter of float32's memory) and masks N x H x W."""
    images = torch.stack([(load_image(s.image_path, size) * 255).round().byte() for s in samples])
    masks = torch.stack([load_mask(s.mask_path, size)[0].bool() for s in samples])
    return images, masks


def _split(n: int, fraction: float, gen: torch.Generator, what: str) -> tuple[list, list]:
    n_val = max(1, round(n * fraction))
    if n - n_val < 1:
        raise InputError(
            f"detector.selection=validation: {n} {what} cannot give a validation share of "
            f"{fraction} and keep one for training"
        )
    order = torch.randperm(n, generator=gen).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def image_scores(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """Max of the k x k average-pooled map, zero-padded as in DRAEM's evaluation code."""
    pooled = F.avg_pool2d(maps[:, None], pool, stride=1, padding=pool // 2)
    return pooled.flatten(1).amax(1)


@torch.no_grad()
def _maps(network: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    network.eval()
    out = [
        torch.softmax(network(images[i : i + PREDICT_BATCH].float() / 255), 1)[:, 1]
        for i in range(0, len(images), PREDICT_BATCH)
    ]
    return torch.cat(out)


def predict(localizer: Localizer, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Anomaly maps (N x H x W) and image scores (N) of some images."""
    images, _ = _stack(samples, localizer.resolution)
    maps = _maps(localizer.network, images)
    return maps, image_scores(maps, localizer.score_pool)


def _validate(
    network: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, pool: int
) -> float:
    maps = _maps(network, images)
    labels = masks.flatten(1).any(1).int()
    return localization_metrics(maps, image_scores(maps, pool), masks, labels)[VALIDATION_METRIC]


def train_localizer(
    normals: list[Sample], anomalies: list[Sample], settings: DetectorSection, seed: int
) -> Localizer:
    """Train on ``normals`` (train split) and ``anomalies`` (generated pairs).

    Each step draws ``batch_size // 2`` anomalies (an epoch is one pass over them, or
    ``steps_per_epoch`` steps) and fills the batch with normals drawn with replacement.
    """
    from kornia.losses import FocalLoss

    if not normals or not anomalies:
        raise InputError(
            f"localization needs train normals and anomalies; got {len(normals)} and "
            f"{len(anomalies)}"
        )
    size = settings.resolution
    gen = torch.Generator().manual_seed(seed)
    normal_images, _ = _stack(normals, size)
    anomaly_images, anomaly_masks = _stack(anomalies, size)
    normal_masks = torch.zeros(len(normals), size, size, dtype=torch.bool)
    schedule: dict[str, Any] = {"selection": settings.selection, "epochs": settings.epochs}
    schedule["steps_per_epoch"] = settings.steps_per_epoch or "one pass over the pairs"
    val = None
    if settings.selection == "validation":
        n_tr, n_va = _split(len(normals), settings.val_fraction, gen, "train normals")
        a_tr, a_va = _split(len(anomalies), settings.val_fraction, gen, "generated pairs")
        val = (
            torch.cat([normal_images[n_va], anomaly_images[a_va]]),
            torch.cat([normal_masks[n_va], anomaly_masks[a_va]]),
        )
        normal_images, anomaly_images = normal_images[n_tr], anomaly_images[a_tr]
        anomaly_masks = anomaly_masks[a_tr]
        schedule.update(n_val_normals=len(n_va), n_val_anomalies=len(a_va))
    schedule.update(n_train_normals=len(normal_images), n_train_anomalies=len(anomaly_images))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(settings.base_width)
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.lr)
    focal = FocalLoss(alpha=1.0, gamma=settings.focal_gamma, reduction="mean")
    n_anom = max(1, settings.batch_size // 2)
    n_norm = settings.batch_size - n_anom
    steps = settings.steps_per_epoch or math.ceil(len(anomaly_images) / n_anom)
    best, history = (-math.inf, 0, None), []
    for epoch in range(1, settings.epochs + 1):
        network.train()
        order = torch.randperm(len(anomaly_images), generator=gen)
        losses = []
        for step in range(steps):
            a_idx = order[torch.arange(step * n_anom, (step + 1) * n_anom) % len(order)]
            n_idx = torch.randint(len(normal_images), (n_norm,), generator=gen)
            x = torch.cat([anomaly_images[a_idx], normal_images[n_idx]]).float() / 255
            y = torch.cat([anomaly_masks[a_idx], normal_masks[: len(n_idx)]]).long()
            loss = focal(network(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        record = {"epoch": epoch, "loss": sum(losses) / len(losses)}
        if val is not None:
            record[f"val_{VALIDATION_METRIC}"] = score = _validate(
                network, *val, settings.score_pool
            )
            if score > best[0]:
                best = (score, epoch, copy.deepcopy(network.state_dict()))
        history.append(record)
    if val is not None:
        network.load_state_dict(best[2])
        schedule.update(best_epoch=best[1], validation_metric=VALIDATION_METRIC)
    else:
        schedule.update(best_epoch=settings.epochs)
    schedule["history"] = history
    network.eval()
    return Localizer(network, size, settings.score_pool, schedule)

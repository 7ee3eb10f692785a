"""Downstream metrics on the real test split, computed with anomalib's metrics.

Localization (CONTEXT §3): image AUROC / AP / F1-max from image scores, pixel AUROC /
AP / F1-max and AUPRO from anomaly maps. AP is anomalib's ``AUPR`` (area under the
precision-recall curve). Classification: accuracy per type and overall.

    >>> import torch
    >>> masks = torch.zeros(4, 8, 8); masks[2:, 2:5, 2:5] = 1
    >>> m = localization_metrics(masks, masks.amax((1, 2)), masks, masks.amax((1, 2)))
    >>> round(m["pixel_auroc"], 3), round(m["image_auroc"], 3)
    (1.0, 1.0)
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from anomaly_factory.errors import InputError

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
LOCALIZATION_METRICS = IMAGE_METRICS + PIXEL_METRICS


def _compute(metric: object, batch: SimpleNamespace) -> float:
    metric.update(batch)  # anomalib metrics read their fields from the batch by name
    return float(metric.compute())


def localization_metrics(
    anomaly_maps: torch.Tensor,
    scores: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_labels: torch.Tensor,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All localization metrics of one test set.

    Args:
        anomaly_maps: N x H x W predicted anomaly maps (any real scale).
        scores: N image scores.
        gt_masks: N x H x W ground-truth masks (> 0 is defect).
        gt_labels: N image labels (1 = anomalous).
        fpr_limit: FPR up to which AUPRO integrates (0.3 as in MVTec-AD's paper).
    """
    from anomalib.metrics import AUPR, AUPRO, AUROC, F1Max

    n = len(scores)
    if anomaly_maps.shape != gt_masks.shape or len(gt_labels) != n or anomaly_maps.shape[0] != n:
        raise InputError(
            f"shapes differ: maps {tuple(anomaly_maps.shape)}, masks {tuple(gt_masks.shape)}, "
            f"scores {n}, labels {len(gt_labels)}"
        )
    labels = (gt_labels > 0).int()
    if labels.min() == labels.max():
        raise InputError(f"test set needs normal and anomalous images; labels are all {labels[0]}")
    batch = SimpleNamespace(
        pred_score=scores.float().flatten(),
        gt_label=labels,
        anomaly_map=anomaly_maps.float(),
        gt_mask=(gt_masks > 0).int(),
    )
    image, pixel = ["pred_score", "gt_label"], ["anomaly_map", "gt_mask"]
    return {
        "image_auroc": _compute(AUROC(fields=image), batch),
        "image_ap": _compute(AUPR(fields=image), batch),
        "image_f1max": _compute(F1Max(fields=image), batch),
        "pixel_auroc": _compute(AUROC(fields=pixel), batch),
        "pixel_ap": _compute(AUPR(fields=pixel), batch),
        "pixel_f1max": _compute(F1Max(fields=pixel), batch),
        "aupro": _compute(AUPRO(fields=pixel, fpr_limit=fpr_limit), batch),
    }


def classification_metrics(
    predicted: list[str], actual: list[str], classes: list[str]
) -> dict[str, float]:
    """Accuracy overall and per anomaly type (``accuracy_<type>``)."""
    if len(predicted) != len(actual) or not actual:
        raise InputError(f"need equal, non-empty lists: {len(predicted)} vs {len(actual)}")
    out = {"accuracy": sum(p == a for p, a in zip(predicted, actual, strict=True)) / len(actual)}
    for cls in classes:
        hits = [p == a for p, a in zip(predicted, actual, strict=True) if a == cls]
        if hits:
            out[f"accuracy_{cls}"] = sum(hits) / len(hits)
    return out

"""Anomaly-type classification (CONTEXT §3, "Classification (downstream)").

A torchvision ResNet-34 is trained on the generated anomalies of one category (one
class per anomaly type) and tested on the category's real ``test`` anomalies. It
starts from ImageNet weights only when ``detector.classifier_weights`` names a local
state-dict file: nothing is ever downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from anomaly_factory.config import DetectorSection
from anomaly_factory.detectors.data import Sample, load_image
from anomaly_factory.detectors.evaluate import classification_metrics
from anomaly_factory.io import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_resnet34(n_classes: int, weights: Path | None) -> torch.nn.Module:
    """ResNet-34 with an ``n_classes`` head; backbone weights from a local file if given."""
    from torchvision.models import resnet34

    model = resnet34(weights=None)
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            raise ValueError(f"detector.classifier_weights: cannot load {weights}: {exc}") from exc
        model.load_state_dict(state)
    model.fc = torch.nn.Linear(model.fc.in_features, n_classes)
    return model


def _inputs(samples: list[Sample], size: int) -> torch.Tensor:
    x = torch.stack([load_image(s.image_path, size) for s in samples])
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def train_and_test_classifier(
    generated: list[Sample], test: list[Sample], settings: DetectorSection, seed: int
) -> dict[str, Any]:
    """Train on ``generated`` (labels = their anomaly types); accuracy on ``test``.

    Test anomalies of types with no generated images cannot be predicted and are left
    out; ``n_test`` and ``untrained_types`` say so.
    """
    classes = sorted({s.anomaly_type for s in generated})
    if len(classes) < 2:
        raise ValueError(f"classification needs >= 2 anomaly types with pairs; got {classes}")
    index = {c: i for i, c in enumerate(classes)}
    test_anomalies = [s for s in test if s.is_anomalous and s.anomaly_type in index]
    untrained = sorted({s.anomaly_type for s in test if s.is_anomalous} - set(classes))
    if not test_anomalies:
        raise ValueError(f"classification: no test anomalies of types {classes}")
    size = settings.resolution
    x = _inputs(generated, size)
    y = torch.tensor([index[s.anomaly_type] for s in generated])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_resnet34(len(classes), settings.classifier_weights)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.classifier_lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    batch = settings.batch_size
    for _ in range(settings.classifier_epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for step in range(math.ceil(len(x) / batch)):
            idx = order[step * batch : (step + 1) * batch]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in _inputs(test_anomalies, size).split(batch)])
    predicted = [classes[i] for i in logits.argmax(1).tolist()]
    metrics = classification_metrics(predicted, [s.anomaly_type for s in test_anomalies], classes)
    weights = settings.classifier_weights
    return {
        **metrics,
        "n_train": len(generated),
        "n_test": len(test_anomalies),
        "classes": classes,
        "untrained_types": untrained,
        "pretrained": "none" if weights is None else sha256_file(weights)[:16],
        "schedule": {"selection": "fixed_schedule", "epochs": settings.classifier_epochs},
    }

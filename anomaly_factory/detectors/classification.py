"""Anomaly-type classification (CONTEXT §3, "Classification (downstream)").

A torchvision ResNet (``detector.classifier_arch``; ResNet-34 in the papers) is trained
on the generated anomalies of one category (one class per anomaly type) and tested on
the category's real ``test`` anomalies. It
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
from anomaly_factory.errors import InputError
from anomaly_factory.images import read_mask, read_rgb
from anomaly_factory.io import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_classifier(arch: str, n_classes: int, weights: Path | None) -> torch.nn.Module:
    """A torchvision ResNet (``resnet34``, ``resnet18``) with an ``n_classes`` head;
    backbone weights from a local file if given."""
    from torchvision import models

    model = getattr(models, arch)(weights=None)
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            raise InputError(f"detector.classifier_weights: cannot load {weights}: {exc}") from exc
        model.load_state_dict(state)
    model.fc = torch.nn.Linear(model.fc.in_features, n_classes)
    return model


def _inputs(samples: list[Sample], settings: DetectorSection) -> torch.Tensor:
    """Normalised inputs: whole images, or crops around each sample's mask."""
    if settings.classifier_input == "image":
        x = torch.stack([load_image(s.image_path, settings.resolution) for s in samples])
    else:
        x = torch.stack([_defect_crop(s, settings) for s in samples])
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def _defect_crop(sample: Sample, settings: DetectorSection) -> torch.Tensor:
    from anomaly_factory.gates.pair_checks import defect_crop

    if sample.mask_path is None:
        raise InputError(f"{sample.image_path}: classifier_input defect_crop needs its mask")
    image = read_rgb(sample.image_path)
    mask = read_mask(sample.mask_path)
    if mask.shape != image.shape[:2]:
        raise InputError(
            f"{sample.mask_path}: mask {mask.shape} does not match image "
            f"{sample.image_path} {image.shape[:2]}"
        )
    rgb, _ = defect_crop(
        image, mask, settings.classifier_crop_size, settings.classifier_crop_context
    )
    return torch.from_numpy(rgb / 255.0).permute(2, 0, 1).float()


def _dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image flipped and turned by a random one of the 8 right-angle symmetries."""
    out = []
    for image in x:
        image = torch.rot90(image, int(torch.randint(0, 4, (1,), generator=gen)), (-2, -1))
        out.append(image.flip(-1) if torch.rand(1, generator=gen) < 0.5 else image)
    return torch.stack(out)


def train_and_test_classifier(
    generated: list[Sample], test: list[Sample], settings: DetectorSection, seed: int
) -> dict[str, Any]:
    """Train on ``generated`` (labels = their anomaly types); accuracy on ``test``.

    Test anomalies of types with no generated images cannot be predicted and are left
    out; ``n_test`` and ``untrained_types`` say so.
    """
    classes = sorted({s.anomaly_type for s in generated})
    if len(classes) < 2:
        raise InputError(f"classification needs >= 2 anomaly types with pairs; got {classes}")
    index = {c: i for i, c in enumerate(classes)}
    test_anomalies = [s for s in test if s.is_anomalous and s.anomaly_type in index]
    untrained = sorted({s.anomaly_type for s in test if s.is_anomalous} - set(classes))
    if not test_anomalies:
        raise InputError(f"classification: no test anomalies of types {classes}")
    x = _inputs(generated, settings)
    y = torch.tensor([index[s.anomaly_type] for s in generated])
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_classifier(
            settings.classifier_arch, len(classes), settings.classifier_weights
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.classifier_lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    batch = settings.classifier_batch_size or settings.batch_size
    for _ in range(settings.classifier_epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for step in range(math.ceil(len(x) / batch)):
            idx = order[step * batch : (step + 1) * batch]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            inputs = _dihedral(x[idx], gen) if settings.classifier_augment else x[idx]
            loss = loss_fn(model(inputs), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        inputs = _inputs(test_anomalies, settings)
        logits = torch.cat([model(chunk) for chunk in inputs.split(batch)])
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
        "input": settings.classifier_input,
    }

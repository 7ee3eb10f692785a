"""Mask generation per anomaly type, MAGIC §3.1 (and the public code's alternative).

MAGIC samples new defect masks from a generator trained on each type's few
``fewshot`` masks. Here that generator is a small unconditional DDPM over
low-resolution masks (diffusers ``UNet2DModel`` + ``DDPMScheduler``), trained
with flips / right-angle rotations / shifts so that a handful of masks give a
distribution rather than copies. Sampling uses DDIM (eta 0), so a mask is a
deterministic function of its seed. Samples are upsampled, thresholded (0.8 in
AnomalyDiffusion's generator) and rejected when empty, outside
``masks.min_area .. max_area``, covering more than ``max_border_fraction`` of
any image border, (``max_pieces_vs_fewshot``) broken into more pieces than
any few-shot mask, or (``min_elongation_vs_fewshot``) less elongated than the least
elongated few-shot mask: the small DDPM draws thin strokes shorter and thicker than
its examples, and the stubs among its samples are not the type's defect
(bench/RESULTS.md (t)).

``masks.generator.window`` says what the DDPM draws. ``image``: the whole image,
so it learns shapes and positions at once. ``defect``: a square around each
few-shot defect (``window_margin`` x the largest few-shot extent), so its cells
are several times finer and it learns shapes only; a sample is placed at a
seeded few-shot mask's centre, shifted by up to ``place_shift`` (on objects CAMA
then moves it where it belongs). At 64 px over the whole image the demo's thin
scratches and cracks came out as fragments of a third of their length; a 32-px
defect window draws them at nearly full length (bench/RESULTS.md (q)).

The public code instead reuses 504 masks per type from AnomalyDiffusion's
generator: ``masks.source: folder`` takes masks from a folder
(:class:`FolderMaskSource`) under the same rejection rules. Those are 8-bit
JPEGs, binarised with ``> 127`` as the official code reads them (``> 0`` makes
them on average 2.6 times too large).

Both sources expose ``masks(n, size) -> list[np.ndarray]`` (bool HxW), so
mask ``i`` is the same whatever else is asked for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anomaly_factory import images as image_io
from anomaly_factory.config import MaskGeneratorSection, MasksSection
from anomaly_factory.errors import InputError
from anomaly_factory.generators.common import derive_seed
from anomaly_factory.generators.magic.precision import cpu_bf16_autocast
from anomaly_factory.images import MaskSource, resize_mask_keep_thin
from anomaly_factory.io import atomic_write_json

log = logging.getLogger(__name__)

GENERATOR_FILE = "mask_generator.json"
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# --------------------------------------------------------------------------- rejection rules
def rejection_reason(
    mask: np.ndarray, min_area: float, max_area: float, max_border_fraction: float
) -> str | None:
    """Why a mask is rejected (``"empty"``, ``"area"``, ``"border"``), or None if accepted.

    Border rule (AnomalyDiffusion's generator): more than ``max_border_fraction`` of
    any of the four image borders covered.
    """
    m = np.asarray(mask, bool)
    if not m.any():
        return "empty"
    area = float(m.mean())
    if not min_area <= area <= max_area:
        return "area"
    borders = (m[0, :], m[-1, :], m[:, 0], m[:, -1])
    if max(float(b.mean()) for b in borders) > max_border_fraction:
        return "border"
    return None


def _accept(mask: np.ndarray, cfg: MasksSection, min_area: float = 0.0) -> str | None:
    return rejection_reason(
        mask, max(cfg.min_area, min_area), cfg.max_area, cfg.max_border_fraction
    )


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask to ``size`` x ``size``, keeping thin defects (half-covered cells,
    plus every cell a thinner-than-a-cell part crosses).

    Nearest-neighbour sampling dropped a 6-px scratch of a 1024-px image at the
    generator's 32 px: it learnt empty masks, and rejection sampling then spent
    ``max_tries_per_mask`` tries per mask before falling back (issue 16).
    """
    return resize_mask_keep_thin(mask, size)


def read_mask(path: Path, source: MaskSource = "dataset") -> np.ndarray:
    """Bool mask from an image file, binarised by its source (:mod:`anomaly_factory.images`):
    ground truth ``dataset`` (any non-zero value), mask ``folder`` (8-bit JPEGs: > 127)."""
    return image_io.read_mask(path, source=source)


def piece_count(mask: np.ndarray) -> int:
    """Connected components of a bool mask (8-connectivity: a diagonal step joins)."""
    import cv2

    return int(cv2.connectedComponents(np.asarray(mask, np.uint8), connectivity=8)[0]) - 1


def elongation(mask: np.ndarray) -> float:
    """Length over width of a mask: the long side of its minimum-area rotated box, squared,
    over its area (a w-wide stroke of length l gives about l / w; a disc 1.27).

    Rotation- and scale-invariant, so few-shot masks read at their own resolution compare
    with generated ones at the pairs'. 0 for an empty mask.

    >>> bar = np.zeros((32, 32), bool); bar[10:12, 4:28] = True
    >>> round(elongation(bar), 1)
    12.0
    """
    import cv2

    points = cv2.findNonZero(np.asarray(mask, np.uint8))
    if points is None:
        return 0.0
    long_side = max(cv2.minAreaRect(points)[1]) + 1  # pixel centres: a 1-px line has side 0
    return float(long_side**2 / np.count_nonzero(mask))


@dataclass(frozen=True)
class FewshotBounds:
    """Rejection bounds read off a type's few-shot masks, at the masks' own resolution
    (the defaults reject nothing)."""

    min_area: float = 0.0  # ``min_area_vs_fewshot`` x the smallest mask's area (image fraction)
    max_pieces: int | None = None  # ``max_pieces_vs_fewshot``: the most pieces of any mask
    min_elongation: float = 0.0  # ``min_elongation_vs_fewshot`` x the least elongated mask's


def fewshot_bounds(cfg: MasksSection, mask_paths: list[str]) -> FewshotBounds:
    """The few-shot rejection bounds of one type; the masks are read once, and not at all
    when every few-shot rule is off.

    >>> fewshot_bounds(MasksSection(), ["never/read.png"])
    FewshotBounds(min_area=0.0, max_pieces=None, min_elongation=0.0)
    """
    on = cfg.min_area_vs_fewshot or cfg.max_pieces_vs_fewshot or cfg.min_elongation_vs_fewshot
    if not on or not mask_paths:
        return FewshotBounds()
    masks = [read_mask(Path(p)) for p in mask_paths]
    return FewshotBounds(
        min_area=cfg.min_area_vs_fewshot * min(float(m.mean()) for m in masks),
        max_pieces=max(map(piece_count, masks)) if cfg.max_pieces_vs_fewshot else None,
        min_elongation=cfg.min_elongation_vs_fewshot * min(map(elongation, masks)),
    )


def fewshot_masks(
    manifest_path: Path, category: str, anomaly_type: str, size: int
) -> tuple[np.ndarray, list[str]]:
    """The type's ``fewshot`` masks at ``size`` px (N, size, size) bool, and their paths."""
    from anomaly_factory.generators.common import resolve_path
    from anomaly_factory.manifest import read_images, select

    df = select(read_images(manifest_path), category, anomaly_type, "fewshot")
    if df.empty:
        raise InputError(
            f"{manifest_path}: no fewshot images for category {category!r}, "
            f"anomaly type {anomaly_type!r}"
        )
    paths = [str(resolve_path(p, manifest_path)) for p in df["mask_path"]]
    return np.stack([resize_mask(read_mask(Path(p)), size) for p in paths]), paths


# --------------------------------------------------------------------------- the DDPM
def fit_size(section: MaskGeneratorSection) -> int:
    """The side the few-shot masks are read at for training: the generator's own for the
    ``image`` window; finer for ``defect`` windows, which are cut out of them first."""
    return section.resolution if section.window == "image" else 4 * section.resolution


def defect_windows(masks: np.ndarray, section: MaskGeneratorSection) -> tuple[np.ndarray, dict]:
    """Square windows around each mask's defect, at ``section.resolution``, and the
    placement facts: the window side as a fraction of the image side and each few-shot
    mask's box centre (y, x) as fractions.

    One window side for all masks of a type (``window_margin`` x the largest box side),
    so a cell means the same length in every training mask and sample.
    """
    _, h, w = masks.shape
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        if not len(ys):
            raise InputError("mask generator: an empty training mask")
        boxes.append((ys.min(), ys.max(), xs.min(), xs.max()))
    extent = max(max(y1 - y0, x1 - x0) + 1 for y0, y1, x0, x1 in boxes)
    side = int(min(max(h, w), np.ceil(section.window_margin * extent)))
    crops, centres = [], []
    for m, (y0, y1, x0, x1) in zip(masks, boxes, strict=True):
        cy, cx = (y0 + y1 + 1) // 2, (x0 + x1 + 1) // 2
        padded = np.pad(m, side)
        top, left = cy + side - side // 2, cx + side - side // 2
        crops.append(resize_mask(padded[top : top + side, left : left + side], section.resolution))
        centres.append([(y0 + y1 + 1) / 2 / h, (x0 + x1 + 1) / 2 / w])
    return np.stack(crops), {"window_fraction": side / max(h, w), "centres": centres}


def place_sample(
    soft: torch.Tensor,
    size: int,
    section: MaskGeneratorSection,
    info: dict,
    seed: int,
) -> np.ndarray:
    """A soft sample (1, r, r) as a bool ``size`` x ``size`` mask.

    ``image`` window: upsampled and thresholded. ``defect`` window: upsampled to the
    window's side at ``size``, thresholded, and pasted at a few-shot centre (chosen by
    ``seed``) moved by up to ``place_shift``; what leaves the image is dropped.
    """
    if section.window == "image":
        up = F.interpolate(soft[None], size=(size, size), mode="bilinear", align_corners=False)
        return up[0, 0].numpy() > section.threshold
    side = max(1, int(round(info["window_fraction"] * size)))
    up = F.interpolate(soft[None], size=(side, side), mode="bilinear", align_corners=False)
    window = up[0, 0].numpy() > section.threshold
    rng = np.random.default_rng(seed)
    cy, cx = info["centres"][int(rng.integers(len(info["centres"])))]
    dy, dx = rng.uniform(-section.place_shift, section.place_shift, 2)
    top = int(round((cy + dy) * size)) - side // 2
    left = int(round((cx + dx) * size)) - side // 2
    canvas = np.zeros((size + 2 * side, size + 2 * side), bool)
    top, left = int(np.clip(top, -side, size)), int(np.clip(left, -side, size))
    canvas[top + side : top + 2 * side, left + side : left + 2 * side] = window
    return canvas[side : side + size, side : side + size]


def build_mask_unet(section: MaskGeneratorSection):
    """A small unconditional UNet over 1-channel masks at ``section.resolution``."""
    from diffusers import UNet2DModel

    n = len(section.channels)
    return UNet2DModel(
        sample_size=section.resolution,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(section.channels),
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=section.norm_num_groups,
        add_attention=section.mid_attention,
        attention_head_dim=section.attention_head_dim,
    )


def _augment(x: torch.Tensor, section: MaskGeneratorSection, gen: torch.Generator) -> torch.Tensor:
    """Random flips, right-angle rotations and zero-padded shifts, per sample."""
    out = []
    size = x.shape[-1]
    max_shift = int(round(section.augment_shift * size))
    for m in x:
        if section.augment_flip:
            if torch.rand(1, generator=gen) < 0.5:
                m = m.flip(-1)
            if torch.rand(1, generator=gen) < 0.5:
                m = m.flip(-2)
        if section.augment_rot90:
            m = torch.rot90(m, int(torch.randint(0, 4, (1,), generator=gen)), (-2, -1))
        if max_shift:
            dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,), generator=gen)).tolist()
            padded = F.pad(m, (max_shift,) * 4, value=-1.0)
            y0, x0 = max_shift - dy, max_shift - dx
            m = padded[..., y0 : y0 + size, x0 : x0 + size]
        out.append(m)
    return torch.stack(out)


@dataclass
class MaskGenerator:
    """A trained mask DDPM: ``unet`` predicts noise on masks scaled to [-1, 1]."""

    unet: torch.nn.Module
    section: MaskGeneratorSection
    info: dict

    @classmethod
    def fit(cls, masks: np.ndarray, section: MaskGeneratorSection, seed: int) -> MaskGenerator:
        """Train on (N, H, W) bool masks (resized to ``section.resolution``); CPU-deterministic."""
        from diffusers import DDPMScheduler

        if len(masks) == 0:
            raise InputError("mask generator: no training masks")
        r = section.resolution
        window: dict = {}
        if section.window == "defect":
            masks, window = defect_windows(np.asarray(masks, bool), section)
        data = torch.from_numpy(np.stack([resize_mask(m, r) for m in masks])).float()
        data = data[:, None] * 2 - 1
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the UNet's initial weights
        unet = build_mask_unet(section)
        sched = DDPMScheduler(
            num_train_timesteps=section.train_timesteps, prediction_type=section.prediction_type
        )
        opt = torch.optim.AdamW(unet.parameters(), lr=section.lr)
        unet.train()
        loss = torch.tensor(float("nan"))
        for _ in range(section.steps):
            idx = torch.randint(0, len(data), (section.batch_size,), generator=gen)
            x0 = _augment(data[idx], section, gen)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, section.train_timesteps, (len(x0),), generator=gen)
            with cpu_bf16_autocast(section.bf16_autocast):
                pred = unet(sched.add_noise(x0, noise, t), t).sample
            target = x0 if section.prediction_type == "sample" else noise
            loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        unet.eval().requires_grad_(False)
        info = {"n_train": len(masks), "seed": seed, "final_loss": float(loss.detach()), **window}
        return cls(unet, section, info)

    def place(self, soft: torch.Tensor, size: int, seed: int) -> np.ndarray:
        """One soft sample as a bool ``size`` x ``size`` mask (:func:`place_sample`)."""
        return place_sample(soft, size, self.section, self.info, seed)

    @torch.no_grad()
    def sample_soft(self, seeds: list[int]) -> torch.Tensor:
        """Soft masks in [0, 1], (len(seeds), 1, r, r); sample i depends only on seeds[i]."""
        from diffusers import DDIMScheduler

        r = self.section.resolution
        sched = DDIMScheduler(
            num_train_timesteps=self.section.train_timesteps,
            prediction_type=self.section.prediction_type,
            clip_sample=True,
            set_alpha_to_one=True,
        )
        sched.set_timesteps(self.section.sample_steps)
        device = next(self.unet.parameters()).device
        x = torch.cat(
            [torch.randn((1, 1, r, r), generator=torch.Generator().manual_seed(s)) for s in seeds]
        ).to(device)
        for t in sched.timesteps:
            x = sched.step(self.unet(x, t).sample, t, x).prev_sample
        return ((x.clamp(-1, 1) + 1) / 2).cpu()

    def save(self, folder: Path) -> Path:
        """diffusers folder (config.json + safetensors) plus ``mask_generator.json``."""
        folder = Path(folder)
        self.unet.save_pretrained(folder, safe_serialization=True)
        atomic_write_json(
            folder / GENERATOR_FILE, {"section": self.section.model_dump(mode="json"), **self.info}
        )
        return folder

    @classmethod
    def load(cls, folder: Path) -> MaskGenerator:
        from diffusers import UNet2DModel

        folder = Path(folder)
        meta_path = folder / GENERATOR_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not a saved mask generator")
        meta = json.loads(meta_path.read_text())
        section = MaskGeneratorSection.model_validate(meta.pop("section"))
        unet = UNet2DModel.from_pretrained(folder).eval().requires_grad_(False)
        return cls(unet, section, meta)


# --------------------------------------------------------------------------- sources
class GeneratorMaskSource:
    """Masks sampled from a :class:`MaskGenerator`, with rejection, deterministic by seed.

    Mask ``i`` is the first accepted candidate among tries ``j = 0, 1, ...`` seeded
    by ``derive_seed(seed, i, j)``. Candidates are denoised in chunks of
    ``generator.batch_size`` fixed mask indices, so a run's masks never depend on
    how many are asked for beyond the chunk.
    """

    name = "generator"

    def __init__(
        self,
        generator: MaskGenerator,
        cfg: MasksSection,
        seed: int,
        fallback: np.ndarray | None = None,
        bounds: FewshotBounds = FewshotBounds(),
    ):
        self.generator, self.cfg, self.seed = generator, cfg, seed
        self.bounds = bounds  # besides cfg's own rules: from the few-shot masks
        self.rejected: dict[str, int] = {
            "empty": 0,
            "area": 0,
            "border": 0,
            "pieces": 0,
            "elongation": 0,
        }
        # few-shot masks (N, H, W) to augment when the generator keeps failing
        self.fallback = fallback
        self.fallback_used: set[int] = set()

    def masks(self, n: int, size: int) -> list[np.ndarray]:
        found = self.masks_for(range(n), n, size)
        return [found[i] for i in range(n)]

    def masks_for(self, indices, n: int, size: int) -> dict[int, np.ndarray]:
        """Masks ``indices`` of a run of ``n`` (only their chunks are denoised)."""
        chunk = self.cfg.generator.batch_size
        out: dict[int, np.ndarray] = {}
        for c in sorted({i // chunk for i in indices}):
            ids = list(range(c * chunk, min(n, (c + 1) * chunk)))
            out.update(zip(ids, self._chunk(ids, size), strict=True))
        return {i: out[i] for i in indices}

    def _chunk(self, indices: list[int], size: int) -> list[np.ndarray]:
        found: dict[int, np.ndarray] = {}
        for j in range(self.cfg.max_tries_per_mask):
            pending = [i for i in indices if i not in found]
            if not pending:
                break
            soft = self.generator.sample_soft([derive_seed(self.seed, i, j) for i in pending])
            for i, s in zip(pending, soft, strict=True):
                # Absolute threshold only: a peak-relative fallback turned empty samples
                # into 1-3 px corner dots that passed min_area (bench/RESULTS.md (k)).
                m = self.generator.place(s, size, derive_seed(self.seed, i, j, "place"))
                reason = _accept(m, self.cfg, self.bounds.min_area)
                if reason is None and self.bounds.max_pieces is not None:
                    reason = "pieces" if piece_count(m) > self.bounds.max_pieces else None
                if reason is None and elongation(m) < self.bounds.min_elongation:
                    reason = "elongation"
                if reason is None:
                    found[i] = m
                else:
                    self.rejected[reason] += 1
        missing = [i for i in indices if i not in found]
        if missing and self.fallback is not None and len(self.fallback):
            for i in missing:
                found[i] = self._fallback_mask(i, size)
                self.fallback_used.add(i)
            missing = []
        if missing:
            raise RuntimeError(
                f"mask generator: masks {missing} rejected {self.cfg.max_tries_per_mask} times "
                f"(rejections so far: {self.rejected}); train longer (masks.generator.steps) "
                f"or relax masks.min_area/max_area/max_border_fraction"
            )
        return [found[i] for i in indices]

    def _fallback_mask(self, i: int, size: int) -> np.ndarray:
        """An augmented few-shot mask, deterministic in ``i`` (first one the rules accept)."""
        assert self.fallback is not None
        base = torch.from_numpy(self.fallback.astype(np.float32) * 2 - 1)[:, None]
        base = F.interpolate(base, size=(size, size), mode="nearest")
        candidate = base[0, 0].numpy() > 0
        for j in range(self.cfg.max_tries_per_mask):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, i, j, "fallback"))
            k = int(torch.randint(0, len(base), (1,), generator=gen))
            candidate = _augment(base[k : k + 1], self.generator.section, gen)[0, 0].numpy() > 0
            if _accept(candidate, self.cfg, self.bounds.min_area) is None:
                return candidate
        return candidate


class FolderMaskSource:
    """Masks from a folder (e.g. the 504-per-type masks of the public MAGIC release).

    ``folder/<category>/<type>``, then ``folder/<type>``, then ``folder`` itself is
    used, whichever exists first. Files are read in name order, shuffled once by
    ``seed``; masks failing the rejection rules are skipped; mask ``i`` cycles
    through the rest.
    """

    name = "folder"

    def __init__(
        self, folder: Path, cfg: MasksSection, seed: int, category: str, anomaly_type: str
    ):
        folder = Path(folder)
        for cand in (folder / category / anomaly_type, folder / anomaly_type, folder):
            if cand.is_dir():
                folder = cand
                break
        else:
            raise FileNotFoundError(f"masks.folder: {folder} is not a folder")
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in MASK_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"masks.folder: {folder} holds no mask images {MASK_SUFFIXES}")
        self.folder, self.cfg = folder, cfg
        self.order = np.random.default_rng(seed).permutation(len(self.files))
        self.rejected: dict[str, int] = {"empty": 0, "area": 0, "border": 0}

    def masks_for(self, indices, n: int, size: int) -> dict[int, np.ndarray]:
        all_masks = self.masks(n, size)
        return {i: all_masks[i] for i in indices}

    def masks(self, n: int, size: int) -> list[np.ndarray]:
        accepted: list[np.ndarray] = []
        for k in self.order:
            m = resize_mask(read_mask(self.files[k], source="folder"), size)
            reason = _accept(m, self.cfg)
            if reason is None:
                accepted.append(m)
            else:
                self.rejected[reason] += 1
            if len(accepted) >= n:
                break
        if not accepted:
            raise InputError(
                f"masks.folder: every mask in {self.folder} fails the rejection rules "
                f"({self.rejected})"
            )
        return [accepted[i % len(accepted)] for i in range(n)]


def load_or_train_generator(
    cfg: MasksSection,
    manifest_path: Path,
    category: str,
    anomaly_type: str,
    folder: Path | None = None,
) -> MaskGenerator:
    """Load the type's mask generator from ``folder`` if saved there, else train (and save)."""
    if folder is not None and (Path(folder) / GENERATOR_FILE).is_file():
        gen = MaskGenerator.load(folder)
        if gen.section != cfg.generator:
            raise InputError(
                f"{folder}: saved mask generator settings differ from masks.generator; "
                f"delete the folder to retrain"
            )
        return gen
    train, _ = fewshot_masks(manifest_path, category, anomaly_type, fit_size(cfg.generator))
    gen = MaskGenerator.fit(train, cfg.generator, derive_seed(cfg.seed, category, anomaly_type))
    if folder is not None:
        gen.save(folder)
    return gen


def mask_source(
    cfg: MasksSection,
    manifest_path: Path,
    category: str,
    anomaly_type: str,
    generator_dir: Path | None = None,
    folder: Path | None = None,
) -> GeneratorMaskSource | FolderMaskSource:
    """The configured mask source of one (category, type); ``folder`` overrides the config."""
    seed = derive_seed(cfg.seed, category, anomaly_type)
    folder = folder if folder is not None else (cfg.folder if cfg.source == "folder" else None)
    if folder is not None:
        return FolderMaskSource(folder, cfg, seed, category, anomaly_type)
    gen = load_or_train_generator(cfg, manifest_path, category, anomaly_type, generator_dir)
    fewshot, paths = fewshot_masks(manifest_path, category, anomaly_type, cfg.generator.resolution)
    fallback = fewshot if cfg.fallback_to_fewshot else None
    return GeneratorMaskSource(gen, cfg, seed, fallback, fewshot_bounds(cfg, paths))


def nearest_iou(masks: list[np.ndarray], train: np.ndarray) -> np.ndarray:
    """For each mask, its IoU with the most similar training mask (1.0 means a copy)."""
    out = []
    for m in masks:
        inter = np.logical_and(train, m[None]).sum(axis=(1, 2))
        union = np.logical_or(train, m[None]).sum(axis=(1, 2))
        out.append(float(np.max(inter / np.maximum(union, 1))))
    return np.asarray(out)

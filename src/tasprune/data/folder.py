"""Class-folder image datasets (the ImageNet layout), decoded with Pillow batch by batch.

    ROOT/train/<class>/*.jpg|png ...      ROOT/val/<class>/*.jpg|png ...   (or ROOT/test/)

Classes are the sorted folder names under `train/`. Images are decoded to RGB at
the requested resolution: for training with a random resized crop (Szegedy et al.,
2015: 8%-100% of the area, aspect 3/4-4/3) and a random horizontal flip, for
evaluation resized and center-cropped (the central 87.5%, e.g. 256 -> 224). The
flip happens here, once, so the bundle's `BatchTransform` only normalises
(pad=0, flip=False).

Randomness is per sample: a base seed is drawn from the caller's generator when a
training pass starts, and sample `i` uses a generator seeded with (base, i), so
a pass is reproducible whatever the number of decoding workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from tasprune.data.integrity import DataError, require_dir
from tasprune.data.source import BatchTransform, DataBundle, index_batches
from tasprune.progress import progress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875
EVAL_SPLITS = ("val", "test")
MAX_RESOLUTION = 4096  # 3 x 4096 x 4096 float32 is 201 MB per image already
Box = tuple[float, float, float, float]


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A random crop box covering `scale` of the area with aspect ratio in `ratio`.

    Tries ten draws; if none fits, falls back to the largest central box whose
    aspect ratio is within `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    w, h = width, height
    if aspect < ratio[0]:
        h = round(width / ratio[0])
    elif aspect > ratio[1]:
        w = round(height * ratio[1])
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, fraction: float = EVAL_CROP_FRACTION) -> Box:
    """The central square covering `fraction` of the shorter side (resize + center crop)."""
    side = min(width, height) * fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any image Pillow opens as 8-bit RGB. 16-bit (and 32-bit integer) grey images are
    scaled to 8 bits: a plain convert("RGB") clips them, mostly to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img, dtype=np.int64)
        bits = 16 if img.mode.startswith("I;16") or values.max(initial=0) < 65536 else 32
        grey = (np.clip(values, 0, 2**bits - 1) >> (bits - 8)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


class FolderImages:
    """An `ImageSource` over image files with class labels, decoded on demand."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, resolution: int,
                 workers: int = 0) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
        self.paths = paths
        self.labels = labels.long()
        self.resolution = resolution
        self.workers = workers
        self._idle: list[tuple[DataLoader, _PlanSampler]] = []  # loaders between passes

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_idle": []}  # workers get the images, not the loaders

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int, seed: int | None = None) -> torch.Tensor:
        """Image `index` as uint8 [3, R, R]: a random resized crop + flip drawn from `seed`
        when one is given (training), else resize + center crop."""
        path = self.paths[index]
        r = self.resolution
        try:
            with Image.open(path) as img:
                img = to_rgb8(img)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot read image ({exc}); remove or replace the file"
                            ) from None
        if seed is None:
            img = img.resize((r, r), Image.Resampling.BILINEAR, box=center_crop_box(*img.size))
        else:
            rng = np.random.default_rng(seed)
            box = random_resized_crop_box(*img.size, rng)
            img = img.resize((r, r), Image.Resampling.BILINEAR, box=box)
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # HWC -> CHW in numpy: a torch copy of a small tensor may wake the whole thread pool
        return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))

    def batches(
        self,
        batch_size: int,
        *,
        indices: torch.Tensor | None = None,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        train: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = index_batches(len(self), batch_size, indices=indices, shuffle=shuffle,
                             generator=generator, drop_last=drop_last)
        base = int(torch.randint(0, 2**62, (1,), generator=generator)) if train else None
        # a pass takes an idle loader (its worker processes live on between passes) or
        # makes one; two passes at once (the search reads both halves together) use two
        loader, sampler = self._idle.pop() if self._idle else self._new_loader()
        sampler.keys = [(tuple(idx.tolist()), base) for idx in plan]
        try:
            for images, labels, error in loader:
                if error is not None:
                    raise DataError(error)
                yield images, labels
        finally:
            self._idle.append((loader, sampler))

    def _new_loader(self) -> tuple[DataLoader, _PlanSampler]:
        sampler = _PlanSampler()
        workers = self.workers > 0
        loader = DataLoader(_BatchDecoder(self), batch_size=None, sampler=sampler,
                            num_workers=self.workers, collate_fn=_as_is,
                            persistent_workers=workers,
                            prefetch_factor=PREFETCH_BATCHES if workers else None,
                            pin_memory=torch.cuda.is_available())
        return loader, sampler


PREFETCH_BATCHES = 4  # batches each worker decodes ahead


def default_workers() -> int:
    """Decoding processes when none are asked for: one per CPU this process may use, less
    one for the training loop, at least 1 and at most 16."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus - 1))


def _as_is(item: object) -> object:
    return item


class _PlanSampler(Sampler):
    """The batches of the current pass, as (image indices, crop seed base) keys."""

    def __init__(self) -> None:
        self.keys: list[tuple[tuple[int, ...], int | None]] = []

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], int | None]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class _BatchDecoder(Dataset):
    """Decodes the batch of a key (image indices, crop seed base); runs in the workers."""

    def __init__(self, source: FolderImages) -> None:
        self.source = source

    def __getitem__(self, key: tuple[tuple[int, ...], int | None]
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
        idx, base = key
        try:
            images = torch.from_numpy(np.stack([  # numpy: see FolderImages.decode
                self.source.decode(i, None if base is None else _sample_seed(base, i))
                .numpy() for i in idx]))
        except DataError as exc:  # returned, not raised: a worker's traceback is noise
            return None, None, str(exc)
        return images, self.source.labels[list(idx)], None


def _sample_seed(base: int, index: int) -> int:
    return int(np.random.SeedSequence([base, index]).generate_state(1, np.uint64)[0])


def _scan(directory: Path, classes: list[str], quiet: bool) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(progress(classes, desc=f"scan {directory.name}", quiet=quiet)):
        class_dir = directory / name
        if not class_dir.is_dir():
            continue
        with os.scandir(class_dir) as entries:
            files = sorted(e.name for e in entries
                           if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(class_dir / f for f in files)
        labels.extend([label] * len(files))
    return paths, labels


def _check_headers(paths: list[Path], quiet: bool) -> None:
    """Refuse a split holding a file Pillow does not open as an image, before any training
    (reads the headers only: a file damaged past its header fails when it is decoded)."""
    bad: list[tuple[Path, str]] = []
    for path in progress(paths, desc="check images", quiet=quiet or len(paths) < 5000):
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            bad.append((path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{bad[0][0]}: cannot read image ({bad[0][1]}){more}; remove or "
                        "replace the file")


def load_folder(root: str | os.PathLike[str], resolution: int = 224, workers: int | None = None,
                quiet: bool = True) -> DataBundle:
    """An ImageNet-layout folder (`train/<class>/`, `val/<class>/`) as a bundle.

    `workers` decoding processes (default: `default_workers()`); they persist between
    passes and decode `PREFETCH_BATCHES` batches ahead each, into pinned memory when
    CUDA is present.
    """
    if not 1 <= resolution <= MAX_RESOLUTION:
        need = 3 * 4 * resolution**2
        raise DataError(f"resolution={resolution}: one image at that size is "
                        f"{need / 2**30:.3g} GiB as float32; give 1 to {MAX_RESOLUTION} (224 "
                        "for ImageNet-sized networks)")
    root = require_dir(Path(root), "image folder dataset with train/ and val/ inside")
    train_dir = require_dir(root / "train", "training images, one folder per class")
    eval_dir = next((root / s for s in EVAL_SPLITS if (root / s).is_dir()), None)
    if eval_dir is None:
        raise DataError(f"{root}: no val/ (or test/) directory; put evaluation images in "
                        f"{root / 'val'}/<class>/")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders; expected {train_dir}/<class>/*.jpg")
    if len(classes) == 1:
        raise DataError(f"{train_dir}: only one class folder ({classes[0]}); a classifier "
                        "needs at least two (every image would be right by construction)")
    unknown = sorted({e.name for e in os.scandir(eval_dir) if e.is_dir()} - set(classes))
    if unknown:
        raise DataError(f"{eval_dir}: class folder(s) {', '.join(unknown)} have no "
                        f"counterpart in {train_dir}")
    if workers is None:
        workers = default_workers()
    splits = []
    for directory in (train_dir, eval_dir):
        paths, labels = _scan(directory, classes, quiet)
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
        if directory is train_dir and (counts == 0).any():
            empty = [classes[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(f"{train_dir}: class folder(s) {', '.join(empty[:5])} hold no "
                            f"images ({'/'.join(IMAGE_EXTENSIONS)})")
        if not paths:
            raise DataError(f"{directory}: no images ({'/'.join(IMAGE_EXTENSIONS)}) in its "
                            "class folders")
        if directory is eval_dir:
            _check_headers(paths, quiet)
        splits.append(FolderImages(paths, torch.tensor(labels, dtype=torch.int64), resolution,
                                   workers))
    return DataBundle(
        name=f"folder:{root.name}", train=splits[0], test=splits[1], num_classes=len(classes),
        in_channels=3, resolution=resolution,
        transform=BatchTransform(mean=IMAGENET_MEAN, std=IMAGENET_STD, pad=0, flip=False),
        class_names=tuple(classes))

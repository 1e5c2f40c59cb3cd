"""Data sets as uint8 tensors, seeded subsets, and batch-level augmentation.

Every data set is loaded whole into memory as uint8 NCHW tensors (CIFAR-10 is
180 MB), so the trainer can move it to the GPU once and build each batch there
with a single gather: no DataLoader workers and no per-image Python code in
the training loop. Batches and augmentations are functions of (seed, step),
which makes a resumed run see exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from resexp.errors import UsageError
from resexp.files import atomic_write
from resexp.machine import usable_cores

DATASET_NAMES = ("cifar10", "imagefolder", "synthetic")
CIFAR10_TRAIN_IMAGES = 50_000  # the training set when the config does not size it
IMAGE_SIZE = 32  # the CIFAR networks assume 32x32 inputs
CACHE_FILENAME = ".resexp-cache.pt"
CACHE_FORMAT_VERSION = 1  # bump when the cached tensors' layout or decoding changes
SYNTHETIC_CLASSES = 10


@dataclass
class ImageData:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, 3, 32, 32]
    test_labels: torch.Tensor  # int64 [M]
    classes: list[str]
    eval_set: str  # "test", or "val" when a validation split replaced the test set


def load_data(
    name: str,
    root: str,
    *,
    train_size: int | None = None,
    test_size: int | None = None,
    val_size: int | None = None,
    resize: bool = False,
    download: bool = True,
    seed: int = 0,
) -> ImageData:
    """Load a data set and cut the requested stratified subsets and validation split.

    ``train_size``/``test_size`` of None keep everything. ``val_size`` holds out
    that many training images and evaluates on them instead of the test set
    (``test_size`` then has nothing to act on and is ignored).
    ``synthetic`` ignores ``root`` and generates exactly the sizes asked for (the config's
    data/synthetic.yaml sets them).

    The arguments come from a checked config (``config.problems``); what is checked here is what
    only the files can tell: a missing or damaged data set, and sizes larger than what it holds.
    """
    if name == "cifar10":
        data = _load_cifar10(root, download)
    elif name == "imagefolder":
        data = _load_imagefolder(root, resize)
    else:  # synthetic
        # Generate the held-out images on top of train_size, so train_size means
        # the same thing (images trained on) with and without a validation split.
        data = make_synthetic(train_size + (val_size or 0), test_size or 0, seed)
    return _select_subsets(data, train_size, test_size, val_size, seed)


# --------------------------------------------------------------------------- CIFAR-10


def fetch_cifar10(name: str, root: str, download: bool) -> None:
    """Get CIFAR-10 into ``root`` now, if the config asks for it and it is not there, before any run
    starts or any run folder is made: offline, the one-line error comes first and nothing is left
    behind, and a sweep's runs do not each try the download again."""
    from torchvision.datasets import CIFAR10

    if name == "cifar10" and not (Path(root) / CIFAR10.base_folder).is_dir():
        _load_cifar10(root, download)


def _load_cifar10(root: str, download: bool) -> ImageData:
    import torchvision  # imported here: it is slow to import and only this loader needs it
    from torchvision.datasets.utils import check_integrity, extract_archive

    cifar = torchvision.datasets.CIFAR10
    archive = Path(root) / cifar.filename
    alternative = "or use data=imagefolder data.root=<folder with train/ and test/>"
    made_root = not Path(root).exists()  # torchvision makes it before it downloads
    try:
        if not download and archive.is_file() and not (Path(root) / cifar.base_folder).is_dir():
            # torchvision unpacks an archive only on its download path; do it here so
            # a hand-copied archive works without touching the network.
            if check_integrity(str(archive), cifar.tgz_md5):
                extract_archive(str(archive), root)
        train_set = cifar(root, train=True, download=download)
        test_set = cifar(root, train=False, download=False)
    except Exception as error:  # network, disk and integrity failures all mean "no usable copy here"
        if made_root:
            with contextlib.suppress(OSError):  # nothing left behind by a failed download (rmdir: only if empty)
                Path(root).rmdir()
        if download:
            raise UsageError(
                f"CIFAR-10 not found in {root!r} and could not be downloaded ({_short_reason(error)}): "
                f"put cifar-10-python.tar.gz in {root!r}, {alternative}"
            ) from error
        raise UsageError(
            f"CIFAR-10 not found in {root!r} and data.download is false: "
            f"put cifar-10-python.tar.gz in {root!r}, set data.download=true, {alternative}"
        ) from error

    return ImageData(
        train_images=_nhwc_to_nchw(train_set.data),
        train_labels=torch.tensor(train_set.targets, dtype=torch.int64),
        test_images=_nhwc_to_nchw(test_set.data),
        test_labels=torch.tensor(test_set.targets, dtype=torch.int64),
        classes=list(train_set.classes),
        eval_set="test",
    )


def _short_reason(error: BaseException, limit: int = 120) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _nhwc_to_nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- image folders


def _load_imagefolder(root: str, resize: bool) -> ImageData:
    """Read root/{train,test}/<class>/<image>, through a cache keyed on the files' sizes and times."""
    root_path = Path(root)
    if not root_path.exists():
        raise UsageError(f"data.root {root!r} does not exist: point it at a folder holding train/ and test/")
    if not root_path.is_dir():
        raise UsageError(f"data.root {root!r} is not a folder: point it at a folder holding train/ and test/")

    train_files = _scan_split(root_path, "train")
    test_files = _scan_split(root_path, "test")
    only_train = sorted(set(train_files) - set(test_files))
    only_test = sorted(set(test_files) - set(train_files))
    if only_train or only_test:
        raise UsageError(
            f"class folders differ between train/ and test/ in {root!r}: "
            f"only in train: {', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}"
        )
    classes = sorted(train_files)

    all_files = [file for split in (train_files, test_files) for name in classes for file in split[name]]
    key = _cache_key(root_path, all_files, resize)
    cached = _read_cache(root_path, key)
    if cached is not None:
        return cached

    def paths_and_labels(files_by_class: dict[str, list[_FileEntry]]) -> tuple[list[str], list[int]]:
        paths, labels = [], []
        for label, name in enumerate(classes):
            paths += [file.path for file in files_by_class[name]]
            labels += [label] * len(files_by_class[name])
        return paths, labels

    train_paths, train_labels = paths_and_labels(train_files)
    test_paths, test_labels = paths_and_labels(test_files)
    count = len(train_paths) + len(test_paths)
    print(f"decoding {count} images from {root!r} (cached for later runs)", file=sys.stderr)
    pixels = _decode_images(root_path, train_paths + test_paths, resize)
    data = ImageData(
        train_images=_nhwc_to_nchw(pixels[: len(train_paths)]),
        train_labels=torch.tensor(train_labels, dtype=torch.int64),
        test_images=_nhwc_to_nchw(pixels[len(train_paths) :]),
        test_labels=torch.tensor(test_labels, dtype=torch.int64),
        classes=classes,
        eval_set="test",
    )
    _write_cache(root_path, key, data)
    return data


class _FileEntry(NamedTuple):
    path: str  # os.path.join(str(root), split, class, ...), so _relative can slice root off
    size: int
    mtime_ns: int


def _scan_split(root: Path, split: str) -> dict[str, list[_FileEntry]]:
    """Map each class folder of root/split to its image files (sorted, hidden entries skipped)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise UsageError(
            f"data.root {str(root)!r} has no {split}/ folder: "
            "an image folder needs train/<class>/ and test/<class>/ inside it"
        )
    class_names = sorted(
        entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not class_names:
        raise UsageError(f"{str(split_dir)!r} has no class folders: put each class's images in {split}/<class name>/")
    files_by_class = {}
    for name in class_names:
        files = sorted(_visible_files(os.path.join(str(root), split, name)))
        if not files:
            raise UsageError(f"class folder {str(split_dir / name)!r} has no images: add some or remove the folder")
        files_by_class[name] = files
    return files_by_class


def _visible_files(folder: str) -> list[_FileEntry]:
    """Every non-hidden file below folder, with the stat data the cache key needs (one pass, no re-stat)."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    if not entry.is_symlink():  # like os.walk: never follow links into folders (no cycles)
                        found += _visible_files(entry.path)
                    continue
                stat = entry.stat()
            except OSError as error:  # a dangling link, or one that loops back on itself
                raise UsageError(f"{entry.path!r} cannot be read ({error.strerror}): a broken or looping link? "
                                 "remove it, or point it at an image") from error
            found.append(_FileEntry(entry.path, stat.st_size, stat.st_mtime_ns))
    return found


def _decode_images(root: Path, paths: list[str], resize: bool) -> np.ndarray:
    """Decode images into one [N, 32, 32, 3] uint8 array, reporting every bad file at once."""
    pixels = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    unreadable: list[int] = []
    wrong_size: list[tuple[int, tuple[int, int]]] = []

    def decode_range(start: int, stop: int) -> tuple[list[int], list[tuple[int, tuple[int, int]]]]:
        bad, odd = [], []
        for index in range(start, stop):
            try:
                with Image.open(paths[index]) as opened:
                    image = opened.convert("RGB")
            except Exception:  # PIL raises many types for damaged or non-image files
                bad.append(index)
                continue
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                if not resize:
                    odd.append((index, image.size))
                    continue
                # Pillow's bilinear resize widens its filter when shrinking, i.e. it antialiases.
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            pixels[index] = np.asarray(image)
        return bad, odd

    # PIL releases the GIL while decoding, so threads pay off for large images; for
    # 32x32 files its Python-side header parsing dominates and they gain little.
    chunk = 512

    workers = min(8, usable_cores())
    with ThreadPoolExecutor(max_workers=workers) as executor:
        futures = [executor.submit(decode_range, s, min(s + chunk, len(paths))) for s in range(0, len(paths), chunk)]
        for future in futures:
            bad, odd = future.result()
            unreadable += bad
            wrong_size += odd

    def shown(path: str) -> str:
        return repr(_relative(root, path))

    if unreadable:
        listed = ", ".join(shown(paths[i]) for i in unreadable[:3])
        more = ", ..." if len(unreadable) > 3 else ""
        raise UsageError(
            f"{len(unreadable)} file(s) in data.root {str(root)!r} are not readable images: {listed}{more}; "
            "remove them or replace them with image files"
        )
    if wrong_size:
        listed = ", ".join(f"{shown(paths[i])} ({w}x{h})" for i, (w, h) in wrong_size[:3])
        more = ", ..." if len(wrong_size) > 3 else ""
        raise UsageError(
            f"{len(wrong_size)} image(s) in data.root {str(root)!r} are not {IMAGE_SIZE}x{IMAGE_SIZE}: {listed}{more}; "
            f"set data.resize=true to resize them to {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    return pixels


def _relative(root: Path, path: str) -> str:
    """path below root as a '/'-separated relative path."""
    return path[len(os.path.join(str(root), "")) :].replace(os.sep, "/")


def _cache_key(root: Path, files: list[_FileEntry], resize: bool) -> str:
    """Fingerprint the folder by every image's relative path, size and modification time."""
    skip = len(os.path.join(str(root), ""))  # string slicing: pathlib is slow for 60,000 files
    entries = sorted((file.path[skip:].replace(os.sep, "/"), file.size, file.mtime_ns) for file in files)
    text = json.dumps([CACHE_FORMAT_VERSION, bool(resize), entries])
    return hashlib.sha256(text.encode()).hexdigest()


def image_folder_fingerprint(root: str | os.PathLike) -> str:
    """An image folder's images by relative path and size: the same for a moved or copied folder
    (whatever the files' times), different for other images."""
    root = Path(root)
    entries = sorted((_relative(root, file.path), file.size) for split in ("train", "test")
                     for files in _scan_split(root, split).values() for file in files)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def data_root_problem(name: str, root: str) -> str | None:
    """Why ``data.root`` cannot hold the data set ``name``, or None (a cheap look, before anything trains)."""
    path = Path(root)
    if name == "imagefolder":
        if not path.exists():
            return "it does not exist"
        if not path.is_dir():
            return "it is a file, not a folder"
        missing = [f"{split}/" for split in ("train", "test") if not (path / split).is_dir()]
        if missing:
            return f"it has no {' or '.join(missing)} folder (an image folder holds train/<class>/* and test/<class>/*)"
    elif path.exists() and not path.is_dir():
        return "it is a file, not a folder"
    return None


def cache_paths(root: Path) -> list[Path]:
    """Where a folder's cache may live: in the folder, else in the user's cache dir (read-only data)."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resexp"
    root_hash = hashlib.sha1(str(root.resolve()).encode()).hexdigest()
    return [root / CACHE_FILENAME, user_cache / f"{root_hash}.pt"]


def _read_cache(root: Path, key: str) -> ImageData | None:
    for path in cache_paths(root):
        if not path.is_file():
            continue
        try:
            saved = torch.load(path, weights_only=True)
            stored_key = saved["key"]
            data = ImageData(
                train_images=saved["train_images"],
                train_labels=saved["train_labels"],
                test_images=saved["test_images"],
                test_labels=saved["test_labels"],
                classes=list(saved["classes"]),
                eval_set="test",
            )
        except Exception as error:  # a damaged cache only costs a re-decode
            print(f"warning: ignoring unreadable image cache {str(path)!r} ({_short_reason(error)})", file=sys.stderr)
            continue
        if stored_key != key:
            continue
        if saved.get("digest") != _content_digest(data):  # bytes changed on disk since it was written
            print(f"warning: ignoring damaged image cache {str(path)!r} (its content does not match its checksum); "
                  "decoding the images again", file=sys.stderr)
            continue
        return data
    return None


def _content_digest(data: ImageData) -> str:
    """SHA-256 of every image and label: a cache with flipped bytes would silently change results."""
    digest = hashlib.sha256()
    for tensor in (data.train_images, data.train_labels, data.test_images, data.test_labels):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_cache(root: Path, key: str, data: ImageData) -> None:
    payload = {
        "key": key,
        "digest": _content_digest(data),
        "train_images": data.train_images,
        "train_labels": data.train_labels,
        "test_images": data.test_images,
        "test_labels": data.test_labels,
        "classes": data.classes,
    }
    failures = []
    for path in cache_paths(root):
        try:
            atomic_write(path, lambda f: torch.save(payload, f))
            return
        except OSError as error:  # read-only mount or no permission: try the next place
            failures.append(f"{str(path)!r}: {_short_reason(error, 60)}")
    # The data itself loaded fine; only the speed-up for the next run is lost.
    print(f"warning: could not save the image cache ({'; '.join(failures)}); the next run decodes again",
          file=sys.stderr)


# --------------------------------------------------------------------------- synthetic data


def make_synthetic(train_count: int, test_count: int, seed: int) -> ImageData:
    """Learnable CIFAR-shaped data: each class is a fixed smooth template plus per-image noise.

    Templates are upsampled from 4x4 so that they survive the +-4 pixel crop
    augmentation; a per-pixel random template would not.
    """
    template_gen = torch.Generator().manual_seed(_derive_seed(seed, "synthetic-templates"))
    coarse = torch.rand(SYNTHETIC_CLASSES, 3, 4, 4, generator=template_gen) * 192 + 32
    templates = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)

    def samples(count: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_derive_seed(seed, "synthetic", split))
        labels = torch.arange(count) % SYNTHETIC_CLASSES  # balanced: counts differ by at most one
        labels = labels[torch.randperm(count, generator=gen)]
        images = torch.empty(count, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        for start in range(0, count, 4096):  # chunks keep the float noise small
            part = labels[start : start + 4096]
            noise = torch.randn(len(part), 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 48
            images[start : start + 4096] = (templates[part] + noise).round_().clamp_(0, 255).to(torch.uint8)
        return images, labels

    train_images, train_labels = samples(train_count, "train")
    test_images, test_labels = samples(test_count, "test")
    return ImageData(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        classes=[f"class{i}" for i in range(SYNTHETIC_CLASSES)],
        eval_set="test",
    )


# --------------------------------------------------------------------------- subsets


def _select_subsets(
    data: ImageData, train_size: int | None, test_size: int | None, val_size: int | None, seed: int
) -> ImageData:
    train_images, train_labels = data.train_images, data.train_labels
    test_images, test_labels = data.test_images, data.test_labels
    eval_set = "test"

    if val_size is not None:
        available = len(train_labels)
        if val_size >= available:
            raise UsageError(
                f"data.val_size={val_size} leaves no training images: the training set has {available} images"
            )
        held_out = stratified_indices(train_labels, val_size, _derive_seed(seed, "val"))
        keep = torch.ones(available, dtype=torch.bool)
        keep[held_out] = False
        test_images, test_labels = train_images[held_out], train_labels[held_out]
        train_images, train_labels = train_images[keep], train_labels[keep]
        eval_set = "val"

    if train_size is not None:
        _check_size("data.train_size", train_size, len(train_labels), "training set")
        chosen = stratified_indices(train_labels, train_size, _derive_seed(seed, "train-subset"))
        train_images, train_labels = train_images[chosen], train_labels[chosen]
    if test_size is not None and val_size is None:
        _check_size("data.test_size", test_size, len(test_labels), "test set")
        chosen = stratified_indices(test_labels, test_size, _derive_seed(seed, "test-subset"))
        test_images, test_labels = test_images[chosen], test_labels[chosen]

    return ImageData(train_images, train_labels, test_images, test_labels, data.classes, eval_set)


def _check_size(key: str, size: int, available: int, what: str) -> None:
    if size > available:
        raise UsageError(f"{key}={size} is larger than the {what} ({available} images): use at most {available}")


def stratified_indices(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Pick ``size`` indices, each class in proportion to its share, deterministically for ``seed``.

    Quotas are rounded down and the remaining places go to the classes with the
    largest remainders (ties to the lower class index), so the result is exact.
    """
    labels = labels.cpu()
    total = len(labels)
    class_ids, counts = torch.unique(labels, return_counts=True)
    quotas = [size * int(c) // total for c in counts]
    remainders = [size * int(c) % total for c in counts]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[: size - sum(quotas)]:
        quotas[i] += 1

    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for class_id, count, quota in zip(class_ids.tolist(), counts.tolist(), quotas):
        members = torch.nonzero(labels == class_id).flatten()
        chosen.append(members[torch.randperm(count, generator=gen)[:quota]])
    return torch.cat(chosen).sort().values


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple, so separate random streams never share a seed."""
    canonical = tuple(int(p) if isinstance(p, (int, np.integer)) else str(p) for p in parts)  # np.int64(3) == 3
    digest = hashlib.sha256(repr(canonical).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- preprocessing and augmentation


def pixel_mean(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean image of uint8 [N,3,H,W] as float32 [3,H,W] in [0,1] (the paper subtracts it)."""
    if len(images) == 0:
        raise ValueError("pixel_mean needs at least one image")
    total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
    for start in range(0, len(images), 1024):  # float64 chunks: exact sums without a full float copy
        total += images[start : start + 1024].to(torch.float64).sum(dim=0)
    return (total / (len(images) * 255.0)).to(torch.float32)


def normalize(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float32 x/255 - mean, on the images' device."""
    return images.to(torch.float32).div_(255.0).sub_(mean.to(images.device, torch.float32))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Zero-pad, randomly crop back to size and randomly mirror each sample, in one gather.

    Zero padding after mean subtraction pads with the mean image, as
    fb.resnet.torch does. Offsets are uniform in [0, 2*padding] per axis.
    """
    if padding == 0 and not flip:
        return x
    batch, channels, height, width = x.shape
    device = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    rows = dy[:, None] + torch.arange(height, device=device)  # [B, H]
    cols = dx[:, None] + torch.arange(width, device=device)  # [B, W]
    if flip:
        mirrored = torch.rand(batch, generator=generator, device=device) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)  # read the crop right to left
    return padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class TrainBatches:
    """Deterministic training batches: batch k depends only on (seed, k).

    So a resumed run sees exactly the batches an uninterrupted one would, with
    no sampler state to save. Images, labels and mean live on the training device.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        seed: int,
        mean: torch.Tensor,
        padding: int = 4,
        flip: bool = True,
    ):
        count = len(images)
        if batch_size > count:  # the one check the config cannot make: it depends on the images found
            raise UsageError(f"schedule.batch_size={batch_size} is larger than the training set ({count} images): "
                             f"use at most {count}")
        if len(labels) != count:
            raise ValueError(f"{count} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.mean = mean.to(images.device, torch.float32)
        self.padding = padding
        self.flip = flip
        self.steps_per_epoch = count // batch_size  # the last incomplete batch of an epoch is dropped
        self._order_epoch: int | None = None
        self._order: torch.Tensor | None = None
        self._augment_generator = torch.Generator(device=images.device)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            gen = torch.Generator(device=self.images.device).manual_seed(_derive_seed(self.seed, "order", epoch))
            self._order = torch.randperm(len(self.images), generator=gen, device=self.images.device)
            self._order_epoch = epoch
        return self._order

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized, augmented float32 images [B,3,H,W] and int64 labels [B] for one step."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        epoch, step = divmod(iteration, self.steps_per_epoch)
        indices = self._epoch_order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        images = normalize(self.images[indices], self.mean)
        self._augment_generator.manual_seed(_derive_seed(self.seed, "augment", iteration))
        images = random_crop_flip(images, self._augment_generator, self.padding, self.flip)
        return images, self.labels[indices]

"""Tests for resexp.data: loaders, cache, subsets, and augmentation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resexp import data
from resexp.config import compose, problems
from resexp.data import TrainBatches, load_data, normalize, pixel_mean, random_crop_flip
from resexp.errors import UsageError

CLASSES = ["cat", "dog", "frog"]


def class_colour(label: int, index: int) -> tuple[int, int, int]:
    """A colour that encodes (class, image index), so tests can tell which file an image came from."""
    return (label * 80, index, 200)


def write_image(path: Path, colour: tuple[int, int, int], size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def make_folder(root: Path, train_per_class=(4, 4, 4), test_per_class=(2, 2, 2), size: int = 32) -> Path:
    """root/{train,test}/<class>/NNN.png with colour class_colour(label, index)."""
    for split, counts in (("train", train_per_class), ("test", test_per_class)):
        for label, (name, count) in enumerate(zip(CLASSES, counts)):
            for index in range(count):
                write_image(root / split / name / f"{index:03d}.png", class_colour(label, index), size)
    return root


def raises_one_line(match: str, call, *args, **kwargs) -> str:
    with pytest.raises(UsageError, match=match) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message
    return message


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """Keep every test's fallback cache inside its own tmp dir."""
    cache_home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    return cache_home


def fail_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("images were decoded although a valid cache exists")

    monkeypatch.setattr(data, "_decode_images", refuse)


# --------------------------------------------------------------------------- image folders


def test_imagefolder_loads_images_labels_and_classes(tmp_path):
    root = make_folder(tmp_path / "folder")
    write_image(root / "train" / "dog" / "extra.jpg", (10, 20, 30))  # JPEG alongside PNG
    loaded = load_data("imagefolder", str(root))

    assert loaded.classes == CLASSES
    assert loaded.eval_set == "test"
    assert loaded.train_images.shape == (13, 3, 32, 32) and loaded.train_images.dtype == torch.uint8
    assert loaded.test_images.shape == (6, 3, 32, 32) and loaded.test_images.dtype == torch.uint8
    assert loaded.train_labels.dtype == torch.int64
    assert loaded.train_labels.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    assert loaded.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    # Every PNG's pixels match its label (checks the NCHW layout and the label order).
    for image, label in zip(loaded.test_images, loaded.test_labels):
        red, green, blue = image[:, 0, 0].tolist()
        assert red == label * 80 and blue == 200
        assert torch.equal(image, image[:, :1, :1].expand(3, 32, 32))


def test_imagefolder_ignores_hidden_files_and_folders(tmp_path):
    root = make_folder(tmp_path / "folder")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"not an image")
    write_image(root / "train" / ".hidden_class" / "0.png", (1, 2, 3))
    write_image(root / "train" / "cat" / ".thumbs" / "0.png", (1, 2, 3))
    loaded = load_data("imagefolder", str(root))
    assert loaded.classes == CLASSES
    assert len(loaded.train_labels) == 12


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "folder")
    first = load_data("imagefolder", str(root))
    assert (root / ".resexp-cache.pt").is_file()

    fail_decoding(monkeypatch)
    second = load_data("imagefolder", str(root))
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    assert second.classes == CLASSES


def test_cache_is_rebuilt_when_a_file_changes_or_is_added(tmp_path):
    root = make_folder(tmp_path / "folder")
    load_data("imagefolder", str(root))

    changed = root / "train" / "cat" / "000.png"
    write_image(changed, (255, 255, 255))
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    reloaded = load_data("imagefolder", str(root))
    assert reloaded.train_images[0, :, 0, 0].tolist() == [255, 255, 255]

    write_image(root / "test" / "frog" / "new.png", (1, 2, 3))
    reloaded = load_data("imagefolder", str(root))
    assert len(reloaded.test_labels) == 7


def test_cache_depends_on_resize_flag(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "folder")
    load_data("imagefolder", str(root))
    calls = []
    real_decode = data._decode_images
    monkeypatch.setattr(data, "_decode_images", lambda *a: calls.append(a) or real_decode(*a))
    load_data("imagefolder", str(root), resize=True)
    assert len(calls) == 1


def test_unwritable_root_falls_back_to_user_cache(tmp_path, monkeypatch, user_cache):
    root = make_folder(tmp_path / "folder")
    real_atomic_write = data.atomic_write

    def read_only_root(path, write, mode="wb"):
        if Path(path).parent == root:
            raise PermissionError(13, "Permission denied", str(path))
        real_atomic_write(path, write, mode)

    monkeypatch.setattr(data, "atomic_write", read_only_root)
    first = load_data("imagefolder", str(root))

    expected = user_cache / "resexp" / (hashlib.sha1(str(root.resolve()).encode()).hexdigest() + ".pt")
    assert not (root / ".resexp-cache.pt").exists()
    assert expected.is_file()

    fail_decoding(monkeypatch)
    second = load_data("imagefolder", str(root))
    assert torch.equal(first.train_images, second.train_images)


def test_no_writable_cache_location_still_loads(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "folder")

    def nowhere(path, write, mode="wb"):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(data, "atomic_write", nowhere)
    loaded = load_data("imagefolder", str(root))
    assert len(loaded.train_labels) == 12
    assert "could not save the image cache" in capsys.readouterr().err


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
    root = make_folder(tmp_path / "folder")
    load_data("imagefolder", str(root))
    cache = root / ".resexp-cache.pt"
    cache.write_bytes(b"garbage")
    capsys.readouterr()

    loaded = load_data("imagefolder", str(root))
    assert len(loaded.train_labels) == 12
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and str(cache) in warnings[0]
    torch.load(cache, weights_only=True)  # rewritten and readable again


def test_a_cache_whose_bytes_changed_is_not_used(tmp_path, capsys):
    """Right key, right size, one pixel flipped: the checksum catches it and the images are decoded again."""
    root = make_folder(tmp_path / "folder")
    decoded = load_data("imagefolder", str(root))
    cache = root / ".resexp-cache.pt"
    saved = torch.load(cache, weights_only=True)
    saved["train_images"][0, 0, 0, 0] ^= 0xFF
    torch.save(saved, cache)
    capsys.readouterr()

    loaded = load_data("imagefolder", str(root))
    assert torch.equal(loaded.train_images, decoded.train_images)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "checksum" in warnings[0] and str(cache) in warnings[0]


def test_resize_true_resizes_larger_images(tmp_path):
    root = make_folder(tmp_path / "folder", size=40)
    loaded = load_data("imagefolder", str(root), resize=True)
    assert loaded.train_images.shape == (12, 3, 32, 32)
    assert loaded.train_images[0, :, 5, 5].tolist() == list(class_colour(0, 0))  # a flat colour stays flat


@pytest.mark.parametrize(
    "arrange, match",
    [
        (lambda root: None, "data.root '.*' does not exist"),
        (lambda root: make_folder(root) and _rmtree(root / "train"), "has no train/ folder"),
        (lambda root: make_folder(root) and _rmtree(root / "test"), "has no test/ folder"),
        (lambda root: (root / "train").mkdir(parents=True), "has no class folders"),
        (
            lambda root: make_folder(root) and (root / "train" / "empty").mkdir(),
            r"class folder '.*empty' has no images",
        ),
        (
            lambda root: make_folder(root) and write_image(root / "test" / "bird" / "0.png", (0, 0, 0)),
            "class folders differ between train/ and test/.*only in train: -; only in test: bird",
        ),
    ],
    ids=["root-missing", "train-missing", "test-missing", "no-classes", "empty-class", "class-mismatch"],
)
def test_imagefolder_layout_errors(tmp_path, arrange, match):
    root = tmp_path / "folder"
    arrange(root)
    raises_one_line(match, load_data, "imagefolder", str(root))


def _rmtree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    path.rmdir()


def test_unreadable_files_are_listed_with_a_count(tmp_path):
    root = make_folder(tmp_path / "folder")
    for index in range(5):
        (root / "train" / "dog" / f"notes{index}.txt").write_text("not an image")
    message = raises_one_line("5 file", load_data, "imagefolder", str(root))
    assert "not readable images" in message
    assert "'train/dog/notes0.txt', 'train/dog/notes1.txt', 'train/dog/notes2.txt', ..." in message
    assert "notes3" not in message


def test_wrong_size_without_resize_is_an_error(tmp_path):
    root = make_folder(tmp_path / "folder", size=40)
    message = raises_one_line("set data.resize=true to resize them to 32x32", load_data, "imagefolder", str(root))
    assert message.startswith("18 image(s)")
    assert "'train/cat/000.png' (40x40)" in message
    assert message.count("(40x40)") == 3


# Values are checked with the config, before any data is read (load_data trusts its arguments).

def test_missing_root_setting():
    for name in ("imagefolder", "cifar10"):
        [message] = problems(compose([f"data={name}", "data.root=null"]))
        assert message.startswith("data.root must be the folder") and f"data={name}" in message


def test_unknown_dataset_name():
    [message] = problems(compose(["data.name=mnist"]))
    assert "'mnist'" in message and "cifar10, imagefolder, synthetic" in message


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_missing_without_download(tmp_path):
    message = raises_one_line("CIFAR-10 not found in", load_data, "cifar10", str(tmp_path), download=False)
    assert "cifar-10-python.tar.gz" in message and "data=imagefolder" in message


def test_cifar10_failed_download(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    root = tmp_path / "data"
    message = raises_one_line("could not be downloaded", load_data, "cifar10", str(root), download=True)
    assert "network is unreachable" in message
    assert f"put cifar-10-python.tar.gz in {str(root)!r}" in message
    assert "data=imagefolder data.root=" in message
    assert not root.exists()  # the folder made for the download is gone with it


# --------------------------------------------------------------------------- synthetic data and subsets


def test_synthetic_shapes_balance_and_determinism():
    first = load_data("synthetic", "ignored", train_size=200, test_size=100, seed=3)
    again = load_data("synthetic", "ignored", train_size=200, test_size=100, seed=3)
    other = load_data("synthetic", "ignored", train_size=200, test_size=100, seed=4)

    assert first.train_images.shape == (200, 3, 32, 32) and first.train_images.dtype == torch.uint8
    assert first.test_images.shape == (100, 3, 32, 32)
    assert len(first.classes) == 10
    assert first.train_labels.bincount().tolist() == [20] * 10
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.test_labels, again.test_labels)
    assert not torch.equal(first.train_images, other.train_images)


def test_synthetic_sizes_from_the_config_and_learnability():
    from resexp.config import compose

    sizes = compose(["data=synthetic"]).data
    loaded = load_data("synthetic", "ignored", train_size=sizes.train_size, test_size=sizes.test_size)
    assert (len(loaded.train_labels), len(loaded.test_labels)) == (sizes.train_size, sizes.test_size) == (2000, 500)
    # Nearest class-mean classification must work far above chance (10%).
    train = loaded.train_images.float().flatten(1)
    means = torch.stack([train[loaded.train_labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(loaded.test_images.float().flatten(1), means).argmin(1)
    assert (predicted == loaded.test_labels).float().mean() > 0.9


def test_synthetic_sizes_of_null_are_a_usage_error():
    for size in ("data.train_size=null", "data.test_size=null"):
        assert problems(compose(["data=synthetic", size])) == [
            "data=synthetic generates data.train_size training and data.test_size test images: "
            "give both as numbers, not null"]
    assert problems(compose(["data=synthetic", "data.test_size=null", "data.val_size=100"])) == []


def unique_folder(root: Path, counts=(16, 8, 8)) -> Path:
    """Train images that all differ (class and index in the colour); 2 test images per class."""
    return make_folder(root, train_per_class=counts, test_per_class=(2, 2, 2))


def image_ids(images: torch.Tensor) -> list[tuple[int, int]]:
    return [tuple(image[:2, 0, 0].tolist()) for image in images]  # (label*80, index) identifies the file


def test_stratified_subset_is_proportional_and_seeded(tmp_path):
    root = unique_folder(tmp_path / "folder")
    subset = load_data("imagefolder", str(root), train_size=16, seed=1)
    assert subset.train_labels.bincount().tolist() == [8, 4, 4]
    assert [red // 80 for red, _ in image_ids(subset.train_images)] == subset.train_labels.tolist()

    again = load_data("imagefolder", str(root), train_size=16, seed=1)
    other = load_data("imagefolder", str(root), train_size=16, seed=2)
    assert image_ids(again.train_images) == image_ids(subset.train_images)
    assert image_ids(other.train_images) != image_ids(subset.train_images)

    test_subset = load_data("imagefolder", str(root), test_size=3)
    assert test_subset.test_labels.bincount().tolist() == [1, 1, 1]


def test_stratified_indices_rounding_is_exact():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    for size in range(1, 11):
        chosen = data.stratified_indices(labels, size, seed=0)
        assert len(chosen) == size and len(set(chosen.tolist())) == size
        counts = labels[chosen].bincount(minlength=3)
        expected = labels.bincount() * size / 10
        assert ((counts - expected).abs() < 1).all()


def test_subset_larger_than_available(tmp_path):
    root = unique_folder(tmp_path / "folder")
    message = raises_one_line(r"data.train_size=33 is larger than the training set \(32 images\)",
                              load_data, "imagefolder", str(root), train_size=33)
    assert "32" in message
    raises_one_line(r"data.test_size=7 is larger than the test set \(6 images\)",
                    load_data, "imagefolder", str(root), test_size=7)
    raises_one_line("data.val_size=32 leaves no training images", load_data, "imagefolder", str(root), val_size=32)
    assert problems(compose(["data=synthetic", "data.train_size=0"])) == [
        "data.train_size must be a positive integer or null; got 0"]


def test_validation_split_is_disjoint_stratified_and_replaces_test(tmp_path):
    root = unique_folder(tmp_path / "folder")
    split = load_data("imagefolder", str(root), val_size=8, train_size=12, seed=5)
    assert split.eval_set == "val"
    assert split.test_labels.bincount().tolist() == [4, 2, 2]
    assert split.train_labels.bincount().tolist() == [6, 3, 3]
    held_out, trained = set(image_ids(split.test_images)), set(image_ids(split.train_images))
    assert len(held_out) == 8 and len(trained) == 12
    assert not held_out & trained

    full = load_data("imagefolder", str(root), val_size=8, test_size=3, seed=5)  # test_size: no test set to cut
    assert torch.equal(full.test_labels, split.test_labels)
    assert len(full.train_labels) == 24
    assert set(image_ids(full.train_images)) | set(image_ids(full.test_images)) == {
        (label * 80, index) for label, count in enumerate((16, 8, 8)) for index in range(count)
    }


def test_synthetic_validation_split():
    split = load_data("synthetic", "", train_size=300, val_size=100, seed=0)
    assert split.eval_set == "val"
    assert len(split.train_labels) == 300 and len(split.test_labels) == 100
    trained = {image.numpy().tobytes() for image in split.train_images}
    assert not any(image.numpy().tobytes() in trained for image in split.test_images)


# --------------------------------------------------------------------------- preprocessing and augmentation


def test_pixel_mean_matches_direct_computation():
    images = torch.randint(0, 256, (2500, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = images.double().mean(0) / 255
    result = pixel_mean(images)
    assert result.dtype == torch.float32 and result.shape == (3, 32, 32)
    assert torch.allclose(result.double(), expected, atol=1e-6)


def test_normalize_scales_and_subtracts_mean():
    images = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    mean = torch.full((3, 2, 2), 0.5)
    result = normalize(images, mean)
    assert result.dtype == torch.float32
    assert torch.allclose(result[0, :, 0, 0], torch.tensor([-0.5, 0.5, -0.3]))


def all_crops_and_flips(image: torch.Tensor, padding: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    _, height, width = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    found = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + height, dx : dx + width]
            found += [(dy, dx, False, crop), (dy, dx, True, crop.flip(-1))]
    return found


def test_random_crop_flip_outputs_are_crops_of_the_padded_input():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 32, 32, generator=generator)  # distinct values: each crop/flip is identifiable
    out = random_crop_flip(x, generator, padding=4, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype

    seen_flips = set()
    for i in range(8):
        candidates = all_crops_and_flips(x[i], 4)
        matches = [(dy, dx, flipped) for dy, dx, flipped, crop in candidates if torch.equal(crop, out[i])]
        assert len(matches) == 1, f"sample {i} is not exactly one crop/flip of its padded input"
        seen_flips.add(matches[0][2])
    assert seen_flips == {False, True}


def test_random_crop_flip_covers_all_offsets_and_both_flips():
    # A ramp image: the top-left output pixel reveals the offset, the row direction reveals the flip.
    height = width = 8
    ramp = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, 1, height, width).repeat(2000, 1, 1, 1)
    out = random_crop_flip(ramp, torch.Generator().manual_seed(1), padding=2, flip=True)
    offsets, flips = set(), set()
    for i in range(len(out)):
        match = next((dy, dx, f) for dy, dx, f, crop in all_crops_and_flips(ramp[i], 2) if torch.equal(crop, out[i]))
        offsets.add(match[:2])
        flips.add(match[2])
    assert offsets == {(dy, dx) for dy in range(5) for dx in range(5)}
    assert flips == {False, True}


def test_random_crop_flip_identity_without_padding_or_flip():
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=False), x)


def test_random_crop_flip_only_flips_with_zero_padding():
    x = torch.randn(200, 3, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=True)
    flipped = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, x)])
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x)])
    assert (flipped | kept).all() and flipped.any() and kept.any()


def small_training_set(count: int = 100):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count)  # label == index, so batches reveal which images they hold
    return images, labels, pixel_mean(images)


def test_train_batches_are_reproducible_and_resumable():
    images, labels, mean = small_training_set()
    batches = TrainBatches(images, labels, batch_size=32, seed=7, mean=mean)
    assert batches.steps_per_epoch == 3

    x5, y5 = batches.batch(5)
    assert x5.shape == (32, 3, 32, 32) and x5.dtype == torch.float32 and y5.dtype == torch.int64
    batches.batch(0)  # another epoch in between must not change batch 5
    again_x, again_y = batches.batch(5)
    assert torch.equal(x5, again_x) and torch.equal(y5, again_y)

    resumed_x, resumed_y = TrainBatches(images, labels, batch_size=32, seed=7, mean=mean).batch(5)
    assert torch.equal(x5, resumed_x) and torch.equal(y5, resumed_y)

    other_x, other_y = TrainBatches(images, labels, batch_size=32, seed=8, mean=mean).batch(5)
    assert not torch.equal(y5, other_y) and not torch.equal(x5, other_x)


def test_train_batches_visit_each_image_at_most_once_per_epoch():
    images, labels, mean = small_training_set()
    batches = TrainBatches(images, labels, batch_size=32, seed=0, mean=mean)
    for epoch in range(2):
        visited = torch.cat([batches.batch(epoch * 3 + step)[1] for step in range(3)]).tolist()
        assert len(visited) == 96 and len(set(visited)) == 96
    first_epoch = torch.cat([batches.batch(step)[1] for step in range(3)])
    second_epoch = torch.cat([batches.batch(3 + step)[1] for step in range(3)])
    assert not torch.equal(first_epoch, second_epoch)  # reshuffled each epoch


def test_train_batches_without_augmentation_return_normalized_images():
    images, labels, mean = small_training_set()
    x, y = TrainBatches(images, labels, batch_size=10, seed=0, mean=mean, padding=0, flip=False).batch(4)
    assert torch.allclose(x, normalize(images[y], mean))


def test_batch_size_larger_than_training_set():
    images, labels, mean = small_training_set(20)
    message = raises_one_line(r"schedule.batch_size=128 is larger than the training set \(20 images\)",
                              TrainBatches, images, labels, 128, 0, mean)
    assert message

import numpy as np
import pytest
import torch
from PIL import Image

from tasprune.data import DataError, load_data
from tasprune.data.folder import (
    FolderImages,
    center_crop_box,
    load_folder,
    random_resized_crop_box,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _halves(w, h):
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2:] = BLUE
    return Image.fromarray(a)


def make_folder(root, classes=("bird", "cat", "dog"), per_class=3, val_per_class=2):
    """train/ and val/ with PNG and JPEG files of assorted sizes and modes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(pixels)
                if i == 0:
                    img.save(root / split / name / f"{i}.png")
                elif i == 1:
                    img.convert("L").save(root / split / name / f"{i}.JPG", quality=90)
                else:
                    img.convert("RGBA").save(root / split / name / f"{i}.png")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root


def test_folder_bundle_layout(tmp_path):
    make_folder(tmp_path)
    bundle = load_data(f"folder:{tmp_path},resolution=16,workers=0")
    assert bundle.class_names == ("bird", "cat", "dog") and bundle.num_classes == 3
    assert (bundle.in_channels, bundle.resolution) == (3, 16)
    assert len(bundle.train) == 9 and len(bundle.test) == 6
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert bundle.transform.pad == 0 and bundle.transform.flip is False
    assert bundle.transform.mean == (0.485, 0.456, 0.406)
    batches = list(bundle.test.batches(4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert all(x.dtype == torch.uint8 for x, _ in batches)
    assert torch.equal(torch.cat([y for _, y in batches]), bundle.test.labels)


def test_eval_decoding_is_a_center_crop(tmp_path):
    (tmp_path / "a").mkdir()
    _halves(40, 20).save(tmp_path / "a" / "x.png")
    source = FolderImages([tmp_path / "a" / "x.png"], torch.tensor([0]), resolution=8)
    img = source.decode(0)
    assert img.shape == (3, 8, 8)
    assert (img[0, :, :3] == 255).all() and (img[2, :, :3] == 0).all()  # left: red
    assert (img[2, :, -3:] == 255).all() and (img[0, :, -3:] == 0).all()  # right: blue
    assert center_crop_box(40, 20) == (11.25, 1.25, 28.75, 18.75)


def test_training_crops_are_reproducible_and_flip_once(tmp_path):
    (tmp_path / "a").mkdir()
    paths = []
    for i in range(6):
        _halves(32, 32).save(tmp_path / "a" / f"{i}.png")
        paths.append(tmp_path / "a" / f"{i}.png")
    source = FolderImages(paths, torch.zeros(6, dtype=torch.long), resolution=8)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([x for x, _ in source.batches(4, shuffle=True, generator=g, train=True)])

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    eval_img = source.decode(0)
    assert not all(torch.equal(x, eval_img) for x in a)  # random crops differ from eval
    # a flipped image has blue (not red) in its top-left pixel; over 12 draws both occur
    left_blue = [bool(x[2, 0, 0] > x[0, 0, 0]) for x in torch.cat([a, c])]
    assert any(left_blue) and not all(left_blue)


def test_worker_processes_give_the_same_batches(tmp_path):
    make_folder(tmp_path, per_class=4)
    one = load_folder(tmp_path, resolution=12, workers=0)
    two = load_folder(tmp_path, resolution=12, workers=2)
    for train in (False, True):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a = list(one.train.batches(5, shuffle=True, generator=g1, train=train))
        b = list(two.train.batches(5, shuffle=True, generator=g2, train=train))
        assert len(a) == len(b) == 3
        assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


@pytest.mark.parametrize("size", [(100, 100), (400, 10), (10, 400), (3, 5)])
def test_random_resized_crop_box_stays_inside(size):
    rng = np.random.default_rng(0)
    for _ in range(50):
        left, top, right, bottom = random_resized_crop_box(*size, rng)
        assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
    if size == (100, 100):
        boxes = [random_resized_crop_box(100, 100, rng) for _ in range(200)]
        fractions = [(r - left) * (b - t) / 1e4 for left, t, r, b in boxes]
        assert 0.06 < min(fractions) and max(fractions) <= 1.0
        assert all(0.7 < (r - left) / (b - t) < 1.4 for left, t, r, b in boxes)
    if size == (400, 10):  # no draw can fit: the central box with aspect 4/3
        assert random_resized_crop_box(400, 10, rng) == (193.5, 0.0, 206.5, 10.0)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_names_the_file(tmp_path, workers):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    bundle = load_folder(tmp_path, resolution=8, workers=workers)
    with pytest.raises(DataError, match=r"broken.jpg: cannot read image"):
        list(bundle.train.batches(3))
    # in the evaluation split, it is found when the data is loaded, before any training
    bad.rename(tmp_path / "val" / "cat" / "broken.jpg")
    with pytest.raises(DataError, match=r"val/cat/broken.jpg: cannot read image"):
        load_folder(tmp_path, resolution=8, workers=workers)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_data(f"folder:{tmp_path / 'none'}")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no val/ \(or test/\) directory"):
        load_folder(tmp_path)
    (tmp_path / "val" / "b").mkdir(parents=True)
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"val: class folder\(s\) b have no counterpart"):
        load_folder(tmp_path)
    (tmp_path / "val" / "b").rmdir()
    (tmp_path / "train" / "c").rmdir()
    with pytest.raises(DataError, match=r"only one class folder \(a\); a classifier needs at "
                                        "least two"):
        load_folder(tmp_path)
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) a, c hold no images"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="option resolution='big': expected a whole number"):
        load_data(f"folder:{tmp_path},resolution=big")
    with pytest.raises(DataError, match="applies only to folder datasets"):
        load_data("demo", resolution=32)


def test_folder_info_cli(tmp_path, capsys):
    from tasprune.cli import main

    make_folder(tmp_path)
    assert main(["data", "info", f"folder:{tmp_path},resolution=32,workers=0"]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 3x32x32 images" in out and "random resized crop at decode time" in out
    assert "classes: bird, cat, dog" in out

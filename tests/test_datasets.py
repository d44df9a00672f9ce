"""Tests for minilib.datasets: shapes, digits, the MNIST/CIFAR readers and batching."""

import gzip
import hashlib
import io
import struct
import tarfile
import urllib.error

import numpy as np
import pytest
import torch

from minilib import datasets as D
from minilib.datasets import (COLOURS, POSITIONS, SHAPES, ImageDataset, ShapesDataset, caption,
                              few_shot_split, infinite_batches, load_cifar10, load_digits,
                              load_mnist, render_shapes, select_classes, tokenize)


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(600, image_size=32, seed=0)


# --- shapes -----------------------------------------------------------------


def test_shapes_shapes_dtypes_and_range(shapes):
    assert shapes.images.shape == (600, 3, 32, 32)
    assert shapes.images.dtype == torch.float32
    assert shapes.images.min() >= -1 and shapes.images.max() <= 1
    assert shapes.labels.shape == (600,) and shapes.labels.dtype == torch.int64
    assert shapes.attributes.shape == (600, 3)
    assert len(shapes.captions) == 600 and len(shapes) == 600
    assert len(shapes.class_names) == len(SHAPES) * len(COLOURS) == 24
    image, label = shapes[3]
    assert image.shape == (3, 32, 32) and label.item() == shapes.labels[3].item()


def test_shapes_deterministic_by_seed():
    a, b, c = ShapesDataset(50, seed=7), ShapesDataset(50, seed=7), ShapesDataset(50, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.captions == b.captions
    assert not torch.equal(a.images, c.images)


def test_captions_and_labels_match_attributes(shapes):
    for i in range(0, 600, 37):
        shape, colour, position = shapes.attributes[i].tolist()
        assert shapes.captions[i] == f"a {COLOURS[colour]} {SHAPES[shape]}, {POSITIONS[position]}"
        assert shapes.labels[i] == shape * len(COLOURS) + colour
        assert shapes.class_names[shapes.labels[i]] == f"{COLOURS[colour]} {SHAPES[shape]}"


def test_caption_helper_accepts_ids_and_names():
    assert caption(0, 0, 0) == "a red circle, top left"
    assert caption("triangle", "blue", "centre") == "a blue triangle, centre"
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        caption("circle", "purple", "centre")


@pytest.mark.parametrize("label, count", [("shape", 4), ("colour", 6), ("position", 5)])
def test_other_label_kinds(label, count):
    ds = ShapesDataset(240, seed=1, label=label)
    assert len(ds.class_names) == count
    column = {"shape": 0, "colour": 1, "position": 2}[label]
    assert torch.equal(ds.labels, ds.attributes[:, column])


def test_classes_are_balanced(shapes):
    counts = torch.bincount(shapes.labels, minlength=24)
    assert counts.min() >= 600 // 24 - 5 and counts.max() <= 600 // 24 + 5
    # 600 = 5 full decks of the 120 shape x colour x position combinations: exactly balanced.
    combos = shapes.attributes @ torch.tensor([30, 5, 1])
    assert torch.equal(torch.bincount(combos, minlength=120), torch.full((120,), 5))


def test_circle_centre_pixel_has_its_colour():
    image = render_shapes(torch.tensor([0]), torch.tensor([2]), torch.tensor([4]),
                          torch.tensor([0.2]), image_size=32)[0]
    blue = D.COLOUR_RGB[2] * 2 - 1
    assert torch.allclose(image[:, 16, 16], blue, atol=1e-6)       # centre of the image
    assert torch.allclose(image[:, 0, 0], D.BACKGROUND_RGB * 2 - 1, atol=1e-6)
    # anti-aliasing: some edge pixels lie strictly between background and colour
    red_channel = image[0]
    background = D.BACKGROUND_RGB[0] * 2 - 1
    assert ((red_channel > background + 0.01) & (red_channel < blue[0] - 0.01)).any()


def test_every_shape_is_drawn_inside_its_quadrant():
    ids = torch.arange(4)
    images = render_shapes(ids, ids, torch.zeros(4, dtype=torch.long), torch.full((4,), 0.22), 32)
    covered = (images - images[:, :, :1, :1]).abs().sum(1) > 0.05            # (4, H, W)
    assert covered[:, :16, :16].any(dim=(1, 2)).all()       # drawn in the top left quadrant
    assert not covered[:, 17:, :].any() and not covered[:, :, 17:].any()
    # the four shapes really differ
    for i in range(4):
        for j in range(i):
            assert (covered[i] != covered[j]).any()


def test_render_any_size_and_on_a_device():
    for size in (8, 13, 64):
        ds = ShapesDataset(10, image_size=size, device="cpu")
        assert ds.images.shape == (10, 3, size, size) and ds.images.device.type == "cpu"


def test_render_rejects_bad_input():
    ids = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="image_size must be an int >= 8"):
        render_shapes(ids, ids, ids, torch.full((2,), 0.2), image_size=4)
    with pytest.raises(ValueError, match=r"colour_ids must lie in \[0, 5\]"):
        render_shapes(ids, ids + 6, ids, torch.full((2,), 0.2))
    with pytest.raises(TypeError, match="shape_ids must be an integer tensor"):
        render_shapes([0, 1], ids, ids, torch.full((2,), 0.2))
    with pytest.raises(ValueError, match="label must be one of"):
        ShapesDataset(10, label="size")


def test_tokenize_round_trips_captions(shapes):
    tokens = tokenize(shapes.captions[:5])
    assert tokens.shape == (5, 6) and tokens.dtype == torch.long
    words = [" ".join(D.VOCAB[t] for t in row if t != 0) for row in tokens.tolist()]
    assert words == [c.replace(",", " ,") for c in shapes.captions[:5]]


def test_few_shot_split(shapes):
    train, held_out = few_shot_split(shapes.class_names, num_held_out=4, seed=0)
    assert len(held_out) == 4 and sorted(train + held_out) == list(range(24))
    assert few_shot_split(24, 4, seed=0) == (train, held_out)
    assert few_shot_split(24, 4, seed=1) != (train, held_out)
    subset = select_classes(shapes, held_out)
    assert set(subset.labels.tolist()) == set(held_out)
    assert all(subset.class_names[l] in c for l, c in zip(subset.labels.tolist(), subset.captions))
    with pytest.raises(ValueError, match="num_held_out"):
        few_shot_split(24, 24)


def test_infinite_batches(shapes):
    batches = infinite_batches(shapes, batch_size=64, seed=0)
    images, labels = next(batches)
    assert images.shape == (64, 3, 32, 32) and labels.shape == (64,)
    first_epoch = torch.cat([labels] + [next(batches)[1] for _ in range(8)])   # 9 x 64 <= 600
    assert len(first_epoch) == 576
    again = infinite_batches(shapes, batch_size=64, seed=0)
    assert torch.equal(next(again)[0], images)
    for _ in range(30):     # keeps going past the end of an epoch
        next(batches)
    sizes, colours = next(infinite_batches((shapes.sizes, shapes.attributes), 8))
    assert sizes.shape == (8,) and colours.shape == (8, 3)
    with pytest.raises(ValueError, match="batch_size"):
        next(infinite_batches(shapes, batch_size=601))


def test_image_dataset_validates():
    images, labels = torch.zeros(3, 1, 8, 8), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(torch.zeros(3, 8, 8), labels, ["a", "b"])
    with pytest.raises(ValueError, match="labels must be"):
        ImageDataset(images, torch.zeros(4, dtype=torch.long), ["a", "b"])


def test_image_dataset_requires_integer_labels_in_range():
    images = torch.zeros(3, 1, 8, 8)
    with pytest.raises(TypeError, match="labels must be an integer tensor.*float32"):
        ImageDataset(images, torch.tensor([0.0, 1.0, 0.5]), ["a", "b"])
    with pytest.raises(TypeError, match="labels must be an integer tensor.*bool"):
        ImageDataset(images, torch.tensor([True, False, True]), ["a", "b"])
    with pytest.raises(ValueError, match=r"labels.*2 class_names.*\[0, 1\], got min 0 max 2"):
        ImageDataset(images, torch.tensor([0, 1, 2]), ["a", "b"])
    with pytest.raises(ValueError, match=r"labels.*got min -1"):
        ImageDataset(images, torch.tensor([0, -1, 1]), ["a", "b"])
    with pytest.raises(TypeError, match="class_names must be a non-empty list of strings"):
        ImageDataset(images, torch.tensor([0, 1, 1]), "ab")
    ok = ImageDataset(images, torch.tensor([0, 1, 1], dtype=torch.int32), ["a", "b"])
    assert ok.labels.dtype == torch.int64 and ok.labels.tolist() == [0, 1, 1]


def test_image_dataset_requires_float_images_in_minus_one_one():
    labels = torch.tensor([0, 1])
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"images must be floating point.*uint8.*uint8_to_unit"):
        ImageDataset(pixels, labels, ["a", "b"])
    with pytest.raises(ValueError, match=r"images must have values in \[-1, 1\], got 0 to 255"):
        ImageDataset(pixels.float().index_fill_(0, torch.tensor([0]), 255.0).clamp(0, 255)
                     .index_fill_(1, torch.tensor([0]), 0.0), labels, ["a", "b"])
    with pytest.raises(ValueError, match="images must be finite"):
        ImageDataset(torch.full((2, 3, 4, 4), float("nan")), labels, ["a", "b"])
    doubles = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    converted = ImageDataset(doubles, labels, ["a", "b"])       # documented: float64 -> float32
    assert converted.images.dtype == torch.float32
    torch.testing.assert_close(converted.images, doubles.float())
    assert ImageDataset(D.uint8_to_unit(pixels), labels, ["a", "b"]).images.max() <= 1


def test_subset_keeps_the_checked_values(shapes):
    part = shapes.subset([3, 1])
    assert torch.equal(part.images, shapes.images[[3, 1]]) and part.labels.tolist() == shapes.labels[[3, 1]].tolist()
    assert part.captions == [shapes.captions[3], shapes.captions[1]]


@pytest.mark.parametrize("jitter", [2, -0.01, 0.051, float("nan"), float("inf")])
def test_shapes_reject_jitter_outside_the_documented_range(jitter):
    with pytest.raises(ValueError, match=r"jitter .*must be in \[0, 0.05\]"):
        ShapesDataset(10, jitter=jitter)


def test_shapes_with_the_largest_jitter_stay_inside_the_image():
    data = ShapesDataset(240, image_size=32, jitter=D.MAX_JITTER, seed=3)
    assert data.offsets.abs().max() <= D.MAX_JITTER
    # In the outermost ring of pixels every shape covers less than half a pixel (coverage < 0.5):
    # the shape's edge does not reach the pixel centres, half a pixel inside the image's edge.
    background = (D.BACKGROUND_RGB * 2 - 1).view(1, 3, 1)
    colour = (D.COLOUR_RGB[data.attributes[:, 1]] * 2 - 1).view(-1, 3, 1)
    ring = torch.cat([data.images[..., 0, :], data.images[..., -1, :],
                      data.images[..., :, 0], data.images[..., :, -1]], dim=-1)      # (N, 3, 4W)
    channel = (colour - background).abs().argmax(dim=1, keepdim=True)               # the clearest channel
    coverage = ((ring - background) / (colour - background)).gather(1, channel.expand(-1, 1, ring.shape[-1]))
    assert coverage.max() < 0.5
    assert (ShapesDataset(240, image_size=32, jitter=D.MAX_JITTER, seed=3, size_range=(0.3, 0.3)).images[..., 0, :]
            - background).abs().max() > 1   # a shape that does run off the image fails this test
    with pytest.raises(ValueError, match="size_range"):
        ShapesDataset(10, size_range=(float("nan"), 0.2))


# --- digits -----------------------------------------------------------------


def test_digits():
    digits = load_digits()
    assert digits.images.shape == (1797, 1, 16, 16)
    assert digits.images.min() == -1 and digits.images.max() == 1
    assert digits.labels.min() == 0 and digits.labels.max() == 9
    assert digits.class_names == [str(d) for d in range(10)]
    assert load_digits(image_size=8).images.shape == (1797, 1, 8, 8)


# --- MNIST ------------------------------------------------------------------


def write_idx(path, array, magic=None, compress=False):
    array = np.asarray(array, dtype=np.uint8)
    magic = magic if magic is not None else 0x00000800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_mnist(root, prefix, n, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files(tmp_path, compress):
    images, labels = fake_mnist(tmp_path, "t10k", 5, compress)
    mnist = load_mnist(tmp_path, train=False)
    assert mnist.images.shape == (5, 1, 28, 28)
    assert torch.equal(mnist.labels, torch.from_numpy(labels.astype(np.int64)))
    expected = torch.from_numpy(images).float() / 127.5 - 1
    assert torch.allclose(mnist.images[:, 0], expected)
    assert mnist.images.min() >= -1 and mnist.images.max() <= 1
    assert load_mnist(tmp_path, train=False, image_size=16).images.shape == (5, 1, 16, 16)


def test_mnist_bad_magic(tmp_path):
    fake_mnist(tmp_path, "train", 3, compress=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)), magic=0x12345678)
    with pytest.raises(ValueError, match="magic number is 0x12345678"):
        load_mnist(tmp_path)


def test_mnist_truncated_file(tmp_path):
    fake_mnist(tmp_path, "train", 3, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="should hold 2352 bytes"):
        load_mnist(tmp_path)


def test_mnist_missing_files_say_where(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_mnist(tmp_path / "nowhere")
    message = str(error.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "nowhere") in message
    assert "download=True" in message


def test_download_failure_names_url_and_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(D.DownloadError) as error:
        load_mnist(tmp_path, download=True)
    message = str(error.value)
    assert D.MNIST_URL + "train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in message
    assert not files_in(tmp_path)     # no half-written files left behind


def files_in(folder):
    """The files in ``folder`` other than download locks."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".locks")


# --- CIFAR-10 ---------------------------------------------------------------


def write_cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    records.tofile(path)
    return images, labels


def test_cifar10_reads_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    images, labels = write_cifar_batch(folder / "test_batch.bin", 4, seed=0)
    test = load_cifar10(tmp_path, train=False)
    assert test.images.shape == (4, 3, 32, 32)
    assert torch.allclose(test.images, torch.from_numpy(images).float() / 127.5 - 1)
    assert torch.equal(test.labels, torch.from_numpy(labels.astype(np.int64)))
    assert test.class_names[0] == "airplane" and len(test.class_names) == 10

    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}.bin", 2, seed=i)
    train = load_cifar10(tmp_path, train=True, image_size=16)
    assert train.images.shape == (10, 3, 16, 16)


def test_cifar10_bad_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_cifar10(tmp_path, train=False)
    assert "test_batch.bin" in str(error.value)
    assert str(tmp_path / "cifar-10-batches-bin") in str(error.value)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="3073-byte record"):
        load_cifar10(tmp_path, train=False)


class FakeResponse(io.BytesIO):
    """Stands in for urlopen's answer, so the download path runs without a network."""

    def __init__(self, payload):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def test_cifar10_download_extracts_only_the_batches(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_cifar_batch(source / "cifar-10-batches-bin" / "test_batch.bin", 3, seed=0)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(source / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
        evil = tarfile.TarInfo("../evil.txt")
        tar.addfile(evil, io.BytesIO(b""))
    payload = archive.getvalue()
    monkeypatch.setattr(D, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))

    root = tmp_path / "data"
    test = load_cifar10(root, train=False, download=True)
    assert len(test) == 3
    assert (root / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert not (tmp_path / "evil.txt").exists() and not (root / "cifar-10-binary.tar.gz").exists()


def test_download_checks_the_md5(tmp_path, monkeypatch):
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"junk"))
    with pytest.raises(D.DownloadError, match="MD5.*download was deleted"):
        load_mnist(tmp_path, download=True)
    assert not files_in(tmp_path)


def test_load_dataset_reads_every_real_format_from_the_data_root(tmp_path, monkeypatch):
    from minilib.datasets import DATA_ENV, data_root, load_dataset, write_miniature_files
    write_miniature_files(tmp_path, images_per_split=20)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    mnist = load_dataset("mnist", image_size=32, limit=12)
    assert mnist.images.shape == (12, 1, 32, 32) and mnist.labels.tolist() == [i % 10 for i in range(12)]
    fashion = load_dataset("fashion-mnist", train=False)
    assert fashion.images.shape == (20, 1, 28, 28) and fashion.class_names[9] == "ankle boot"
    cifar = load_dataset("cifar10")
    assert cifar.images.shape == (100, 3, 32, 32) and cifar.class_names[0] == "airplane"
    assert load_dataset("digits").images.shape == (1797, 1, 8, 8)


def test_load_dataset_says_what_it_expected(tmp_path, monkeypatch):
    from minilib.datasets import OFFLINE_ENV, DownloadError, load_dataset
    with pytest.raises(ValueError, match="expected one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", limit=0)
    with pytest.raises(FileNotFoundError, match="load_fashion_mnist"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(DownloadError):
        load_dataset("mnist", root=tmp_path)

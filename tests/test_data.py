"""data.py: augmentation, the deterministic batch order, synthetic data, and real/missing/corrupt datasets."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from simpnet_cli.train import data as D
from simpnet_cli.config import tables
from simpnet_cli.errors import UserError


def _cfg(name: str, **over) -> dict:
    return {**tables.load_named("dataset", name), **over}


def _feed(name="cifar10", input="per_channel_standardized", augment="pad4_crop32_mirror",
          test_transform="centre_crop32", **over) -> dict:
    """A synthetic dataset config with the three feed keys (independent of conf/dataset/*.yaml)."""
    shapes = {"cifar10": ("CIFAR10", 10, 3, 32), "mnist": ("MNIST", 10, 1, 28), "svhn": ("SVHN", 10, 3, 32)}
    tv, classes, channels, size = shapes[name]
    return {"name": name, "torchvision": tv, "classes": classes, "channels": channels, "size": size,
            "input": input, "augment": augment, "test_transform": test_transform,
            "source": "synthetic", "train_size": 64, "test_size": 32, **over}


def _load(cfg: dict, batch: int = 16, seed: int = 0) -> D.DeviceData:
    return D.load(cfg, Path("/nonexistent"), False, torch.device("cpu"), batch, seed)


def _images(b=3, c=2, h=6, w=5) -> torch.Tensor:
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).reshape(b, c, h, w)


def _offsets(b, oy, ox):
    return torch.tensor([[oy, ox]] * b)


# --------------------------------------------------------------------------- crop and flip

def test_centre_crop_without_flip_is_identity():
    x = _images()
    out = D.crop_and_flip(x, _offsets(3, D.PAD, D.PAD), torch.zeros(3, dtype=torch.bool))
    assert out.shape == x.shape
    assert torch.equal(out, x)


def test_top_left_crop_is_zero_padded():
    x = _images()
    out = D.crop_and_flip(x, _offsets(3, 0, 0), torch.zeros(3, dtype=torch.bool))
    assert out.shape == x.shape
    assert (out[:, :, :D.PAD, :] == 0).all() and (out[:, :, :, :D.PAD] == 0).all()
    assert torch.equal(out[:, :, D.PAD:, D.PAD:], x[:, :, :-D.PAD, :-D.PAD])


def test_bottom_right_crop():
    x = _images(h=8, w=8)
    out = D.crop_and_flip(x, _offsets(3, 2 * D.PAD, 2 * D.PAD), torch.zeros(3, dtype=torch.bool))
    assert (out[:, :, -D.PAD:, :] == 0).all() and (out[:, :, :, -D.PAD:] == 0).all()
    assert torch.equal(out[:, :, :-D.PAD, :-D.PAD], x[:, :, D.PAD:, D.PAD:])


def test_flip_mirrors_left_right():
    x = _images()
    flips = torch.ones(3, dtype=torch.bool)
    assert torch.equal(D.crop_and_flip(x, _offsets(3, D.PAD, D.PAD), flips), x.flip(-1))
    crop = D.crop_and_flip(x, _offsets(3, 1, 2), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(D.crop_and_flip(x, _offsets(3, 1, 2), flips), crop.flip(-1))


def test_each_image_gets_its_own_offset_and_flip():
    x = _images(b=4, c=3, h=32, w=32)
    offsets = torch.tensor([[4, 4], [0, 0], [8, 3], [4, 4]])
    flips = torch.tensor([False, False, True, True])
    out = D.crop_and_flip(x, offsets, flips)
    assert out.shape == x.shape
    for i in range(4):
        one = D.crop_and_flip(x[i:i + 1], offsets[i:i + 1], flips[i:i + 1])
        assert torch.equal(out[i:i + 1], one)
    assert torch.equal(out[0], x[0]) and torch.equal(out[3], x[3].flip(-1))


# --------------------------------------------------------------------------- batch order

def _device_data(n=250, batch=100, seed=0, augment=True, size=4) -> D.DeviceData:
    # Image i is filled with the value i (mod 256), so a batch shows which images it gathered.
    x = (torch.arange(n) % 256).to(torch.uint8).repeat_interleave(size * size).reshape(n, 1, size, size)
    y = torch.arange(n) % 10
    return D.DeviceData(x, y, x[:10], y[:10], shift=torch.zeros(1, 1, 1), scale=torch.ones(1, 1, 1),
                        crop=augment, mirror=augment, batch_size=batch, seed=seed)


def _same_plan(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def test_batch_plan_is_a_function_of_seed_and_iteration():
    a, b = _device_data(seed=3), _device_data(seed=3)
    # Asked in a different order (and so with a different cached epoch), the plan is the same.
    plans_a = [a.batch_plan(i) for i in range(7)]
    plans_b = [b.batch_plan(i) for i in reversed(range(7))][::-1]
    for pa, pb in zip(plans_a, plans_b):
        assert _same_plan(pa, pb)
    assert _same_plan(a.batch_plan(5), plans_a[5])


def test_different_seeds_give_different_orders():
    a, b = _device_data(seed=0), _device_data(seed=1)
    assert not torch.equal(a.batch_plan(0)[0], b.batch_plan(0)[0])
    assert not torch.equal(a.batch_plan(0)[1], b.batch_plan(0)[1])


def test_an_epoch_visits_every_image_once():
    d = _device_data(n=250, batch=50)
    seen = torch.cat([d.batch_plan(i)[0] for i in range(5)])
    assert sorted(seen.tolist()) == list(range(250))
    second = torch.cat([d.batch_plan(i)[0] for i in range(5, 10)])
    assert sorted(second.tolist()) == list(range(250))
    assert not torch.equal(seen, second), "each epoch draws its own permutation"


def test_batches_wrap_across_epoch_ends():
    """250 images, batch 100: iteration 2 takes the last 50 of epoch 0 and the first 50 of epoch 1."""
    d = _device_data(n=250, batch=100)
    plans = [d.batch_plan(i) for i in range(5)]
    assert all(len(p[0]) == 100 and len(p[1]) == 100 and len(p[2]) == 100 for p in plans)
    idx = [p[0] for p in plans]
    epoch0 = torch.cat([idx[0], idx[1], idx[2][:50]])
    epoch1 = torch.cat([idx[2][50:], idx[3], idx[4]])
    assert sorted(epoch0.tolist()) == list(range(250))
    assert sorted(epoch1.tolist()) == list(range(250))
    perm0, off0, flip0 = d._epoch_plan(0)
    perm0, off0, flip0 = perm0.clone(), off0.clone(), flip0.clone()
    perm1, off1, flip1 = d._epoch_plan(1)
    assert torch.equal(idx[2][:50], perm0[200:]) and torch.equal(idx[2][50:], perm1[:50])
    assert torch.equal(plans[2][1][:50], off0[200:]) and torch.equal(plans[2][1][50:], off1[:50])
    assert torch.equal(plans[2][2][:50], flip0[200:]) and torch.equal(plans[2][2][50:], flip1[:50])
    # 500 images later the stream is at the start of epoch 2.
    assert torch.equal(d.batch_plan(5)[0], d._epoch_plan(2)[0][:100])


def test_offsets_and_flips_are_in_range_and_mixed():
    d = _device_data(n=250, batch=250)
    _, offsets, flips = d.batch_plan(0)
    assert offsets.min() >= 0 and offsets.max() <= 2 * D.PAD
    assert len(offsets.unique()) == 2 * D.PAD + 1
    assert 0.3 < flips.float().mean() < 0.7


def test_batch_gathers_normalises_and_augments():
    d = _device_data(n=250, batch=100, augment=False)
    x, y = d.batch(3)
    idx = d.batch_plan(3)[0]
    assert x.dtype == torch.float32 and x.shape == (100, 1, 4, 4)
    assert torch.equal(x[:, 0, 0, 0], idx.float())  # image i is filled with the value i
    assert torch.equal(y, idx % 10)
    aug = _device_data(n=250, batch=100, augment=True)
    xa, _ = aug.batch(3)
    assert xa.shape == x.shape and (xa == 0).any()  # some crops reach into the zero padding


# --------------------------------------------------------------------------- synthetic data

@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "svhn"])
def test_synthetic_data_has_the_datasets_shape(name):
    cfg = _cfg(name, source="synthetic", train_size=64, test_size=32)
    for train, n in ((True, 64), (False, 32)):
        x, y = D.load_split(cfg, Path("/nonexistent"), train, False)
        assert x.shape == (n, cfg["channels"], cfg["size"], cfg["size"]) and x.dtype == torch.uint8
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) < cfg["classes"]
    x1, y1 = D.load_split(cfg, Path("/nonexistent"), True, False)
    x2, y2 = D.load_split(cfg, Path("/nonexistent"), True, False)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


# --------------------------------------------------------------------------- the feed: input, augment, test_transform

def test_mirror_feed_never_crops():
    """Table 5's feed (mean_file, mirror only): every training image is exactly its normalised source or that
    source mirrored, as the epoch's flip says, though the epoch's crop offsets are still drawn (and off-centre)."""
    d = _load(_feed(input="mean_file", augment="mirror", test_transform="none", train_size=64), batch=16)
    assert not d.crop and d.mirror
    seen = {True: 0, False: 0}
    off_centre = 0
    for it in range(40):  # 10 epochs of 64 images
        idx, offsets, flips = d.batch_plan(it)
        x, _ = d.batch(it)
        src = d.normalize(d.train_x[idx])
        for j in range(len(idx)):
            assert not torch.equal(src[j], src[j].flip(-1))  # the pixel test can tell the two apart
            want = src[j].flip(-1) if flips[j] else src[j]
            assert torch.equal(x[j], want), (it, j)
            seen[bool(flips[j])] += 1
        off_centre += int((offsets != D.PAD).any(1).sum())
    assert seen[True] > 50 and seen[False] > 50
    assert off_centre > 0  # offsets were drawn and ignored, not absent


@pytest.mark.parametrize("table,row_id", [("5", "P3"), ("10", "5x5-end")])
def test_a_table_5_or_10_batch_from_the_rows_config_is_never_cropped(table, row_id):
    """Through the row's own config (conf/tables -> feed mean_file_mirror): no pad, no shift, only mirrors."""
    from conftest import resolve_row

    run = resolve_row(table, row_id, profile={"data": {"source": "synthetic", "train_size": 32, "test_size": 8}})
    d = D.load(run.dataset, Path("unused"), False, torch.device("cpu"), 16, 0)
    assert not d.crop and d.mirror
    for it in range(6):
        idx, _, flips = d.batch_plan(it)
        src = d.normalize(d.train_x[idx])
        want = torch.where(flips[:, None, None, None], src.flip(-1), src)
        assert torch.equal(d.batch(it)[0], want)


def test_the_random_stream_does_not_depend_on_the_feed():
    plans = [_load(_feed(augment=a, input=i), seed=5).batch_plan(7)
             for a, i in (("pad4_crop32_mirror", "per_channel_standardized"), ("mirror", "mean_file"),
                          ("none", "scale_1_255"))]
    for other in plans[1:]:
        assert _same_plan(plans[0], other)


def test_no_augmentation_feed_is_the_normalised_image():
    d = _load(_feed(input="scale_1_255", augment="none", test_transform="none"))
    assert not d.crop and not d.mirror
    for it in range(8):
        idx, _, _ = d.batch_plan(it)
        assert torch.equal(d.batch(it)[0], d.normalize(d.train_x[idx]))


def test_per_channel_standardized_input():
    d = _load(_feed(input="per_channel_standardized", train_size=200, test_size=50), batch=50)
    raw = d.train_x.numpy().astype(np.float64)
    mean, std = raw.mean(axis=(0, 2, 3)), raw.std(axis=(0, 2, 3))  # population std, as the authors' script
    assert d.shift.shape == (3, 1, 1) and d.scale.shape == (3, 1, 1)
    assert np.allclose(d.shift.flatten().numpy(), mean, atol=1e-4)
    assert np.allclose(1 / d.scale.flatten().double().numpy(), std, rtol=1e-6)
    z = d.normalize(d.train_x).double()
    assert z.mean((0, 2, 3)).abs().max() < 1e-5
    assert (z.std((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-5
    # The test split is standardised with the TRAINING set's statistics.
    xt, _ = next(d.test_batches())
    want_t = (d.test_x.double() - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(xt.double(), want_t, atol=1e-5)
    # Padded after standardising: a crop at (0, 0) shows a 4-px border of exact zeros (the mean colour) and
    # the standardised image inside it.
    assert d.crop and d.mirror
    idx = torch.arange(8)
    out = d.images(idx, torch.zeros(8, 2, dtype=torch.long), torch.zeros(8, dtype=torch.bool))
    assert (out[:, :, :D.PAD, :] == 0).all() and (out[:, :, :, :D.PAD] == 0).all()
    want = (d.train_x[idx].double() - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(out[:, :, D.PAD:, D.PAD:].double(), want[:, :, :-D.PAD, :-D.PAD], atol=1e-5)
    assert (out[:, :, D.PAD:, D.PAD:] != 0).float().mean() > 0.99


def test_mean_file_input_subtracts_the_mean_image():
    d = _load(_feed(input="mean_file", augment="none", test_transform="none", train_size=200, test_size=50),
              batch=50)
    raw = d.train_x.numpy().astype(np.float64)
    mean_image = raw.mean(0)
    assert d.shift.shape == (3, 32, 32)
    assert np.allclose(d.shift.numpy(), mean_image, atol=1e-4)
    assert torch.equal(d.scale, torch.ones_like(d.scale))
    z = d.normalize(d.train_x).double().numpy()
    assert np.allclose(z, raw - mean_image, atol=1e-4)
    assert np.abs(z.mean(0)).max() < 1e-3
    assert z.std() > 10  # raw pixel scale: only the mean is removed


@pytest.mark.parametrize("name,input", [("cifar10", "scale_1_255"), ("mnist", "unknown_norm2")])
def test_scaled_inputs_are_caffe_1_over_255(name, input):
    d = _load(_feed(name, input=input, augment="none", test_transform="none"))
    z = d.normalize(d.train_x)
    assert torch.equal(z, d.train_x.float() * 0.0039215684)  # Caffe's scale, no mean
    assert torch.equal(d.shift, torch.zeros_like(d.shift))
    assert z.min() >= 0 and z.max() <= 1 and z.max() > 0.5


@pytest.mark.parametrize("key", ["input", "augment", "test_transform"])
@pytest.mark.parametrize("value", ["zscore", True, None])
def test_unknown_feed_values_are_user_errors(key, value):
    cfg = _feed(**{key: value})
    if value is None:
        del cfg[key]
    with pytest.raises(UserError, match=key) as info:
        _load(cfg)
    allowed = {"input": D.INPUTS, "augment": D.AUGMENTS, "test_transform": D.TEST_TRANSFORMS}[key]
    msg = str(info.value)
    assert all(a in msg for a in allowed) and "\n" not in msg


class _StubSVHN:
    """torchvision.datasets.SVHN's interface, recording which splits were read. Split k's images are filled
    with k + 1, so the order of the concatenation shows."""
    calls: list = []
    sizes = {"train": 5, "extra": 7, "test": 3}

    def __init__(self, root, split="train", download=False):
        type(self).calls.append(split)
        n = self.sizes[split]
        self.data = np.full((n, 3, 32, 32), list(self.sizes).index(split) + 1, dtype=np.uint8)
        self.labels = [i % 10 for i in range(n)]


@pytest.mark.parametrize("extra,splits", [(None, ["train", "extra"]), (True, ["train", "extra"]),
                                          (False, ["train"])])
def test_svhn_reads_train_and_extra_by_default(monkeypatch, tmp_path, extra, splits):
    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "SVHN", _StubSVHN)
    monkeypatch.setattr(_StubSVHN, "calls", [])
    cfg = _feed("svhn", source=None)
    if extra is not None:
        cfg["extra"] = extra
    x, y = D.load_split(cfg, tmp_path, True, False)
    assert _StubSVHN.calls == splits
    assert len(x) == len(y) == sum(_StubSVHN.sizes[s] for s in splits)
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert x[:5].eq(1).all() and x[5:].eq(2).all()
    _StubSVHN.calls.clear()
    xt, _ = D.load_split(cfg, tmp_path, False, False)
    assert _StubSVHN.calls == ["test"] and len(xt) == 3


def test_fewer_images_than_a_batch_is_a_user_error():
    cfg = _feed(train_size=8, test_size=8)
    with pytest.raises(UserError, match="fewer than one batch"):
        D.load(cfg, Path("/nonexistent"), False, torch.device("cpu"), 16, 0)


# --------------------------------------------------------------------------- real, missing and corrupt datasets

def test_fashion_mnist_imported_from_the_system_copy(tmp_path):
    from conftest import FASHION_SYSTEM_COPY, NO_FASHION
    if not FASHION_SYSTEM_COPY.is_dir():
        pytest.skip(NO_FASHION)
    cfg = _cfg("fashion_mnist")
    assert Path(cfg["system_copy"]) == FASHION_SYSTEM_COPY
    x, y = D.load_split(cfg, tmp_path, True, False)  # an empty data_dir: imported from the system copy
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and sorted(y.unique().tolist()) == list(range(10))
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    xt, yt = D.load_split(cfg, tmp_path, False, False)
    assert xt.shape == (10000, 1, 28, 28) and xt.dtype == torch.uint8 and yt.shape == (10000,)
    assert 20 < x.float().mean().item() < 120  # real images, not zeros


def test_fashion_mnist_subset(fashion_mnist_dir):
    cfg = _cfg("fashion_mnist", train_size=500, test_size=200, input="scale_1_255", augment="none",
               test_transform="none")
    d = D.load(cfg, fashion_mnist_dir, False, torch.device("cpu"), 50, 0)
    assert d.train_x.shape == (500, 1, 28, 28) and d.test_x.shape == (200, 1, 28, 28)
    d2 = D.load(cfg, fashion_mnist_dir, False, torch.device("cpu"), 50, 0)
    assert torch.equal(d.train_x, d2.train_x) and torch.equal(d.test_y, d2.test_y)


def _one_line_dataset_error(cfg, root, train=True, download=False) -> str:
    with pytest.raises(D.DatasetError) as info:
        D.load_split(cfg, root, train, download)
    assert isinstance(info.value, UserError)
    msg = str(info.value)
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    assert str(root) in msg
    return msg


def test_missing_dataset_says_how_to_get_it(tmp_path):
    msg = _one_line_dataset_error(_cfg("cifar10"), tmp_path)
    assert "download=true" in msg
    assert "cifar10" in msg


def test_missing_mnist_without_a_system_copy(tmp_path):
    cfg = _cfg("fashion_mnist", system_copy=str(tmp_path / "no-such-copy"))
    msg = _one_line_dataset_error(cfg, tmp_path / "data")
    assert "download=true" in msg


def _corrupt_copy(fashion_mnist_dir: Path, tmp_path: Path, write) -> Path:
    root = tmp_path / "data"
    shutil.copytree(fashion_mnist_dir, root)
    write(root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte")
    return root


def test_truncated_dataset_is_a_dataset_error(fashion_mnist_dir, tmp_path):
    def truncate(p: Path):
        with open(p, "r+b") as fh:
            fh.truncate(1000)
    root = _corrupt_copy(fashion_mnist_dir, tmp_path, truncate)
    _one_line_dataset_error(_cfg("fashion_mnist"), root)
    # The intact test split still loads.
    assert D.load_split(_cfg("fashion_mnist"), root, False, False)[0].shape == (10000, 1, 28, 28)


def test_garbage_dataset_file_is_a_dataset_error(fashion_mnist_dir, tmp_path):
    """A file that is not in MNIST's format at all (bad magic number): torchvision fails an ``assert``, which
    must still reach the user as a one-line DatasetError, not an internal error."""
    root = _corrupt_copy(fashion_mnist_dir, tmp_path, lambda p: p.write_bytes(b"<html>not an idx file</html>" * 40))
    _one_line_dataset_error(_cfg("fashion_mnist"), root)


def test_empty_dataset_file_is_a_dataset_error(fashion_mnist_dir, tmp_path):
    root = _corrupt_copy(fashion_mnist_dir, tmp_path, lambda p: p.write_bytes(b""))
    _one_line_dataset_error(_cfg("fashion_mnist"), root)

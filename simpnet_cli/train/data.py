"""Datasets as tensors on the training device, cut into batches and augmented there with tensor ops.

torchvision's dataset classes read (and, with ``download=true``, fetch) the files once; the images then
live on the device as uint8 and every batch is gathered, cropped, mirrored and normalised by batched
tensor ops, with no PIL and no worker processes (a 15-worker PIL pipeline feeds an H100 only ~15K img/s).

The data order is a pure function of (seed, iteration): each epoch draws its permutation, crop offsets
and mirror flags from a generator seeded by (seed, epoch), and iteration i takes images i*B .. (i+1)*B
of the endless stream of epochs, wrapping across epoch ends as Caffe's data layer does. A resumed run
therefore needs only its iteration to continue the exact same order.

A dataset config's feed, as the authors' Caffe pipelines did it (shared/reference/experiments.yaml, "recipe keys"):
``input`` (how pixels are normalised), ``augment`` (crop/mirror in training) and ``test_transform``.
"""
from __future__ import annotations

import gzip
import pickle
import socket
import tarfile
import urllib.error
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from simpnet_cli.errors import UserError
# The allowed values of the three feed keys (one vocabulary, the reference's; anything else is a UserError).
from simpnet_cli.config.schemas import AUGMENTS, INPUTS, SVHN_EXTRA_IMAGES, TEST_TRANSFORMS, TORCHVISION_TRAIN_IMAGES

SYNTHETIC_TRAIN = 512  # synthetic training images when the profile names no train_size
PAD = 4  # the authors zero-pad CIFAR images by 4 px before the random 32x32 crop
CAFFE_SCALE = 0.0039215684  # Caffe's transform_param scale as the authors wrote it (~1/255)

# TEST_TRANSFORMS: centre_crop32 is the centre 32x32 crop of the authors' 40x40 padded test DB, i.e. the unpadded
# image; our test images are never padded, so both values are the identity here. The key is kept (and checked) so
# a config says what the authors did and a typo is caught.


class DatasetError(UserError):
    pass


def _torchvision_split(cfg: dict, root: Path, train: bool, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, cfg["torchvision"])
    if cfg["torchvision"] == "SVHN":
        # The authors trained on train + extra (604,388 images), hence the default.
        splits = (["train", "extra"] if cfg.get("extra", True) else ["train"]) if train else ["test"]
        parts = [cls(str(root), split=s, download=download) for s in splits]
        x = torch.cat([torch.as_tensor(p.data) for p in parts])  # already N,C,H,W
        y = torch.cat([torch.as_tensor(p.labels) for p in parts])
        return x, y
    ds = cls(str(root), train=train, download=download)
    x = torch.as_tensor(ds.data)
    if x.ndim == 3:            # MNIST-like: N,H,W
        x = x[:, None]
    elif x.shape[-1] in (1, 3):  # CIFAR: N,H,W,C
        x = x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(ds.targets)


def import_idx_gz(src: Path, root: Path, folder: str) -> None:
    """Unpack MNIST-format ``*-idx?-ubyte.gz`` files (e.g. Debian's dataset-fashion-mnist) where torchvision
    looks for them: ``root/<folder>/raw/``."""
    raw = Path(root) / folder / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise unwritable(root, err) from None
    for gz in Path(src).glob("*-ubyte.gz"):
        target = raw / gz.name[:-3]
        if not target.exists():
            # Unpacked beside it and renamed: a truncated archive must not leave a partial file that later
            # reads would take for the dataset.
            tmp = target.with_name(f".{target.name}.tmp")
            try:
                with gzip.open(gz) as fin:  # errors reading it are the archive's (load_split says so) ...
                    try:
                        fout = open(tmp, "wb")
                    except OSError as err:
                        raise unwritable(root, err) from None
                    with fout:
                        while chunk := fin.read(1 << 20):
                            try:
                                fout.write(chunk)
                            except OSError as err:  # ... and writing the copy data_dir's
                                raise unwritable(root, err) from None
                        try:
                            fout.flush()  # (so that closing it writes nothing more that could fail)
                        except OSError as err:
                            raise unwritable(root, err) from None
                tmp.replace(target)
            finally:
                try:
                    tmp.unlink(missing_ok=True)
                except OSError:
                    pass


def unwritable(root: Path, err: OSError) -> DatasetError:
    return DatasetError(f"data_dir {root} cannot hold the dataset ({err.strerror or err}"
                        + (f": {err.filename}" if err.filename else "") + "): give data_dir=PATH a folder you "
                        "can write")


def expected_files(cfg: dict, root: Path) -> list[Path]:
    """The files torchvision reads for a dataset config (both splits), where it looks for them; [] when the
    class is not one we know the layout of (then only loading it tells)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, str(cfg.get("torchvision")), None)
    if cls is None:
        return []
    if isinstance(cls, type) and issubclass(cls, tvd.CIFAR10):
        return [root / cls.base_folder / name for name, _ in cls.train_list + cls.test_list]
    if isinstance(cls, type) and issubclass(cls, tvd.MNIST):
        return [root / cls.__name__ / "raw" / Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
    if cls is tvd.SVHN:
        splits = ["train", "test"] + (["extra"] if cfg.get("extra", True) else [])
        return [root / cls.split_list[s][1] for s in splits]
    return []


def missing_file(cfg: dict, data_dir: Path, download: bool) -> Path | None:
    """The first file a dataset needs that is not on disk (nor in its system copy), or None when it is there,
    synthetic or to be downloaded. A data_dir that is not a folder is said as such."""
    if cfg.get("source") == "synthetic":
        return None
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"data_dir {root} is not a folder: give data_dir=PATH a folder for the datasets")
    if download:
        return None
    system_copy = cfg.get("system_copy")
    if system_copy and Path(system_copy).is_dir() and list(Path(system_copy).glob("*-ubyte.gz")):
        return None
    return next((p for p in expected_files(cfg, Path(data_dir)) if not p.is_file()), None)


def check_available(cfgs: list[dict], data_dir: Path, download: bool) -> None:
    """Before anything trains: every dataset that is neither synthetic, nor to be downloaded, nor on disk (or in
    its system copy) is named now, all in one line, not one per attempt after the others' runs have trained."""
    missing = {}
    for cfg in cfgs:
        path = missing_file(cfg, data_dir, download)
        if path is not None:
            missing.setdefault(cfg.get("name"), path)
    if len(missing) == 1:
        ((name, path),) = missing.items()
        raise DatasetError(f"dataset {name} not found under {data_dir} (no {path}): pass download=true to fetch it, "
                           f"or data_dir=PATH to use another copy")
    if missing:
        raise DatasetError(f"{len(missing)} datasets not found under {data_dir}: "
                           + ", ".join(f"{name} (no {path})" for name, path in missing.items())
                           + "; pass download=true to fetch them, or data_dir=PATH to use another copy")


def train_images(cfg: dict) -> int | None:
    """How many training images a run of this dataset config gets (its subset, its synthetic data, or the whole
    torchvision training split), without reading them; None when unknown."""
    if cfg.get("source") == "synthetic":
        return int(cfg.get("train_size") or SYNTHETIC_TRAIN)
    full = TORCHVISION_TRAIN_IMAGES.get(str(cfg.get("torchvision")))
    if full is not None and cfg.get("torchvision") == "SVHN" and cfg.get("extra", True):
        full += SVHN_EXTRA_IMAGES
    subset = cfg.get("train_size")
    return min(subset, full) if subset and full else (subset or full)


def check_batch(cfg: dict, batch_size: int) -> None:
    """Before anything trains: a batch larger than the training set (``load`` would refuse it at the run's start,
    after the command's other runs had trained)."""
    n = train_images(cfg)
    if n is not None and n < batch_size:
        raise UserError(f"dataset {cfg.get('name')}: {n:,} training images is fewer than one batch of "
                        f"{batch_size:,}: make batch_size smaller (or profile.data.train_size larger)")


def load_split(cfg: dict, data_dir: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N,C,H,W; int64 labels) for one split, from torchvision or synthesised."""
    if cfg.get("source") == "synthetic":
        return synthetic(cfg, train)
    root = Path(data_dir)
    system_copy = cfg.get("system_copy")
    if system_copy and not download and Path(system_copy).is_dir():
        try:
            import_idx_gz(Path(system_copy), root, cfg["torchvision"])
        except (OSError, EOFError, zlib.error) as err:  # a truncated or damaged archive (BadGzipFile: OSError)
            raise DatasetError(f"dataset {cfg['name']}: the system copy {system_copy} is damaged "
                               f"({type(err).__name__}: {err}); reinstall it, or pass download=true") from None
    try:
        x, y = _torchvision_split(cfg, root, train, download)
    except RuntimeError as err:
        if "not found" in str(err).lower() or "download=true" in str(err).lower():
            if download:
                raise DatasetError(f"dataset {cfg['name']} could not be downloaded to {root} (no network?): "
                                   f"fetch it on a connected machine and pass data_dir=PATH") from None
            raise DatasetError(f"dataset {cfg['name']} not found or corrupt under {root}: "
                               f"pass download=true to fetch it, or data_dir=PATH to use another copy") from None
        raise DatasetError(f"cannot read dataset {cfg['name']} under {root}: {err}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror) as err:
        if not download:
            raise DatasetError(f"cannot read dataset {cfg['name']} under {root}: {err}") from None
        raise DatasetError(f"dataset {cfg['name']} could not be downloaded to {root} ({type(err).__name__}: no "
                           f"network?): fetch it on a connected machine and pass data_dir=PATH") from None
    except (OSError, ValueError, EOFError, IndexError, KeyError, AssertionError, pickle.UnpicklingError,
            tarfile.TarError, zlib.error) as err:  # (a truncated archive: tarfile, zlib)
        # torchvision's MNIST reader asserts on a bad header; CIFAR's unpickler raises KeyError/UnpicklingError
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise DatasetError(f"dataset {cfg['name']} under {root} is corrupt ({why}); "
                           f"delete it and pass download=true") from None
    if x.shape[1:] != (cfg["channels"], cfg["size"], cfg["size"]) or len(x) != len(y) or len(x) == 0:
        raise DatasetError(f"dataset {cfg['name']} under {root} has images of shape {tuple(x.shape[1:])} "
                           f"({len(x)} images, {len(y)} labels), expected "
                           f"{(cfg['channels'], cfg['size'], cfg['size'])}: the files are corrupt")
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= cfg["classes"]:
        raise DatasetError(f"dataset {cfg['name']} under {root} has labels outside 0..{cfg['classes'] - 1}: "
                           f"the files are corrupt")
    return x, y


def synthetic(cfg: dict, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Data shaped like the dataset, for smoke runs without a download: one smooth random prototype per class
    plus noise, so a network can (slowly) learn it. The same prototypes for both splits."""
    n = int(cfg.get("train_size" if train else "test_size") or (SYNTHETIC_TRAIN if train else 256))
    c, s, k = cfg["channels"], cfg["size"], cfg["classes"]
    g = torch.Generator().manual_seed(12345)
    protos = torch.nn.functional.interpolate(torch.rand(k, c, 4, 4, generator=g) * 255, size=(s, s),
                                             mode="bilinear", align_corners=False)
    g.manual_seed(1 if train else 2)
    y = torch.randint(0, k, (n,), generator=g)
    x = protos[y] + 40 * torch.randn(n, c, s, s, generator=g)
    return x.clamp(0, 255).to(torch.uint8), y


def _subset(x, y, n: int | None, seed: int):
    if not n or n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


@dataclass
class DeviceData:
    """Train and test sets on one device, with the batch recipe of one dataset config."""
    train_x: torch.Tensor   # uint8 N,C,H,W
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    shift: torch.Tensor     # float, broadcastable to C,H,W: subtracted from raw 0..255 pixels
    scale: torch.Tensor     # float, broadcastable to C,H,W: multiplies the shifted pixels
    crop: bool              # training images: zero-pad by PAD after normalising, then a random HxW crop
    mirror: bool            # training images: random horizontal mirror
    batch_size: int
    seed: int

    def __post_init__(self):
        self._epoch, self._order = -1, None

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def _epoch_plan(self, epoch: int):
        """The permutation, crop offsets and mirror flags of one epoch (cached for the current one)."""
        if epoch != self._epoch:
            n = len(self.train_x)
            g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g)
            offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            self._order = tuple(t.to(self.device) for t in (perm, offsets, flips))
            self._epoch = epoch
        return self._order

    def batch_plan(self, iteration: int):
        """(image indices, crop offsets, mirror flags) for one iteration."""
        n, b = len(self.train_x), self.batch_size
        start = iteration * b
        parts, taken = [], 0
        while taken < b:
            epoch, pos = divmod(start + taken, n)
            k = min(b - taken, n - pos)
            perm, off, flip = self._epoch_plan(epoch)
            parts.append((perm[pos:pos + k], off[pos:pos + k], flip[pos:pos + k]))
            taken += k
        return tuple(torch.cat(t) for t in zip(*parts)) if len(parts) > 1 else parts[0]

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        return (x_u8.float() - self.shift) * self.scale

    def images(self, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """The training images ``idx``, normalised, then cropped and/or mirrored as the feed says. The branches
        are on config flags, never on tensor values, so this stays capturable in a CUDA graph; unused offsets
        or flips are simply ignored (they are drawn anyway, so the random stream does not depend on the feed)."""
        x = self.normalize(self.train_x[idx])
        if self.crop:
            return crop_and_flip(x, offsets, flips if self.mirror else torch.zeros_like(flips))
        if self.mirror:
            return torch.where(flips[:, None, None, None], x.flip(-1), x)
        return x

    def batch(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, offsets, flips = self.batch_plan(iteration)
        return self.images(idx, offsets, flips), self.train_y[idx]

    def test_batches(self, size: int = 1000):
        # test_transform is the identity on our unpadded test images (see TEST_TRANSFORMS): normalise only.
        for i in range(0, len(self.test_x), size):
            yield self.normalize(self.test_x[i:i + size]), self.test_y[i:i + size]

    @property
    def epoch_len(self) -> int:
        return len(self.train_x)


def crop_and_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Zero-pad by PAD, crop each image at its own offset back to HxW, mirror where ``flips``: one gather."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)          # B,H
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)          # B,W
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _feed_key(cfg: dict, key: str, allowed: tuple[str, ...]) -> str:
    value = cfg.get(key)
    if value not in allowed:
        got = "nothing (the key is missing)" if key not in cfg else repr(value)
        raise UserError(f"dataset {cfg.get('name')}: {key} must be one of {', '.join(allowed)}, got {got}")
    return value


def _pixel_mean(x: torch.Tensor, chunk: int = 10_000) -> torch.Tensor:
    """The per-pixel mean image (float32 C,H,W) of uint8 images, summed exactly in float64 a chunk at a time
    (a float copy of SVHN's 604K training images would take 7 GB)."""
    total = torch.zeros(x.shape[1:], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk].sum(0, dtype=torch.float64)
    return (total / len(x)).float()


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std (numpy's np.std) over all pixels of uint8 images, in float64 from
    each channel's 256-bin histogram: exact, and without a float copy of the data."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        means.append(mean)
        stds.append(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt())
    return torch.stack(means), torch.stack(stds)


def _normalisation(cfg: dict, train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) of the config's ``input``, from the training set: pixels become (x - shift) * scale."""
    c = train_x.shape[1]
    kind = cfg["input"]
    if kind == "per_channel_standardized":
        # The authors' CIFAR preprocessing: standardise with the training set's per-channel mean/std (then pad;
        # the zero padding in crop_and_flip is therefore the mean colour, as in their padded DB).
        mean, std = _channel_stats(train_x)
        std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel: leave it at 0, not NaN
        return mean.float().view(c, 1, 1), (1.0 / std).float().view(c, 1, 1)
    if kind == "mean_file":
        return _pixel_mean(train_x), torch.ones(c, 1, 1)
    # scale_1_255 is Caffe's scale; unknown_norm2 (MNIST's *_lmdb_norm2 DB) has no recorded scaling: we ASSUME
    # it is the same 1/255 scaling (an assumption, not the authors' documented recipe).
    return torch.zeros(c, 1, 1), torch.full((c, 1, 1), CAFFE_SCALE)


def load(cfg: dict, data_dir: Path, download: bool, device: torch.device, batch_size: int, seed: int) -> DeviceData:
    """Both splits of a dataset config on ``device``, subset as the config says (``train_size``/``test_size``),
    with the feed of its ``input``, ``augment`` and ``test_transform`` keys."""
    # Checked before reading any data, so a typo fails at once.
    _feed_key(cfg, "input", INPUTS)
    augment = _feed_key(cfg, "augment", AUGMENTS)
    _feed_key(cfg, "test_transform", TEST_TRANSFORMS)
    train_x, train_y = load_split(cfg, data_dir, True, download)
    test_x, test_y = load_split(cfg, data_dir, False, download)
    if cfg.get("source") != "synthetic":
        train_x, train_y = _subset(train_x, train_y, cfg.get("train_size"), 0)
        test_x, test_y = _subset(test_x, test_y, cfg.get("test_size"), 1)
    if len(train_x) < batch_size:
        raise UserError(f"dataset {cfg['name']}: {len(train_x)} training images is fewer than one batch of {batch_size}")
    shift, scale = _normalisation(cfg, train_x)
    return DeviceData(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device),
                      shift.to(device), scale.to(device), crop=augment == "pad4_crop32_mirror",
                      mirror=augment in ("pad4_crop32_mirror", "mirror"), batch_size=batch_size, seed=seed)

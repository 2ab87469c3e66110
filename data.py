"""Datasets (SPEC §6, §7): the built-in synthetic images, CelebA, plain image folders, and a resumable
shuffled batch stream. Images are stored as uint8 (N, H, W, 3) arrays (memory-mapped .npy caches for the
real datasets) and become float tensors in [-1, 1] only per batch.

Bad input raises DataError with one line naming the file or folder and what to do. A corrupt or truncated
image is not an error: it is skipped with a warning that counts the skipped files.
"""
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from plots import plot_tv_curves  # noqa: F401
from synthetic import (Synthetic, attribute_loss_curves, factor_distances, factor_table, loss_curves,  # noqa: F401
                       loss_gain_shares, pixel_distance, tv_distance)

CACHE_VERSION = "v1"          # bump when rendering or preprocessing changes, to invalidate caches
CELEBA_CROP = (25, 57, 153, 185)                     # SPEC §6: left 25, top 57, 128 x 128
CELEBA_SPLITS = ("train", "valid", "test")
CELEBA_INDEX_SPLITS = (0, 162770, 182637)            # SPEC §5: first index of train, valid, test
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class DataError(ValueError):
    """A data folder or file is missing or malformed; the message says which and what to do."""


@dataclass
class Dataset:
    images: np.ndarray              # (N, H, W, 3) uint8, possibly a read-only np.memmap
    labels: np.ndarray = None       # (N, F) int64, or None when unlabelled
    factor_names: list = None       # F names
    num_values: list = None         # classes per factor (2 for binary attributes)
    kind: str = None                # 'multiclass' (synthetic), 'binary' (CelebA) or None

    def __len__(self):
        return len(self.images)


def to_tensor(images_uint8):
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]: x = u / 127.5 - 1."""
    a = np.ascontiguousarray(images_uint8)
    x = torch.from_numpy(a if a.flags.writeable else a.copy()).permute(0, 3, 1, 2)
    # contiguous NCHW: a channels-last input crashed conv backward on the torch 2.13 CPU build
    return (x.float() / 127.5 - 1).contiguous()


def to_uint8(x):
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) numpy, clamped and rounded."""
    u = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.permute(0, 2, 3, 1).numpy()


# ---- a resumable, shardable stream of shuffled batches --------------------------------------------------
class BatchStream:
    """Infinite iterator of image batches (B, 3, H, W) in [-1, 1].

    Epoch e visits the images in the order numpy.random.default_rng([seed, e]).permutation(N); a batch
    that runs past the end of an epoch continues into the next. Flips (p = 0.5 per image) come from
    default_rng([seed, e, position, 1]). All randomness is a function of (seed, epoch, position), so the
    state (epoch, position) resumes the stream exactly. With world > 1, rank r keeps elements r, r + world,
    ... of each global batch of batch_size, so the ranks together see exactly the single-process batch.
    """

    def __init__(self, dataset, batch_size, seed, flip=False, rank=0, world=1):
        if batch_size % world:
            raise DataError(f"batch size {batch_size} is not divisible by world size {world}: change either")
        if len(dataset) == 0:
            raise DataError("the dataset is empty: check the data folder")
        self.dataset, self.batch_size, self.seed, self.flip = dataset, batch_size, seed, flip
        self.rank, self.world = rank, world
        self.epoch, self.position = 0, 0
        self._perm = None

    def shard(self, rank, world):
        """The same stream, restricted to rank's share (batch_size // world per batch)."""
        s = BatchStream(self.dataset, self.batch_size, self.seed, self.flip, rank, world)
        s.load_state_dict(self.state_dict())
        return s

    def _permutation(self):
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset)))
        return self._perm[1]

    def next_indices(self):
        """Global batch: (batch_size,) dataset indices and (batch_size,) flip flags; advances the state."""
        idx, flips, count = [], [], 0
        while count < self.batch_size:
            take = self._permutation()[self.position:self.position + self.batch_size - count]
            rng = np.random.default_rng([self.seed, self.epoch, self.position, 1])
            idx.append(take)
            flips.append(rng.random(len(take)) < 0.5 if self.flip else np.zeros(len(take), bool))
            self.position, count = self.position + len(take), count + len(take)
            if self.position == len(self.dataset):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(idx), np.concatenate(flips)

    def __iter__(self):
        return self

    def __next__(self):
        idx, flips = self.next_indices()
        idx, flips = idx[self.rank::self.world], flips[self.rank::self.world]
        order = np.argsort(idx, kind="stable")               # sorted reads are kinder to a memmap
        images = np.empty((len(idx), *self.dataset.images.shape[1:]), np.uint8)
        images[order] = self.dataset.images[idx[order]]
        images[flips] = images[flips, :, ::-1]
        return to_tensor(images)                                 # (B // world, 3, H, W)

    def state_dict(self):
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, batch_size=self.batch_size)

    def load_state_dict(self, state):
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise DataError(f"batch stream state has seed {state['seed']}, batch {state['batch_size']}, but this "
                            f"stream has seed {self.seed}, batch {self.batch_size}: resume with the same settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def batches(dataset, batch_size, seed, flip=False):
    """An infinite, resumable iterator of shuffled image batches (see BatchStream)."""
    return BatchStream(dataset, batch_size, seed, flip)


# ---- caches -------------------------------------------------------------------------------------------------
def user_cache_dir():
    return Path(os.environ.get("DITI_CACHE", Path.home() / ".cache" / "diti"))


def folder_cache_dir(data_dir, cache_dir):
    """cache_dir if given, else <data_dir>/.diti_cache when writable, else the user cache (keyed by path)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.access(data_dir, os.W_OK):
        return Path(data_dir) / ".diti_cache"
    return user_cache_dir() / hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]


def require_dir(path, what):
    if not Path(path).is_dir():
        raise DataError(f"{what} folder {path} does not exist: download it or pass the right data_dir")
    return Path(path)


# ---- the synthetic dataset --------------------------------------------------------------------------------
def load_synthetic(size=32, seed=0, n_train=20000, n_test=4000, cache_dir=None, strength=1.0, fine_loss_time=0,
                   texture_cell=1, texture_region="object"):
    """SPEC §7 data: {'train', 'test': Dataset, 'generator': Synthetic}; identical for a given seed and
    cached as .npz under cache_dir (default $DITI_CACHE or ~/.cache/diti), keyed by the rendering constants.
    fine_loss_time > 0: the fine factors made stronger, lost at about that t; texture_cell > 1: the texture's
    checker in cells of that many pixels; texture_region "image": the checker over the whole image (all three
    beyond the paper; Synthetic)."""
    gen = Synthetic(size, seed, strength, fine_loss_time=fine_loss_time, texture_cell=texture_cell,
                    texture_region=texture_region)
    cache = Path(cache_dir) if cache_dir is not None else user_cache_dir()
    path = cache / f"synthetic_{CACHE_VERSION}_{gen.fingerprint()}_s{size}_seed{seed}_n{n_train}_{n_test}.npz"
    if path.exists():
        arrays = dict(np.load(path))
    else:
        labels = {"train": gen.sample_labels(n_train, np.random.default_rng([seed, 0])),
                  "test": gen.sample_labels(n_test, np.random.default_rng([seed, 1]))}
        arrays = {f"{k}_labels": v for k, v in labels.items()}
        arrays.update({f"{k}_images": gen.render(v) for k, v in labels.items()})
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")    # one per process: ranks may race
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    out = {k: Dataset(arrays[f"{k}_images"], arrays[f"{k}_labels"], gen.factor_names, gen.num_values, "multiclass")
           for k in ("train", "test")}
    return {**out, "generator": gen}


# ---- real images: one-time preprocessing into a uint8 .npy cache ----------------------------------------
def load_rgb(path):
    """Open and fully decode an image; None if it is corrupt or truncated."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError):
        return None


def celeba_image(args):
    """SPEC §6: crop 128 x 128 at (top 57, left 25), resize to size (bilinear). uint8 (size, size, 3) or None."""
    path, size = args
    im = load_rgb(path)
    return None if im is None else np.asarray(im.crop(CELEBA_CROP).resize((size, size), Image.BILINEAR))


def centre_square_image(args):
    """Centre crop to a square, resize to size (bilinear). uint8 (size, size, 3) or None."""
    path, size = args
    im = load_rgb(path)
    if im is None:
        return None
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(im.crop(box).resize((size, size), Image.BILINEAR))


def preprocess(paths, size, transform, out_path, workers=None, desc="preprocess"):
    """Decode every path into out_path (a uint8 (n_ok, size, size, 3) .npy written through a memmap).
    Returns the (len(paths),) bool mask of images that decoded; the others are skipped with a warning."""
    tmp = out_path.with_name(out_path.stem + ".partial.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    ok = np.zeros(len(paths), bool)
    workers = (os.cpu_count() if len(paths) >= 2000 else 1) if workers is None else workers
    pool = Pool(workers) if workers > 1 else None
    jobs = [(p, size) for p in paths]
    n_ok = 0
    try:
        results = pool.imap(transform, jobs, chunksize=64) if pool else map(transform, jobs)
        for i, img in enumerate(tqdm(results, total=len(paths), desc=desc)):
            if img is not None:
                mm[n_ok], ok[i], n_ok = img, True, n_ok + 1
    finally:
        if pool:
            pool.terminate()
    mm.flush()
    del mm
    if n_ok < len(paths):
        bad = [str(p) for p, good in zip(paths, ok) if not good]
        warnings.warn(f"skipped {len(bad)} corrupt or truncated image(s), e.g. {bad[0]}")
        full = np.load(tmp, mmap_mode="r")
        final = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(n_ok, size, size, 3))
        for i in range(0, n_ok, 4096):
            final[i:i + 4096] = full[i:min(i + 4096, n_ok)]
        final.flush()
        del full, final
        os.remove(tmp)
    else:
        os.replace(tmp, out_path)
    return ok


# ---- CelebA (SPEC §6) -------------------------------------------------------------------------------------
def read_attributes(path):
    """list_attr_celeba.txt -> (file names, 40 attribute names, (N, 40) int64 labels with -1 -> 0)."""
    lines = Path(path).read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"{path} line 1: expected the image count, then a line of attribute names: re-download it")
    names = lines[1].split()
    files, rows = [], []
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1 or any(v not in ("-1", "1") for v in parts[1:]):
            raise DataError(f"{path} line {number}: expected a file name and {len(names)} values of -1/1, "
                            f"got {line.strip()[:60]!r}: fix or re-download the file")
        files.append(parts[0])
        rows.append([int(v) for v in parts[1:]])
    if int(lines[0]) != len(files):
        warnings.warn(f"{path} says {int(lines[0])} images but lists {len(files)}; using the {len(files)} listed")
    return files, names, (np.asarray(rows, np.int64).reshape(-1, len(names)) > 0).astype(np.int64)


def read_partition(path, files):
    """list_eval_partition.txt -> (N,) split ids 0/1/2 for files, in order."""
    split = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path} line {number}: expected 'file 0|1|2', got {line.strip()[:60]!r}: fix the file")
        split[parts[0]] = int(parts[1])
    missing = [f for f in files if f not in split]
    if missing:
        raise DataError(f"{path} has no split for {len(missing)} image(s), e.g. {missing[0]}: re-download it")
    return np.asarray([split[f] for f in files], np.int64)


def index_partition(n):
    """SPEC §5 splits by image index: train 0-162769, valid 162770-182636, test 182637-202598."""
    return np.searchsorted(np.asarray(CELEBA_INDEX_SPLITS[1:]), np.arange(n), side="right")


def load_celeba(data_dir, size=64, cache_dir=None, workers=None):
    """CelebA as {'train', 'valid', 'test': Dataset} with 40 binary labels; images memory-mapped from a
    one-time uint8 cache (default <data_dir>/.diti_cache). Corrupt JPEGs are skipped with a warning."""
    root = require_dir(data_dir, "CelebA")
    img_dir, attr_path = root / "img_align_celeba", root / "list_attr_celeba.txt"
    if not img_dir.is_dir():
        raise DataError(f"CelebA folder {root} has no img_align_celeba/: unzip img_align_celeba.zip into {root}")
    if not attr_path.is_file():
        raise DataError(f"CelebA folder {root} has no list_attr_celeba.txt: download it from the CelebA site "
                        f"into {root}")
    cache = folder_cache_dir(root, cache_dir) / f"celeba_{CACHE_VERSION}_{size}"
    meta_path = cache / "meta.json"
    if not meta_path.exists():
        files, names, labels = read_attributes(attr_path)
        part_path = root / "list_eval_partition.txt"
        split = read_partition(part_path, files) if part_path.is_file() else index_partition(len(files))
        present = np.asarray([(img_dir / f).is_file() for f in files], bool)
        if not present.all():
            warnings.warn(f"{(~present).sum()} image(s) listed in {attr_path} are missing from {img_dir}; skipped")
        order = np.argsort(split, kind="stable")            # rows grouped by split: train, valid, test
        order = order[present[order]]
        cache.mkdir(parents=True, exist_ok=True)
        ok = preprocess([img_dir / files[i] for i in order], size, celeba_image, cache / "images.npy",
                        workers, desc="CelebA preprocessing")
        np.save(cache / "labels.npy", labels[order][ok])
        np.save(cache / "split.npy", split[order][ok])
        meta_path.write_text(json.dumps({"names": names}))
    images = np.load(cache / "images.npy", mmap_mode="r")
    labels, split = np.load(cache / "labels.npy"), np.load(cache / "split.npy")
    names = json.loads(meta_path.read_text())["names"]
    bounds = np.searchsorted(split, [0, 1, 2, 3])                 # rows are grouped by split
    return {name: Dataset(images[bounds[k]:bounds[k + 1]], labels[bounds[k]:bounds[k + 1]], names,
                          [2] * len(names), "binary") for k, name in enumerate(CELEBA_SPLITS)}


# ---- image folders (FFHQ, LSUN bedroom) ------------------------------------------------------------------
def load_image_folder(data_dir, size, cache_dir=None, workers=None):
    """Every jpg/jpeg/png/webp under data_dir (recursive, sorted), centre-cropped and resized: {'train': Dataset}."""
    root = require_dir(data_dir, "image")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and ".diti_cache" not in p.parts)
    if not paths:
        raise DataError(f"image folder {root} has no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files: "
                        f"put the images there or pass the right data_dir")
    cache = folder_cache_dir(root, cache_dir) / f"folder_{CACHE_VERSION}_{size}_{len(paths)}"
    done = cache / "done"
    if not done.exists():
        cache.mkdir(parents=True, exist_ok=True)
        preprocess(paths, size, centre_square_image, cache / "images.npy", workers, desc="image preprocessing")
        done.touch()
    return {"train": Dataset(np.load(cache / "images.npy", mmap_mode="r"))}


# ---- one entry point ----------------------------------------------------------------------------------------
LOADERS = ("synthetic", "celeba", "folder")


def load_data(name, data_dir=None, size=32, seed=0, **kw):
    """Dispatch: 'synthetic' (built in), 'celeba' or 'folder' (need data_dir)."""
    if name == "synthetic":
        return load_synthetic(size=size, seed=seed, **kw)
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(LOADERS)}")
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs data_dir: pass the folder that holds the images")
    return (load_celeba if name == "celeba" else load_image_folder)(data_dir, size=size, **kw)

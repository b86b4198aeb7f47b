"""A user's own evaluation data: an ImageFolder tree, an ``.npz`` file, or tensors in memory.

Whatever comes in leaves as float images in [0, 1], NCHW, with integer labels, because the
threat model's eps is always measured in that pixel space (normalization belongs inside the
model).  Every problem found on the way in raises a ``ValueError``/``TypeError`` whose one-line
message names the fix:

* ``.npz`` with ``x`` (uint8 0-255, or floats in [0, 1]; NHW, NHWC or NCHW) and ``y``;
* a folder in torchvision's ImageFolder layout (one sub-folder of PNG/JPEG images per class,
  classes indexed in sorted folder order); the points are put in a fixed, seeded order so that
  the first ``n`` mix the classes (a sorted folder would give class 0 first);
* tensors or arrays ``(x, y)`` in memory, with the same rules as ``.npz``.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: the most classes a user's labels may index (ImageNet-21k has 21,843): a larger label is an id, not a class index
MAX_CLASSES = 100_000
# grey = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601 luma, what PIL's convert("L") uses)
_LUMA = (0.299, 0.587, 0.114)


def as_unit_nchw(x: object, *, what: str = "x", channels_hint: int | None = None) -> Tensor:
    """Images as float32 in [0, 1], NCHW.

    uint8 arrays are divided by 255; float arrays must already lie in [0, 1] (floats in 0-255,
    or negative values from a normalized dataset, are refused with the fix).  A 3-D array is
    NHW (grey); a 4-D array is NCHW when its second axis is 1 or 3 (or ``channels_hint``), NHWC
    when its last axis is."""
    arr = _as_tensor(x, what)
    if arr.dtype == torch.bool or not (arr.is_floating_point() or arr.dtype == torch.uint8):
        whole = arr.dtype in (torch.int16, torch.int32, torch.int64)
        if whole and arr.numel() and int(arr.min()) >= 0 and int(arr.max()) <= 255:
            arr = arr.to(torch.uint8)
        else:
            raise TypeError(f"{what} must hold uint8 pixels (0-255) or floats in [0, 1], got {arr.dtype}")
    if arr.dim() == 3:
        arr = arr.unsqueeze(1)
    elif arr.dim() == 4:
        arr = _to_channels_first(arr, what, channels_hint)
    else:
        raise ValueError(f"{what} must be NHW, NHWC or NCHW images, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} holds no images")
    if arr.dtype == torch.uint8:
        return arr.float().div_(255.0).contiguous()
    arr = arr.float()
    if not torch.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf values; clean the data first")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0:
        raise ValueError(
            f"{what} has negative values (min {lo:.3g}): it looks normalized; pass raw pixels in [0, 1] "
            "and give the normalization to the model (--normalize MEAN,STD)"
        )
    if hi > 1.0:
        raise ValueError(
            f"{what} holds floats up to {hi:.4g}, outside [0, 1]; divide by 255 (or store the images as uint8), "
            "since eps is measured on pixels in [0, 1]"
        )
    return arr.contiguous()


def _to_channels_first(arr: Tensor, what: str, hint: int | None) -> Tensor:
    first, last = int(arr.shape[1]), int(arr.shape[-1])
    wanted = (hint,) if hint else (1, 3)
    if first in wanted and last not in wanted:
        return arr
    if last in wanted and first not in wanted:
        return arr.permute(0, 3, 1, 2)
    if first in wanted:  # both axes could be channels (e.g. 3x3x3 images): NCHW, as torch stores it
        return arr
    raise ValueError(
        f"{what} has shape {tuple(arr.shape)}: no axis of 1 or 3 channels at position 1 (NCHW) or 3 (NHWC); "
        "store images as NHW, NHWC or NCHW"
    )


def _as_tensor(x: object, what: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{what} is an object array; store plain numeric images")
        if x.dtype.kind in "USV":  # strings, bytes, raw records
            label = what.rsplit(":", 1)[-1].strip()
            fix = ("class indices 0..K-1: y = np.unique(y, return_inverse=True)[1]" if label == "y" else
                   "uint8 pixels (0-255) or floats in [0, 1]: np.savez(path, x=images, y=labels)")
            raise TypeError(f"{what} holds {'strings' if x.dtype.kind in 'US' else 'raw records'} (dtype {x.dtype.str}); "
                            f"store {fix}")
        if x.dtype.kind not in "biuf":
            raise TypeError(f"{what} has dtype {x.dtype}; store uint8 pixels or floats in [0, 1], and integer labels")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def as_labels(y: object, n: int, *, what: str = "y") -> Tensor:
    """Integer class labels, shape ``(n,)``, non-negative."""
    arr = _as_tensor(y, what)
    if arr.dim() == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.is_floating_point():
        if not torch.equal(arr, arr.round()):
            raise TypeError(f"{what} must hold integer class indices, got non-integer floats (one-hot? use argmax)")
        arr = arr.long()
    if arr.dtype == torch.bool or arr.is_complex():
        raise TypeError(f"{what} must hold integer class indices, got {arr.dtype}")
    if arr.dim() != 1 or arr.shape[0] != n:
        raise ValueError(f"{what} must have shape ({n},) to match the {n} images, got {tuple(arr.shape)}")
    arr = arr.long()
    if n and int(arr.min()) < 0:
        raise ValueError(f"{what} holds negative class indices (min {int(arr.min())}); labels are 0..K-1")
    if n and int(arr.max()) >= MAX_CLASSES:
        raise ValueError(
            f"{what} holds the label {int(arr.max())}, but labels are class indices 0..K-1 (at most {MAX_CLASSES:,} "
            "classes); relabel them, e.g. y = np.unique(y, return_inverse=True)[1]"
        )
    return arr


def convert_channels(x: Tensor, channels: int | None) -> Tensor:
    """Grey to RGB (the grey channel repeated) or RGB to grey (BT.601 luma); ``None`` keeps ``x``."""
    if channels is None or x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.repeat(1, 3, 1, 1)
    if x.shape[1] == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True).clamp_(0.0, 1.0)
    raise ValueError(f"cannot convert {x.shape[1]}-channel images to {channels} channels; use 1 or 3")


def read_npz(path: str | Path, *, channels_hint: int | None = None) -> tuple[Tensor, Tensor]:
    """``x`` and ``y`` from an ``.npz`` file (no pickled objects are loaded)."""
    path = Path(path)
    with open(path, "rb") as head:
        magic = head.read(4)
    if magic[:2] != b"PK":  # an .npz is a zip archive of .npy files
        raise ValueError(f"{path.name} is not an .npz file (it is not a zip archive: damaged, or another format); "
                         "save it with np.savez(path, x=images, y=labels)")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise ValueError(
                    f"{path.name} has arrays {sorted(keys)}, needs 'x' (images) and 'y' (labels): "
                    "save it with np.savez(path, x=images, y=labels)"
                )
            x, y = f["x"], f["y"]
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ValueError(f"{path.name} stores Python objects; save x and y as plain numeric arrays") from None
        if path.name in str(exc):
            raise
        raise ValueError(f"{path.name} is not a readable .npz file ({exc}); save it with np.savez") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise ValueError(f"{path.name} is damaged (truncated or garbled: {type(exc).__name__}: {_first(exc)}); "
                         "save it again with np.savez(path, x=images, y=labels)") from None
    xs = as_unit_nchw(x, what=f"{path.name}: x", channels_hint=channels_hint)
    return xs, as_labels(y, xs.shape[0], what=f"{path.name}: y")


def _first(exc: BaseException) -> str:
    text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).strip()
    return text.splitlines()[0][:120] if text else "no message"


def read_image_folder(path: str | Path, *, seed: int = 0) -> tuple[Tensor, Tensor, list[str]]:
    """Images, labels and class names from an ImageFolder tree ``path/<class>/<image>``.

    Classes are indexed in sorted folder order (torchvision's rule).  Greyscale images stay one
    channel, colour images become RGB; every image must have the same size.  The points come in a
    fixed random order (``seed``) so that any first ``n`` mix the classes."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; lay it out as {root.name}/<class>/<image>.png (ImageFolder)")
    files: list[tuple[Path, int]] = []
    empty = []
    for k, name in enumerate(classes):
        found = [(f, k) for f in sorted((root / name).iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        files += found
        if not found:
            empty.append(name)
    if not files:
        raise ValueError(f"{root} has class folders but no images ({', '.join(IMAGE_SUFFIXES)}); add PNG or JPEG files")
    if empty:  # it would still take a class index (the folders' sorted order), shifting the classes after it
        raise ValueError(
            f"{root}: class folder{'s' if len(empty) > 1 else ''} {', '.join(repr(e) for e in empty[:5])} "
            f"{'hold' if len(empty) > 1 else 'holds'} no images ({', '.join(IMAGE_SUFFIXES)}); remove "
            f"{'them' if len(empty) > 1 else 'it'} or add images, since class indices follow the folders' order"
        )
    images: list[np.ndarray] = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")  # palette and colour images: RGB
                images.append(np.asarray(im.convert("L" if grey else "RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{f} is not a readable image ({exc}); remove it or convert it to PNG") from None
    if any(a.ndim == 3 for a in images):  # colour images among grey ones: all RGB
        images = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in images]
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise ValueError(f"{root}: images differ in size {sorted(shapes)[:3]}...; resize them to one size first")
    x = as_unit_nchw(np.stack(images), what=str(root), channels_hint=1 if images[0].ndim == 2 else 3)
    y = torch.tensor([k for _, k in files], dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm].contiguous(), y[perm], classes


def fingerprint(x: Tensor, y: Tensor) -> str:
    """A short content hash of evaluation points (keys the results of a user's data)."""
    h = hashlib.sha256()
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()[:16]

"""Inception-v3 features as EDM / StyleGAN2-ADA / StyleGAN3 / clean-fid compute them, from a local file.

The detector is the standard TorchScript port of TensorFlow's ``inception-2015-12-05`` graph
(``inception-2015-12-05.pt``, published with StyleGAN2-ADA and downloaded by clean-fid; EDM's and
StyleGAN3's ``inception-2015-12-05.pkl`` pickles the same network). It is called as
``detector(images, return_features=True)`` on **uint8** images ``[N, 3, H, W]`` and returns the 2048-d
pool_3 features ``[N, 2048]`` float32, doing its own resize to 299x299 and normalisation (EDM
``fid.py`` ``InceptionV3Detector``, StyleGAN2-ADA ``metric_utils``). Grayscale images are repeated
to 3 channels first, as EDM ``fid.py`` does.

Nothing is downloaded: the file comes from ``--detector PATH`` or ``$NEON_INCEPTION`` and is loaded
with ``torch.jit.load`` (torchvision is not used). FIDs from different detectors (this one,
torch-fidelity's port, pytorch-fid's weights) are not comparable, so every result records the
detector's sha256.

Images come from an :class:`ImageSource`: a folder of image files (needs Pillow), an EDM-style
``.zip`` of image files (``dataset_tool.py``'s layout, ``dataset.json`` ignored), a ``.npy``/``.npz``
uint8 array (NHWC, NCHW or NHW; ``.npz`` member ``arr_0`` as in ADM/guided-diffusion batches), or a
``neon synth`` directory. Under ``torchrun`` (``torch.distributed`` initialised) every rank extracts
a contiguous slice and the results are all-gathered, so every rank returns the same answer.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from neon_cli.errors import CheckpointError, DataError, UsageError, exception_line
from neon_cli.progress import ProgressFn, null_progress

ENV_VAR = "NEON_INCEPTION"
#: Feature dimension of the standard detector (pool_3).
FEATURE_DIM = 2048
#: The file name EDM / StyleGAN / clean-fid use for the TorchScript detector.
DETECTOR_NAME = "inception-2015-12-05.pt"
#: Image-file extensions read from folders (through Pillow).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

#: Where StyleGAN2-ADA's metrics (and clean-fid) download the TorchScript detector from.
DETECTOR_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

_MISSING = (
    f"no Inception detector: pass --detector PATH or set {ENV_VAR}=PATH to {DETECTOR_NAME}, the TorchScript "
    f"Inception-v3 of StyleGAN2-ADA that clean-fid also uses ({DETECTOR_URL}; EDM and StyleGAN3 use the same "
    f"network pickled as inception-2015-12-05.pkl); neon never downloads it, and no sha256 or size of it is "
    f"published by NVIDIA or clean-fid for neon to check, so every report records the sha256 of the file you give"
)


# --------------------------------------------------------------------------------------------
# detector


def detector_path(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The detector file named by ``path`` (``--detector``) or else ``$NEON_INCEPTION``; None if neither.

    Families call this to decide whether Inception FID is configured (it does not check the file).
    """
    if path is not None and str(path) != "":
        return Path(path)
    env = os.environ.get(ENV_VAR, "")
    return Path(env) if env else None


def require_detector_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Like :func:`detector_path` but raises UsageError (naming ``--detector`` and ``NEON_INCEPTION``)
    when neither is given or the file does not exist."""
    p = detector_path(path)
    if p is None:
        raise UsageError(_MISSING)
    if not p.is_file():
        source = "--detector" if path is not None and str(path) != "" else ENV_VAR
        raise UsageError(f"{source}: Inception detector {p} not found (set --detector PATH or {ENV_VAR}=PATH to {DETECTOR_NAME})")
    return p


def default_device() -> str:
    """``cuda:LOCAL_RANK`` (torchrun) or ``cuda`` when CUDA is available, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(local)}" if local is not None else "cuda"
    return "cpu"


class InceptionDetector:
    """A loaded TorchScript detector: ``features(images uint8 [N, C, H, W]) -> float32 [N, D]``.

    Attributes: ``path`` (Path), ``sha256`` (hex of the file), ``device`` (torch.device),
    ``feature_dim`` (int once the first batch ran, else None).
    """

    def __init__(self, module: Any, path: Path, sha256: str, device: Any):
        self.module = module
        self.path = Path(path)
        self.sha256 = sha256
        self.device = device
        self.feature_dim: int | None = None

    def provenance(self) -> dict[str, Any]:
        """``{"detector": path, "detector_sha256": hex}`` for reports."""
        return {"detector": str(self.path), "detector_sha256": self.sha256}

    def features(self, images: Any) -> Any:
        """Pool features of a batch.

        Args:
            images: uint8 numpy array or torch tensor ``[N, C, H, W]``, C in {1, 3} (1 is repeated
                to 3 channels); any H, W (the detector resizes).

        Returns:
            float32 CPU torch tensor ``[N, D]`` (D = 2048 for the standard detector).

        Raises:
            DataError: wrong dtype / shape, or the detector returned something other than ``[N, D]``
            or non-finite values. CheckpointError: the module does not accept
            ``(images, return_features=True)``.
        """
        import torch

        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch refuses to wrap read-only buffers (np.frombuffer, mmap)
        x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
        if x.dtype != torch.uint8:
            raise DataError(f"images: the Inception detector takes uint8 [N, C, H, W] in 0..255, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise DataError(f"images: expected [N, C, H, W] with C 1 or 3, got shape {tuple(x.shape)}")
        x = x.to(self.device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        try:
            with torch.no_grad():
                out = self.module(x, return_features=True)
        except (RuntimeError, TypeError) as exc:
            first = exception_line(exc)
            raise CheckpointError(f"{self.path}: detector call detector(images, return_features=True) failed: {first}") from None
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(f"{self.path}: detector returned {shape}, expected features [{x.shape[0]}, D]")
        out = out.detach().to("cpu", torch.float32)
        if not torch.isfinite(out).all():
            raise DataError(f"{self.path}: detector returned non-finite features")
        self.feature_dim = int(out.shape[1])
        return out


#: Where the TorchScript detector is published (StyleGAN2-ADA's metrics; clean-fid downloads the same file).
DETECTOR_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def describe_pickle_detector(path: str | os.PathLike[str]) -> str:
    """The one-line error for a pickled detector such as EDM's / StyleGAN3's ``inception-2015-12-05.pkl``.

    EDM's ``fid.py`` and StyleGAN3's ``metric_utils`` load that file with a plain ``pickle.load``
    beside their ``torch_utils`` package: unpickling calls whatever the file names, and a
    ``torch_utils.persistence`` object rebuilds its class by executing Python source stored in the
    file (``_reconstruct_persistent_obj`` -> ``exec(module_src)``). A network cannot be run from it
    without running the file's code, which neon does not do. The file is only scanned with
    :mod:`pickletools` (opcodes; nothing is resolved or called) to say what it holds; the message
    names the TorchScript ``inception-2015-12-05.pt`` of the same detector (StyleGAN2-ADA's, which
    clean-fid also uses) to use instead.
    """
    p = Path(path)
    return (f"{p}: not a TorchScript archive but {_pickle_kind(p)}; neon does not execute it: use the TorchScript "
            f"inception-2015-12-05.pt of the same detector ({DETECTOR_URL})")


def _pickle_kind(p: Path) -> str:
    """What a pickle holds, from its opcodes alone (:mod:`pickletools`; nothing resolved or called)."""
    import pickletools

    strings: list[str] = []
    try:
        with open(p, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if isinstance(arg, str) and len(arg) < 200:
                    strings.append(arg)
                elif op.name == "STOP":
                    break
    except Exception:  # truncated or not a pickle after all: say only what it is not
        strings = []
    if "_reconstruct_persistent_obj" in strings or "torch_utils.persistence _reconstruct_persistent_obj" in strings:
        names = [strings[i + 1] for i, s in enumerate(strings[:-1]) if s == "class_name"]
        what = f"a torch_utils.persistence pickle (class {names[0]}) whose network is Python code stored in the file"
    else:
        what = "a Python pickle, which loads by running code named in the file"
    return what


def torchscript_in_pickle(path: str | os.PathLike[str]) -> list[bytes]:
    """The TorchScript archives (zip byte strings) a pickle file carries anywhere in its object tree.

    The pickle is read by the checkpoint package's inert unpickler
    (:class:`neon_cli.checkpoint.unpickler.InertUnpickler`): no global it names is imported or
    called, ``torch_utils.persistence`` records stay records (their ``module_src`` is never
    executed); every byte string of the tree (the states of persistent objects included) that
    starts with a zip header is returned. A detector pickled as a TorchScript archive inside a
    pickle (e.g. a persistent wrapper whose state is ``torch.jit.save``'s bytes) therefore loads
    without running anything of the pickle. Raises CheckpointError for an unreadable pickle.
    """
    from neon_cli.checkpoint.unpickler import InertUnpickler, scan, skeleton

    p = Path(path)
    data = p.read_bytes()
    try:
        sc = scan(data, 0, where=str(p))
        stream, marks = skeleton(data, sc)
        obj = InertUnpickler(stream, where=str(p), placeholders=marks, protocol=sc.protocol,
                             load_from_bytes=lambda payload: None, persistent_load=lambda pid: None).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{p}: unreadable pickle ({type(exc).__name__}: {exc})") from None
    found: list[bytes] = []
    seen: set[int] = set()
    todo = [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, (bytes, bytearray)):
            m = marks.get(bytes(o))
            raw = data[m.offset:m.offset + m.length] if m is not None else bytes(o)
            if raw[:4] == b"PK\x03\x04":
                found.append(raw)
        elif isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            todo.extend(o)
        elif hasattr(o, "__dict__"):
            todo.extend(vars(o).values())
    return found


def _load_pickled_detector(p: Path, dev: Any, trust_pickle: bool) -> Any:
    """The module of a pickled detector (EDM's / StyleGAN3's ``inception-2015-12-05.pkl``): its
    TorchScript archive read inertly (:func:`torchscript_in_pickle`) and ``torch.jit.load``-ed;
    without one, and only with ``trust_pickle``, the pickle itself loaded as EDM's ``fid.py`` loads it
    (``pickle.load``, which runs the code stored in it; EDM's ``torch_utils`` must be importable:
    ``$NEON_EDM_REPO`` is put on ``sys.path`` when set)."""
    import pickle
    import sys

    import torch

    archives = torchscript_in_pickle(p)
    if len(archives) == 1:
        import io

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(io.BytesIO(archives[0]), map_location=dev)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{p}: the TorchScript archive inside the pickle does not load ({first})") from None
    if not trust_pickle:
        what = _pickle_kind(p)
        extra = f" ({len(archives)} zip archives inside, not one)" if archives else " with no TorchScript archive inside"
        raise CheckpointError(f"{p}: not a TorchScript archive but {what}{extra}: loading it runs that code; "
                              f"pass --trust-pickle (neon fid / ref-stats) to let it run "
                              f"(EDM's torch_utils importable: $NEON_EDM_REPO or PYTHONPATH), or use the TorchScript "
                              f"inception-2015-12-05.pt of the same detector ({DETECTOR_URL})")
    repo = os.environ.get("NEON_EDM_REPO")
    if repo and repo not in sys.path:
        sys.path.insert(0, repo)
    try:
        with open(p, "rb") as fh:
            module = pickle.load(fh)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p}: pickle.load of the detector failed ({type(exc).__name__}: {first}); "
                              f"EDM's torch_utils must be importable ($NEON_EDM_REPO or PYTHONPATH)") from None
    if not callable(module):
        raise CheckpointError(f"{p}: the pickle holds a {type(module).__name__}, not a detector module")
    return module.to(dev).eval() if hasattr(module, "to") else module


def load_detector(path: str | os.PathLike[str] | None = None, device: str | None = None,
                  trust_pickle: bool = False) -> InceptionDetector:
    """Load the TorchScript Inception detector from ``path`` or ``$NEON_INCEPTION`` with ``torch.jit.load``.

    A pickled detector (EDM's / StyleGAN3's ``inception-2015-12-05.pkl``, which EDM's ``fid.py`` and
    the Neon paper's ``cal_metrics_all.py`` load with ``pickle.load``) is accepted too: a TorchScript
    archive inside it is found and loaded without running anything of the pickle
    (:func:`torchscript_in_pickle`); a pickle without one needs ``trust_pickle`` (``--trust-pickle``),
    since loading it runs the Python code stored in it. The report's sha256 is the file's.

    Args:
        path: the ``--detector`` value (None: use ``$NEON_INCEPTION``).
        device: torch device string; None picks :func:`default_device`.

    Raises:
        UsageError: no path given and ``$NEON_INCEPTION`` unset, or the file does not exist (the
        message names both ``--detector`` and ``NEON_INCEPTION``).
        CheckpointError: not a TorchScript archive (a ``.pkl`` with no TorchScript inside and no
        ``trust_pickle``: the message says what it holds and names the ``.pt``; see
        :func:`describe_pickle_detector`) or ``torch.jit.load`` fails.
    """
    import torch

    from neon_cli.fsutil import sha256_file

    p = require_detector_path(path)
    with open(p, "rb") as fh:
        magic = fh.read(4)
    dev = torch.device(device or default_device())
    if magic[:1] == b"\x80":
        module = _load_pickled_detector(p, dev, trust_pickle)
        module.eval()
        return InceptionDetector(module, p, sha256_file(p), dev)
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{p}: not a TorchScript archive")
    try:
        with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; the detector is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location=dev)
    except Exception as exc:  # RuntimeError from the TorchScript loader, ValueError, ...
        first = exception_line(exc)
        raise CheckpointError(f"{p}: torch.jit.load failed ({first})") from None
    module.eval()
    return InceptionDetector(module, p, sha256_file(p), dev)


# --------------------------------------------------------------------------------------------
# image sources


class ImageSource(Protocol):
    """Random access to N uint8 images: ``read(start, stop) -> ndarray uint8 [n, C, H, W]``."""

    path: Path | None
    kind: str

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


def _layout(shape: Sequence[int], where: str) -> str:
    """'NHWC' | 'NCHW' | 'NHW' for an image array shape (NHWC wins when both could fit)."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        if shape[3] in (1, 3):
            return "NHWC"
        if shape[1] in (1, 3):
            return "NCHW"
    raise DataError(f"{where}: expected images [N, H, W, C], [N, C, H, W] or [N, H, W] with C 1 or 3, got shape {tuple(shape)}")


def _to_nchw(batch: np.ndarray, layout: str) -> np.ndarray:
    if layout == "NHW":
        return np.ascontiguousarray(batch[:, None])
    if layout == "NHWC":
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    return np.ascontiguousarray(batch)


class ArraySource:
    """Images held in an array (numpy, memory-mapped ``.npy``, or a torch tensor), uint8."""

    def __init__(self, array: Any, path: Path | None = None, kind: str = "array"):
        if hasattr(array, "detach"):
            array = array.detach().cpu().numpy()
        where = str(path) if path is not None else "images"
        if array.dtype != np.uint8:
            raise DataError(f"{where}: images must be uint8 (0..255), got dtype {array.dtype}")
        self.layout = _layout(array.shape, where)
        self.array = array
        self.path = path
        self.kind = kind

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        return _to_nchw(np.asarray(self.array[start:stop]), self.layout)


class NpzMemberSource:
    """One array member of a ``.npz``, read in row ranges straight from the zip (never fully loaded)."""

    def __init__(self, path: Path, member: str | None = None):
        self.path = Path(path)
        self.kind = "npz"
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.path}: cannot read as .npz ({exc})") from None
        names = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
        if member is None:
            for cand in ("arr_0", "images", "samples"):
                if cand in names:
                    member = cand
                    break
            else:
                if len(names) == 1:
                    member = names[0]
                else:
                    raise DataError(f"{self.path}: no image array (arr_0, images or a single array) among {sorted(names)}")
        if member not in names:
            raise DataError(f"{self.path}: no array {member!r}, found {sorted(names)}")
        self.member = member
        self._fh = self._zip.open(member + ".npy")
        version = np.lib.format.read_magic(self._fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._fh)
        where = f"{self.path}[{member}]"
        if dtype != np.uint8:
            raise DataError(f"{where}: images must be uint8 (0..255), got dtype {dtype}")
        if fortran:
            raise DataError(f"{where}: Fortran-ordered arrays are not supported")
        self.shape = tuple(int(s) for s in shape)
        self.layout = _layout(self.shape, where)
        self._offset = self._fh.tell()
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64))
        self._pos = 0

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        n = max(0, stop - start)
        if start != self._pos:
            self._fh.seek(self._offset + start * self._row_bytes)
        buf = self._fh.read(n * self._row_bytes)
        if len(buf) != n * self._row_bytes:
            raise DataError(f"{self.path}[{self.member}]: truncated array data")
        self._pos = stop
        return _to_nchw(np.frombuffer(buf, dtype=np.uint8).reshape((n,) + self.shape[1:]), self.layout)


class SynthSource:
    """The images of a complete ``neon synth`` directory (manifest + safetensors shards)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.kind = "neon-synth"
        mf = self.path / "manifest.json"
        try:
            manifest = json.loads(mf.read_text())
            self._shards = [(self.path / s["file"], int(s["start"]), int(s["count"])) for s in manifest["shards"]]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise DataError(f"{mf}: not a readable neon synth manifest ({type(exc).__name__}: {exc})") from None
        for f, _, _ in self._shards:
            if not f.is_file():
                raise DataError(f"{f}: listed in {mf} but missing")
        self._n = sum(c for _, _, c in self._shards)

    def __len__(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> np.ndarray:
        from safetensors import safe_open

        parts = []
        for f, s0, count in self._shards:
            a, b = max(start, s0), min(stop, s0 + count)
            if a >= b:
                continue
            try:
                with safe_open(str(f), framework="np") as st:
                    parts.append(st.get_slice("images")[a - s0 : b - s0])
            except Exception as exc:
                raise DataError(f"{f}: unreadable shard ({type(exc).__name__}: {exc})") from None
        batch = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if batch.dtype != np.uint8 or batch.ndim != 4:
            raise DataError(f"{self.path}: shard images must be uint8 [n, C, H, W], got {batch.dtype} {tuple(batch.shape)}")
        return np.ascontiguousarray(batch)


def _require_pillow(where: Path) -> Any:
    try:
        import PIL.Image
    except ImportError:
        raise UsageError(
            f"{where}: reading image files needs Pillow (pip install pillow); or pass a .npy/.npz uint8 "
            "array or a 'neon synth' directory"
        ) from None
    return PIL.Image


class FolderSource:
    """Image files under a folder (recursive, sorted by relative path, as EDM's ImageFolderDataset).

    Read with Pillow: 8-bit grayscale stays 1 channel, RGB 3, other modes are converted to RGB.
    All images must have the same size (batches are stacked).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.kind = "folder"
        self.files = sorted(
            (p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")),
            key=lambda p: p.relative_to(self.path).as_posix(),
        )
        if not self.files:
            raise DataError(f"{self.path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self._image = _require_pillow(self.path)
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = []
        for f in self.files[start:stop]:
            try:
                with self._image.open(f) as im:
                    if im.mode not in ("L", "RGB"):
                        im = im.convert("RGB")
                    arr = np.asarray(im, dtype=np.uint8)
            except OSError as exc:
                raise DataError(f"{f}: unreadable image ({exc})") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if self._shape is None:
                self._shape = arr.shape
            elif arr.shape != self._shape:
                raise DataError(f"{f}: image shape {arr.shape} (C, H, W) differs from the first image's {self._shape}")
            out.append(arr)
        return np.stack(out)


class ZipSource:
    """Image files in a ``.zip``, as EDM's ``training.dataset.ImageFolderDataset`` reads one.

    The layout ``dataset_tool.py`` writes (``00000/img00000000.png``, ..., optional
    ``dataset.json`` with labels, ignored here): every member with an image extension, sorted by
    member name, decoded with Pillow (8-bit grayscale stays 1 channel, RGB 3, other modes become
    RGB). All images must have the same size.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.kind = "zip"
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.path}: cannot read as a zip of images ({exc})") from None
        self.members = sorted(n for n in self._zip.namelist()
                              if not n.endswith("/") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        if not self.members:
            raise DataError(f"{self.path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the zip")
        self._image = _require_pillow(self.path)
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.members)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = []
        for name in self.members[start:stop]:
            try:
                with self._zip.open(name) as fh, self._image.open(fh) as im:
                    if im.mode not in ("L", "RGB"):
                        im = im.convert("RGB")
                    arr = np.asarray(im, dtype=np.uint8)
            except (OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"{self.path}[{name}]: unreadable image ({exc})") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if self._shape is None:
                self._shape = arr.shape
            elif arr.shape != self._shape:
                raise DataError(f"{self.path}[{name}]: image shape {arr.shape} (C, H, W) differs from the first image's {self._shape}")
            out.append(arr)
        return np.stack(out)


class SubsetSource:
    """``indices`` (sorted) of another source, read in runs of consecutive indices."""

    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.path = source.path
        self.kind = source.kind

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        idx = self.indices[start:stop]
        parts = []
        a = 0
        while a < len(idx):
            b = a + 1
            while b < len(idx) and idx[b] == idx[b - 1] + 1:
                b += 1
            parts.append(self.source.read(int(idx[a]), int(idx[b - 1]) + 1))
            a = b
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def subset(source: ImageSource, num: int, seed: int = 0, where: str = "images") -> ImageSource:
    """``num`` images of ``source`` chosen as EDM's ``Dataset(max_size=num, random_seed=seed)``
    does (``np.random.RandomState(seed % 2**31).shuffle`` of the indices, the first ``num``,
    sorted); the source itself when it holds exactly ``num``. Raises DataError when it holds fewer
    (EDM ``fid.py``: "Found N images, but expected at least num")."""
    n = len(source)
    if n < num:
        raise DataError(f"{where}: found {n} images, but --num-images asks for {num}")
    if n == num:
        return source
    idx = np.arange(n)
    np.random.RandomState(seed % (1 << 31)).shuffle(idx)
    return SubsetSource(source, np.sort(idx[:num]))


def open_images(path: str | os.PathLike[str], flag: str = "--images") -> ImageSource:
    """An :class:`ImageSource` for ``path`` (``flag`` names it in errors).

    * a directory with ``manifest.json`` of ``neon synth``: its shards;
    * any other directory: image files (PNG, JPEG, ...; needs Pillow);
    * ``.zip``: image files inside, as EDM's ``ImageFolderDataset`` (:class:`ZipSource`; Pillow);
    * ``.npy``: a uint8 array NHWC, NCHW or NHW (memory-mapped);
    * ``.npz``: member ``arr_0`` (ADM / guided-diffusion sample and reference batches), ``images``,
      ``samples``, or the only member; read in row ranges without loading the whole array.

    Raises UsageError (missing path, unknown suffix, Pillow needed) or DataError (bad contents).
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag}: {p} does not exist")
    if p.is_dir():
        mf = p / "manifest.json"
        if mf.is_file():
            try:
                schema = json.loads(mf.read_text()).get("schema")
            except (OSError, ValueError, AttributeError):
                schema = None
            if isinstance(schema, str) and schema.startswith("neon.synth/"):
                return SynthSource(p)
        elif (p / "plan.json").is_file() and any(p.glob("shard-*.safetensors")):
            raise DataError(f"{flag}: {p} is an unfinished 'neon synth' directory (no manifest.json); rerun the same synth command")
        return FolderSource(p)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{p}: cannot read as .npy ({type(exc).__name__}: {exc})") from None
        return ArraySource(arr, p, kind="npy")
    if suffix == ".npz":
        return NpzMemberSource(p)
    if suffix == ".zip":
        return ZipSource(p)
    raise UsageError(f"{flag}: {p}: expected a folder, a neon synth directory, a .zip of images, or a .npy/.npz array file")


# --------------------------------------------------------------------------------------------
# extraction (optionally across torch.distributed ranks)


def _dist() -> tuple[Any, int, int]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None, 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` items for ``rank`` of ``world`` (sizes differ by <= 1)."""
    return n * rank // world, n * (rank + 1) // world


def _iter_batches(source: ImageSource, start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
    for a in range(start, stop, batch):
        yield source.read(a, min(stop, a + batch))


def _all_gather_rows(dist: Any, rows: Any, world: int) -> Any:
    """Concatenate every rank's ``[n_r, D]`` float32 tensor in rank order (n_r may differ)."""
    import torch

    from neon_cli.dist import backend_device

    dev = backend_device()  # NCCL moves CUDA tensors only; gloo CPU ones
    local = rows.to(dev)
    n = torch.tensor([local.shape[0]], device=dev, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    width = local.shape[1]
    pad = max(sizes_i)
    padded = torch.zeros((pad, width), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes_i)]).cpu()


def _check_batch(batch: int) -> None:
    from neon_cli.validate import positive_int

    positive_int("--batch", batch)


def compute_features(
    detector: InceptionDetector,
    source: ImageSource | Any,
    batch: int = 64,
    progress: ProgressFn = null_progress,
) -> np.ndarray:
    """Detector features of every image of ``source``, in order: float32 ``[N, D]``.

    ``source`` is an :class:`ImageSource` or an in-memory uint8 array/tensor (NCHW, NHWC or NHW).
    Processes ``batch`` images at a time, calling ``progress("inception", done, total, unit="img")``.
    Under torch.distributed each rank extracts its contiguous slice (:func:`rank_slice`) and the
    features are all-gathered, so every rank returns all N rows.
    """
    import torch

    _check_batch(batch)
    if not hasattr(source, "read"):
        source = ArraySource(source)
    dist, rank, world = _dist()
    if world > 1 and len(source) < world:  # every rank sees the same length: all raise together
        raise DataError(f"{getattr(source, 'path', None) or 'images'}: fewer images ({len(source)}) than ranks ({world})")
    start, stop = rank_slice(len(source), rank, world)
    done, total = 0, stop - start
    progress("inception", 0, total, unit="img")
    chunks = []
    for images in _iter_batches(source, start, stop, batch):
        chunks.append(detector.features(images))
        done += images.shape[0]
        progress("inception", done, total, unit="img")
    local = torch.cat(chunks) if chunks else torch.zeros((0, detector.feature_dim or 0), dtype=torch.float32)
    if dist is not None and world > 1:
        local = _all_gather_rows(dist, local, world)
    return local.numpy()


def compute_stats(
    detector: InceptionDetector,
    source: ImageSource | Any,
    batch: int = 64,
    progress: ProgressFn = null_progress,
    keep_features: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(mu [D], sigma [D, D], features [N, D] or None)`` of the detector features of ``source``.

    Streams: without ``keep_features`` only running float64 statistics are held
    (:class:`neon_cli.metrics.StatsAccumulator`), so memory does not grow with N. Under
    torch.distributed each rank accumulates its slice and the accumulators are all-gathered and
    merged (identical result on every rank). ``sigma`` is the unbiased covariance (EDM ``fid.py``).
    Raises DataError with fewer than 2 images.
    """
    from neon_cli.metrics import StatsAccumulator, feature_stats

    if keep_features:
        feats = compute_features(detector, source, batch, progress)
        mu, sigma = feature_stats(feats)
        return mu, sigma, feats
    _check_batch(batch)
    if not hasattr(source, "read"):
        source = ArraySource(source)
    dist, rank, world = _dist()
    start, stop = rank_slice(len(source), rank, world)
    acc = StatsAccumulator()
    done, total = 0, stop - start
    task = getattr(detector, "task", "inception")
    progress(task, 0, total, unit="img")
    for images in _iter_batches(source, start, stop, batch):
        acc.update(detector.features(images).numpy())
        done += images.shape[0]
        progress(task, done, total, unit="img")
    if dist is not None and world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, acc.state())
        acc = StatsAccumulator()
        for st in states:
            acc.merge(StatsAccumulator.from_state(st))
    mu, sigma = acc.finalize()
    return mu, sigma, None


# --------------------------------------------------------------------------------------------
# scoring and the ref-stats command


class InceptionFID:
    """FID (and optionally P/R/D/C) of generated images against reference statistics, with provenance.

    For image families whose ``fid`` uses the standard detector when it is configured::

        scorer = InceptionFID(ref_stats="cifar10-32x32.npz", detector=None)   # $NEON_INCEPTION
        metrics = scorer.score(images_uint8_nchw)                              # {"fid": ...}
        report.results["metric_provenance"] = scorer.provenance()

    ``ref_stats`` is any file :func:`neon_cli.metrics.load_stats` reads. If it also holds
    ``features`` (``neon ref-stats --keep-features``), ``score`` adds precision, recall, density
    and coverage at ``k`` (prdc formulas, Naeem et al. 2020).
    """

    def __init__(
        self,
        ref_stats: str | os.PathLike[str],
        detector: str | os.PathLike[str] | InceptionDetector | None = None,
        device: str | None = None,
        batch: int = 64,
        k: int = 5,
    ):
        from neon_cli.fsutil import sha256_file
        from neon_cli.metrics import load_stats

        self.detector = detector if isinstance(detector, InceptionDetector) else load_detector(detector, device)
        self.ref_path = Path(ref_stats)
        self.mu, self.sigma = load_stats(self.ref_path)
        self.ref_sha256 = sha256_file(self.ref_path)
        self.batch = batch
        self.k = k
        self.real_features: np.ndarray | None = None
        if self.ref_path.suffix.lower() == ".npz":
            with np.load(self.ref_path, allow_pickle=False) as data:
                if "features" in data.files:
                    self.real_features = data["features"]

    def provenance(self) -> dict[str, Any]:
        """Detector path + sha256 and reference statistics path + sha256 (FIDs are only comparable
        when both match)."""
        return {**self.detector.provenance(), "ref_stats": str(self.ref_path), "ref_stats_sha256": self.ref_sha256}

    def score(self, images: Any, progress: ProgressFn = null_progress) -> dict[str, float]:
        """``{"fid": float, ...}`` of uint8 images (array/tensor NCHW/NHWC/NHW or an ImageSource).

        Raises DataError if the detector's feature dimension differs from the statistics'.
        """
        from neon_cli.metrics import feature_stats, frechet_distance, prdc

        feats = compute_features(self.detector, images, self.batch, progress)
        if feats.shape[1] != self.mu.shape[0]:
            raise DataError(f"{self.ref_path}: statistics are {self.mu.shape[0]}-d but the detector gives {feats.shape[1]}-d features")
        out = {"fid": frechet_distance(*feature_stats(feats), self.mu, self.sigma)}
        if self.real_features is not None:
            out.update(prdc(self.real_features, feats, k=self.k))
        return out

    def score_jackknife(self, images: Any, groups: Any, progress: ProgressFn = null_progress
                        ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """:meth:`score` and each metric's leave-one-group-out values (``groups``: index arrays,
        :func:`neon_cli.metrics.balanced_groups`) from **one** pass of the detector: the FID's by
        :func:`neon_cli.metrics.frechet_replicates` (symmetric eigenproblems, no extra sqrtm), P/R/D/C
        with the reals' k-NN radii computed once. Returns ``(metrics, {metric: [G values]})``."""
        from neon_cli.metrics import frechet_replicates, knn_radii, prdc

        feats = compute_features(self.detector, images, self.batch, progress)
        if feats.shape[1] != self.mu.shape[0]:
            raise DataError(f"{self.ref_path}: statistics are {self.mu.shape[0]}-d but the detector gives {feats.shape[1]}-d features")
        full, reps = frechet_replicates(feats, self.mu, self.sigma, groups)
        out: dict[str, float] = {"fid": full}
        jk: dict[str, list[float]] = {"fid": reps}
        if self.real_features is not None:
            radii = knn_radii(np.asarray(self.real_features, dtype=np.float64), self.k)
            out.update(prdc(self.real_features, feats, k=self.k, real_radii=radii))
            n = len(feats)
            for idx in groups:
                for k, v in prdc(self.real_features, feats[np.setdiff1d(np.arange(n), idx)], k=self.k, real_radii=radii).items():
                    jk.setdefault(k, []).append(v)
        return out, jk


class PixelFeatures:
    """The "detector" of pixel statistics: uint8 images [n, C, H, W] -> float64 [n, C*H*W] in [0, 1],
    channel-major (the NCHW layout flattened), as the image families' ``pixel_fid`` reads them
    (:func:`neon_diffusers.scoring.pixel_features`)."""

    sha256 = None
    path = None
    task = "pixels"  # the progress task name (the Inception detector's is "inception")

    def __init__(self) -> None:
        self.feature_dim: int | None = None

    def features(self, images: Any) -> Any:
        import torch

        x = torch.as_tensor(np.ascontiguousarray(images))
        out = x.reshape(x.shape[0], -1).to(torch.float64) / 255.0
        self.feature_dim = int(out.shape[1])
        return out


def available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo; None where unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


#: float64 D x D matrices held at once while pixel statistics are accumulated and written
#: (the running scatter, a batch's update, the finalised covariance)
PIXEL_COV_COPIES = 3


def check_pixel_size(dim: int, shape: Sequence[int], where: str, memory: int | None = None) -> int:
    """Refuse pixel statistics whose D x D float64 covariance (D = C*H*W) would not fit.

    Needs :data:`PIXEL_COV_COPIES` covariances in ``memory`` (default :func:`available_memory`).
    Returns the covariance's size in bytes. Raises ResourceError naming ``where``, the image
    shape, D and the covariance's size (a 64x64x3 image: D = 12288, 12288^2 float64 = 1.2 GB).
    """
    from neon_cli.errors import ResourceError

    cov = int(dim) * int(dim) * 8
    memory = available_memory() if memory is None else memory
    if memory is not None and PIXEL_COV_COPIES * cov > memory:
        dims = "x".join(str(int(s)) for s in shape)
        raise ResourceError(f"{where}: pixel statistics of {dims} images need a {dim}x{dim} float64 covariance of "
                            f"{cov / 1e9:.2f} GB ({PIXEL_COV_COPIES} copies while computing: {PIXEL_COV_COPIES * cov / 1e9:.2f} GB), "
                            f"more than the {memory / 1e9:.2f} GB of memory available; use smaller images or the "
                            f"Inception statistics (--detector)")
    return cov


def ref_stats(request: Any, *, report: Any, progress: ProgressFn = null_progress) -> dict[str, Any]:
    """``neon ref-stats``: Inception statistics of a set of images, written as EDM-style ``.npz``.

    ``request``: a :class:`~neon_cli.requests.RefStatsRequest` (``images``, ``out``,
    ``scoring.detector``, ``batch``, ``device``, ``keep_features``, ``pixels``, ``trust``), validated
    first (:meth:`~neon_cli.requests.RefStatsRequest.validate`). Reads ``images`` with
    :func:`open_images`, extracts features in batches (split across ranks under torchrun), and
    writes ``out`` with ``mu`` [D] and ``sigma`` [D, D] float64 (plus ``features`` float32 [N, D]
    with ``keep_features``), atomically; under torch.distributed only rank 0 writes. Fills the
    report: inputs ``images`` and ``detector`` (sha256), output ``stats``, results ``num_images``,
    ``feature_dim``, ``image_source``, ``detector_sha256``, ``stats_sha256``, ``world_size``.
    Returns those results.

    ``pixels`` (``--pixels``): no detector; the statistics are of the raw pixels
    (:class:`PixelFeatures`: ``mu`` [C*H*W], ``sigma`` [C*H*W, C*H*W] float64, values in [0, 1],
    channel-major), the reference of the image families' ``pixel_fid``; sizes whose covariance would
    not fit in memory are refused first (:func:`check_pixel_size`); a detector given (or
    ``$NEON_INCEPTION``) is not used; ``detector_sha256`` is None and
    ``kind`` is ``"pixels"`` (else ``"inception"``). ``trust.pickle``: as :func:`load_detector`.

    Raises UsageError (no detector, bad flags, ``out`` equal to the input, ``--pixels`` with
    ``--keep-features``), DataError (bad images), CheckpointError (unloadable
    detector), ResourceError (``--pixels`` covariance too large).
    """
    from neon_cli.fsutil import sha256_file
    from neon_cli.metrics import save_stats

    req = request.validate()
    out, src_path, pixels, detector = Path(req.out), Path(req.images), req.pixels, req.scoring.detector
    report.check_outputs({"--images": src_path, "--detector": None if pixels else detector_path(detector)}, {"-o": out})
    det = PixelFeatures() if pixels else load_detector(detector, req.device, trust_pickle=req.trust.pickle)
    source = open_images(src_path)
    if len(source) < 2:
        raise DataError(f"{src_path}: need at least 2 images for a covariance, found {len(source)}")
    if pixels:
        shape = source.read(0, 1).shape[1:]
        check_pixel_size(int(np.prod(shape)), shape, f"--pixels {src_path}")
    else:
        report.add_input("detector", det.path, sha256=det.sha256)
    report.add_input("images", src_path)
    mu, sigma, feats = compute_stats(det, source, batch=req.batch, progress=progress, keep_features=req.keep_features)
    dist, rank, world = _dist()
    results: dict[str, Any] = {
        "num_images": len(source),
        "feature_dim": int(mu.shape[0]),
        "image_source": source.kind,
        "detector_sha256": det.sha256,
        "kind": "pixels" if pixels else "inception",
        "world_size": world,
    }
    if rank == 0:
        save_stats(out, mu, sigma, features=feats)
        results["stats_sha256"] = sha256_file(out)
        report.add_output("stats", out, sha256=results["stats_sha256"])
    if dist is not None and world > 1:
        dist.barrier()
    results["stats"] = str(out)
    report.results.update(results)
    return results

"""Loaders for the community CMU-MOSI / CMU-MOSEI file formats.

Every loader returns :class:`Segments` (per-segment, variable-length arrays + labels + ids +
words), which ``.to_split()`` turns into the training layer's padded :class:`Split`.

Formats
-------
``mag``   MAG-BERT pickle (``mosi.pkl`` / ``*_valid.pkl`` of Rahman et al. 2020): a list, or a
          dict ``{"train","dev","test"}`` of lists, of entries
          ``((word_ids (L,), visual (L, Dv), acoustic (L, Da), words [L str]), [[label]], "video[i]")``
          -- word-aligned; text is word ids into the authors' vocabulary (no vectors).
``mmim``  MMIM pickle (Han et al. 2021): same container, entries
          ``((words, visual (Tv, Dv), acoustic (Ta, Da), actual_words [str], vlen, alen),
          [[label]], "video_clip")`` -- unaligned; text is raw words only.
``mmsa``  MulT / MMSA aligned pickle (``aligned_50.pkl``, ``mosei_senti_data.pkl``): a dict
          ``{"train","valid","test"}`` (``"dev"`` accepted) of dicts with ``"text"`` (N, L, Dt),
          ``"audio"`` (N, L, Da), ``"vision"`` (N, L, Dv) sharing N and L, labels in
          ``"regression_labels"`` (N,) (MMSA) or ``"labels"`` (N, 1, 1) (MulT), optional
          ``"id"`` (N,) or (N, k) and ``"raw_text"`` (N,).
``csd``   CMU-MultimodalSDK computational sequence (HDF5): ``/<root>/data/<video>/{intervals
          (n, 2), features (n, d)}`` and ``/<root>/metadata``.  Needs h5py (dev extra).
labels    ``MOSI-label.csv`` / ``MOSEI-label.csv`` (Multimodal-Infomax release): columns
          ``video_id, clip_id, text, label, ..., mode``.

Safety: pickles are read ONLY through :class:`RestrictedUnpickler`, which admits exactly
numpy's array-reconstruction classes and the builtins of plain containers; anything else
(``os.system``, ``builtins.eval``, arbitrary classes) raises :class:`FormatError` naming the
class, before anything executes.  Protocol-5 pickles rebuild arrays through
numpy._core.numeric._frombuffer, which is refused too: re-save them with protocol <= 4.
Every error names the file and the problem.
"""
from __future__ import annotations

import csv
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .mosi import Split

__all__ = ["FormatError", "RestrictedUnpickler", "safe_load_pickle", "Segments", "load_mag_pickle",
           "load_mmim_pickle", "load_mmsa_pickle", "read_csd", "csd_to_segment_labels", "load_label_csv",
           "load_labelled_dataset", "embed_words", "load_format", "FORMATS", "DATASETS"]

FORMATS = ("mag", "mmim", "mmsa", "csd")
DATASETS = ("mosi", "mosei")


class FormatError(ValueError):
    """A file is unreadable, truncated, mislabelled or mis-shaped (message names the file)."""


# --------------------------------------------------------------------------- safe pickles
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    # plain containers / values that protocol-0..2 pickles name explicitly
    ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bytearray"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "complex"), ("builtins", "bool"),
    ("builtins", "slice"), ("builtins", "range"),
    ("__builtin__", "list"), ("__builtin__", "tuple"), ("__builtin__", "dict"), ("__builtin__", "set"),
    ("__builtin__", "str"), ("__builtin__", "unicode"), ("__builtin__", "int"), ("__builtin__", "long"),
    ("__builtin__", "float"), ("__builtin__", "bool"), ("__builtin__", "bytearray"),
    ("_codecs", "encode"),  # protocol-2 pickles of bytes (numpy array payloads) go through it
    ("copy_reg", "_reconstructor"),
})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS` (numpy arrays + plain containers)."""

    def __init__(self, file, *, source: str = "<pickle>", **kw):
        kw.setdefault("encoding", "latin1")  # Python-2 numpy pickles
        super().__init__(file, **kw)
        self.source = source

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise FormatError(f"{self.source}: refusing to unpickle {module}.{name}: only numpy arrays "
                              "and plain containers are allowed (the file may be malicious or not a "
                              "data pickle)")
        if module == "copy_reg":
            module = "copyreg"
        if module == "__builtin__":
            module, name = "builtins", {"unicode": "str", "long": "int"}.get(name, name)
        if module.startswith("numpy"):
            import numpy  # noqa: F401  (numpy._core vs numpy.core: import whichever exists)
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                alt = module.replace("numpy._core", "numpy.core") if "_core" in module else \
                    module.replace("numpy.core", "numpy._core")
                return super().find_class(alt, name)
        return super().find_class(module, name)


def safe_load_pickle(path: str | os.PathLike):
    """Load a data pickle through :class:`RestrictedUnpickler`; FormatError names the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    data = p.read_bytes()
    if not data:
        raise FormatError(f"{p}: empty file")
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=str(p)).load()
    except FormatError:
        raise
    except EOFError as e:
        raise FormatError(f"{p}: truncated pickle (ran out of data after {len(data)} bytes)") from e
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, MemoryError) as e:
        msg = str(e)
        if "truncated" in msg.lower() or "ran out" in msg.lower() or "pickle data was truncated" in msg:
            raise FormatError(f"{p}: truncated pickle ({msg})") from e
        raise FormatError(f"{p}: not a readable data pickle ({type(e).__name__}: {msg})") from e


# --------------------------------------------------------------------------- common structure
@dataclass
class Segments:
    """Per-segment data of one split. ``text`` entries are (L, Dt) float arrays or None (formats
    that store only words); ``audio`` / ``video`` are (T, D) arrays; ``labels`` (N,) in [-3, 3]."""
    ids: list[str]
    labels: np.ndarray
    audio: list[np.ndarray]
    video: list[np.ndarray]
    words: list[list[str]]
    text: list[np.ndarray] | None = None
    source: str = "<memory>"
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def to_split(self, text: list[np.ndarray] | None = None, max_len: int = 50) -> Split:
        """Padded :class:`Split` for the training layer: text (N, L, Dt) zero-padded, audio and
        video averaged over time to (N, 1, D) (the training models' utterance-level layout).
        ``text``: per-segment (L, Dt) arrays overriding ``self.text`` (e.g. :func:`embed_words`)."""
        seqs = text if text is not None else self.text
        if seqs is None:
            raise FormatError(f"{self.source}: this format stores no text vectors (words only); pass "
                              "text=embed_words(segments.words, glove_dir) or other per-word vectors")
        n = len(self)
        if len(seqs) != n:
            raise FormatError(f"{self.source}: {len(seqs)} text sequences for {n} segments")
        dims = {np.asarray(s).shape[-1] for s in seqs}
        if len(dims) != 1:
            raise FormatError(f"{self.source}: text vectors have differing widths {sorted(dims)}")
        lens = np.array([max(1, min(len(s), max_len)) for s in seqs], dtype=np.int64)
        out = np.zeros((n, int(lens.max()), dims.pop()), dtype=np.float32)
        for i, s in enumerate(seqs):
            s = np.asarray(s, dtype=np.float32)[:max_len]
            out[i, :len(s)] = s

        def pool(xs, name):
            ds = {x.shape[-1] for x in xs}
            if len(ds) != 1:
                raise FormatError(f"{self.source}: {name} features have differing widths {sorted(ds)}")
            return np.stack([np.nan_to_num(x.astype(np.float32)).mean(0) if len(x) else
                             np.zeros(x.shape[-1], np.float32) for x in xs])[:, None, :]

        return Split(text=out, text_len=lens, audio=pool(self.audio, "audio"), video=pool(self.video, "video"),
                     y=np.asarray(self.labels, dtype=np.float32),
                     words=[" ".join(w) for w in self.words])


def _label(path, i, raw) -> float:
    arr = np.asarray(raw, dtype=np.float64) if not isinstance(raw, (str, bytes)) else None
    if arr is None or arr.size != 1:
        raise FormatError(f"{path}: entry {i}: label must be a single number ([[label]]), got "
                          f"{type(raw).__name__}{'' if arr is None else ' of shape ' + str(arr.shape)}")
    v = float(arr.reshape(-1)[0])
    if not np.isfinite(v) or not -3.0 - 1e-6 <= v <= 3.0 + 1e-6:
        raise FormatError(f"{path}: entry {i}: label {v} is outside the sentiment range [-3, 3] "
                          "(mislabelled file?)")
    return v


def _matrix(path, i, name, x, rows=None) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        shape = getattr(x, "shape", None)
        raise FormatError(f"{path}: entry {i}: {name} must be a 2-D array (time, features), got "
                          f"{type(x).__name__}{'' if shape is None else ' of shape ' + str(shape)}")
    if rows is not None and x.shape[0] != rows:
        raise FormatError(f"{path}: entry {i}: {name} has {x.shape[0]} time steps, expected {rows}")
    return x


def _entries(path, obj, split):
    if isinstance(obj, dict):
        key = {"valid": ("valid", "dev", "val"), "dev": ("dev", "valid", "val")}.get(split, (split,))
        for k in key:
            if k in obj:
                return obj[k]
        raise FormatError(f"{path}: no split {split!r} (has {sorted(map(str, obj))})")
    if isinstance(obj, list):
        return obj
    raise FormatError(f"{path}: expected a list of entries or a dict of splits, got {type(obj).__name__}")


def _check_dims(path, name, xs) -> None:
    ds = {x.shape[1] for x in xs}
    if len(ds) > 1:
        raise FormatError(f"{path}: {name} feature width differs between entries: {sorted(ds)}")


def load_mag_pickle(path, split: str = "valid") -> Segments:
    """MAG-BERT layout (see module docstring). Word-aligned; ``text`` is None (word ids only),
    ``extra["word_ids"]`` keeps the ids."""
    obj = safe_load_pickle(path)
    entries = _entries(path, obj, split)
    ids, labels, audio, video, words, wids = [], [], [], [], [], []
    for i, e in enumerate(entries):
        if not (isinstance(e, (tuple, list)) and len(e) == 3 and isinstance(e[0], (tuple, list)) and len(e[0]) == 4):
            raise FormatError(f"{path}: entry {i} is not ((word_ids, visual, acoustic, words), label, id) "
                              "-- not the MAG-BERT layout (an MMIM file? use format 'mmim')")
        (wid, vis, aco, ws), lab, sid = e
        wid = np.asarray(wid)
        if wid.ndim != 1:
            raise FormatError(f"{path}: entry {i}: word_ids must be 1-D, got shape {wid.shape}")
        L = len(wid)
        _matrix(path, i, "visual", vis, L)
        _matrix(path, i, "acoustic", aco, L)
        if len(ws) != L:
            raise FormatError(f"{path}: entry {i}: {len(ws)} words but {L} word ids")
        ids.append(str(sid)); labels.append(_label(path, i, lab))
        video.append(vis); audio.append(aco); words.append([str(w) for w in ws]); wids.append(wid)
    if not ids:
        raise FormatError(f"{path}: no entries")
    _check_dims(path, "visual", video); _check_dims(path, "acoustic", audio)
    return Segments(ids, np.asarray(labels, np.float32), audio, video, words, None, str(path),
                    {"word_ids": wids, "format": "mag"})


def load_mmim_pickle(path, split: str = "valid") -> Segments:
    """MMIM layout (see module docstring). Unaligned; ``text`` is None (raw words only)."""
    obj = safe_load_pickle(path)
    entries = _entries(path, obj, split)
    ids, labels, audio, video, words = [], [], [], [], []
    for i, e in enumerate(entries):
        if not (isinstance(e, (tuple, list)) and len(e) == 3 and isinstance(e[0], (tuple, list)) and len(e[0]) == 6):
            raise FormatError(f"{path}: entry {i} is not ((words, visual, acoustic, actual_words, vlen, "
                              "alen), label, id) -- not the MMIM layout (a MAG-BERT file? use format 'mag')")
        (_, vis, aco, actual, vlen, alen), lab, sid = e
        _matrix(path, i, "visual", vis)
        _matrix(path, i, "acoustic", aco)
        for name, x, n in (("visual_len", vis, vlen), ("acoustic_len", aco, alen)):
            try:
                n = int(n)
            except (TypeError, ValueError):
                raise FormatError(f"{path}: entry {i}: {name} must be an integer, got {type(n).__name__}") from None
            if not 0 <= n <= x.shape[0]:
                raise FormatError(f"{path}: entry {i}: {name} = {n} but the array has {x.shape[0]} steps")
        ids.append(str(sid)); labels.append(_label(path, i, lab))
        video.append(vis[:int(vlen)] if int(vlen) else vis); audio.append(aco[:int(alen)] if int(alen) else aco)
        words.append([str(w).lower() for w in actual])
    if not ids:
        raise FormatError(f"{path}: no entries")
    _check_dims(path, "visual", video); _check_dims(path, "acoustic", audio)
    return Segments(ids, np.asarray(labels, np.float32), audio, video, words, None, str(path), {"format": "mmim"})


def load_mmsa_pickle(path, split: str = "test") -> Segments:
    """MulT / MMSA aligned layout (see module docstring)."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a dict of splits (MulT/MMSA layout), got {type(obj).__name__}")
    d = _entries(path, obj, split)
    if not isinstance(d, dict):
        raise FormatError(f"{path}: split {split!r} must be a dict of arrays, got {type(d).__name__}")
    arrs = {}
    for k in ("text", "audio", "vision"):
        if k not in d:
            raise FormatError(f"{path}: split {split!r} has no {k!r} array (keys: {sorted(d)})")
        x = d[k]
        if not isinstance(x, np.ndarray) or x.ndim != 3:
            raise FormatError(f"{path}: split {split!r}: {k!r} must be (N, L, D), got shape "
                              f"{getattr(x, 'shape', type(x).__name__)}")
        arrs[k] = x
    n, L = arrs["text"].shape[:2]
    for k in ("audio", "vision"):
        if arrs[k].shape[:2] != (n, L):
            raise FormatError(f"{path}: split {split!r}: {k!r} is {arrs[k].shape} but text is "
                              f"{arrs['text'].shape}: aligned layouts share N and L")
    lab_key = "regression_labels" if "regression_labels" in d else "labels" if "labels" in d else None
    if lab_key is None:
        raise FormatError(f"{path}: split {split!r} has no 'regression_labels' or 'labels' (keys: {sorted(d)})")
    lab = np.asarray(d[lab_key])
    if lab.size != n:
        raise FormatError(f"{path}: split {split!r}: {lab_key!r} has {lab.size} values for {n} segments")
    lab = lab.reshape(n).astype(np.float64)
    bad = np.where(~np.isfinite(lab) | (np.abs(lab) > 3 + 1e-6))[0]
    if bad.size:
        raise FormatError(f"{path}: split {split!r}: label {lab[bad[0]]} of segment {bad[0]} is outside "
                          "the sentiment range [-3, 3] (mislabelled file?)")
    if "id" in d:
        raw = np.asarray(d["id"])
        ids = ["_".join(str(v) for v in np.atleast_1d(r)) if raw.ndim > 1 else str(r) for r in raw]
        if len(ids) != n:
            raise FormatError(f"{path}: split {split!r}: 'id' has {len(ids)} rows for {n} segments")
    else:
        ids = [f"{split}_{i}" for i in range(n)]
    raw_text = d.get("raw_text")
    words = [str(t).lower().split() for t in raw_text] if raw_text is not None else [[] for _ in range(n)]
    # aligned features are zero-padded at the front (MulT) or the back; keep non-zero steps
    text, audio, video = [], [], []
    for i in range(n):
        keep = np.any(arrs["text"][i] != 0, axis=-1)
        if not keep.any():
            keep[:] = True
        text.append(arrs["text"][i][keep]); audio.append(arrs["audio"][i][keep]); video.append(arrs["vision"][i][keep])
    return Segments(ids, lab.astype(np.float32), audio, video, words, text, str(path), {"format": "mmsa"})


# --------------------------------------------------------------------------- CMU-MultimodalSDK
def _h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("reading CMU-MultimodalSDK .csd files needs h5py: pip install h5py "
                          "(or the dev extra: pip install -e .[dev])") from e
    return h5py


def read_csd(path) -> dict:
    """Read a computational sequence: ``{"root": name, "metadata": {..}, "data": {video:
    {"intervals": (n, 2), "features": (n, d)}}}``."""
    h5py = _h5py()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        fh = h5py.File(p, "r")
    except OSError as e:
        raise FormatError(f"{p}: not a readable HDF5 computational sequence (truncated or not HDF5: {e})") from e
    with fh:
        roots = list(fh.keys())
        if len(roots) != 1:
            raise FormatError(f"{p}: a computational sequence has one root group, found {roots}")
        g = fh[roots[0]]
        if "data" not in g:
            raise FormatError(f"{p}: root {roots[0]!r} has no 'data' group")
        meta = {}
        if "metadata" in g:
            for k in g["metadata"]:
                v = g["metadata"][k][()]
                v = v[0] if isinstance(v, np.ndarray) and v.size == 1 else v
                meta[k] = v.decode("utf-8", "replace").strip('"') if isinstance(v, bytes) else v
        data = {}
        try:
            for vid in g["data"]:
                item = g["data"][vid]
                if "intervals" not in item or "features" not in item:
                    raise FormatError(f"{p}: video {vid!r} lacks 'intervals' or 'features'")
                iv, ft = item["intervals"][()], item["features"][()]
                if iv.ndim != 2 or iv.shape[1] != 2:
                    raise FormatError(f"{p}: video {vid!r}: intervals must be (n, 2), got {iv.shape}")
                if ft.ndim != 2 or ft.shape[0] != iv.shape[0]:
                    raise FormatError(f"{p}: video {vid!r}: features {ft.shape} do not match intervals {iv.shape}")
                data[vid] = {"intervals": iv, "features": ft}
        except OSError as e:
            raise FormatError(f"{p}: unreadable data (truncated file?): {e}") from e
    return {"root": roots[0], "metadata": meta, "data": data, "source": str(p)}


def csd_to_segment_labels(csd: dict) -> dict[str, float]:
    """Opinion-label sequences: segment ``f"{video}_{k}"`` (k = 1-based position in the stored
    order, which is the clip numbering of MOSI-label.csv -- verified on all 2,199 MOSI segments;
    it is *not* always time order) -> label. Checks the values lie in [-3, 3]."""
    out = {}
    for vid, item in csd["data"].items():
        ft = item["features"]
        if ft.shape[1] != 1:
            raise FormatError(f"{csd['source']}: video {vid!r}: label sequences have 1 feature, got {ft.shape[1]}")
        for k in range(1, ft.shape[0] + 1):
            v = float(ft[k - 1, 0])
            if not -3 - 1e-6 <= v <= 3 + 1e-6:
                raise FormatError(f"{csd['source']}: video {vid!r}: label {v} outside [-3, 3]")
            out[f"{vid}_{k}"] = v
    return out


# --------------------------------------------------------------------------- label CSV + MOSEI
LABEL_COLUMNS = ("video_id", "clip_id", "text", "label", "mode")


def load_label_csv(path) -> dict[str, dict]:
    """``MOSI-label.csv`` / ``MOSEI-label.csv`` -> ``{segment_id: {"label", "text", "mode"}}``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    out = {}
    with open(p, newline="", encoding="utf-8") as fh:
        r = csv.DictReader(fh)
        missing = [c for c in LABEL_COLUMNS if c not in (r.fieldnames or [])]
        if missing:
            raise FormatError(f"{p}: missing column(s) {missing} (has {r.fieldnames})")
        for line, row in enumerate(r, 2):
            try:
                v = float(row["label"])
            except (TypeError, ValueError):
                raise FormatError(f"{p}: line {line}: label {row['label']!r} is not a number "
                                  "(truncated or mislabelled file?)") from None
            if not -3 - 1e-6 <= v <= 3 + 1e-6:
                raise FormatError(f"{p}: line {line}: label {v} outside [-3, 3]")
            if row["mode"] not in ("train", "valid", "test"):
                raise FormatError(f"{p}: line {line}: mode {row['mode']!r} is not train/valid/test")
            out[f"{row['video_id']}_{row['clip_id']}"] = {"label": v, "text": row["text"], "mode": row["mode"]}
    if not out:
        raise FormatError(f"{p}: no rows")
    return out


def load_labelled_dataset(name: str, labels_csv, features: dict, splits=("train", "valid", "test"),
                          strict: bool = False) -> dict[str, Segments]:
    """MOSI or MOSEI by name: the canonical labels/split from ``labels_csv`` joined with
    ``features`` = ``{segment_id: {"text": (L, Dt), "audio": (T, Da), "video": (T, Dv)}}`` (e.g.
    from .csd sequences or synthetic). Segments without features are skipped (``strict``: error)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    labels = load_label_csv(labels_csv)
    out = {}
    for sp in splits:
        sel = [s for s, r in labels.items() if r["mode"] == sp]
        have = [s for s in sel if s in features]
        if strict and len(have) != len(sel):
            miss = next(s for s in sel if s not in features)
            raise FormatError(f"{labels_csv}: {name} {sp}: {len(sel) - len(have)} segments lack features, e.g. {miss}")
        seq = {m: [] for m in ("text", "audio", "video")}
        for s in have:
            f = features[s]
            for m in seq:
                if m not in f:
                    raise FormatError(f"features for {s}: no {m!r} array")
                x = np.asarray(f[m], dtype=np.float32)
                if x.ndim != 2:
                    raise FormatError(f"features for {s}: {m!r} must be (time, dim), got {x.shape}")
                seq[m].append(x)
        out[sp] = Segments(have, np.array([labels[s]["label"] for s in have], np.float32), seq["audio"],
                           seq["video"], [labels[s]["text"].lower().split() for s in have], seq["text"],
                           f"{labels_csv}[{name}/{sp}]", {"format": "labels+features"})
    return out


def embed_words(words: list[list[str]], glove_dir) -> list[np.ndarray]:
    """Per-word GloVe vectors from ``glove_dir`` (``vocab.tsv`` + ``glove840b_mosi_vocab.npy``,
    the layout of ``shared/data/mosi/glove``); unknown words map to row 0 (``<unk>``)."""
    g = Path(glove_dir)
    vocab = {}
    for line in open(g / "vocab.tsv", encoding="utf-8"):
        w, r = line.rstrip("\n").split("\t")
        vocab[w] = int(r)
    mat = np.load(g / "glove840b_mosi_vocab.npy", allow_pickle=False)
    return [mat[[vocab.get(w.lower(), 0) for w in ws] or [0]].astype(np.float32) for ws in words]


def load_format(fmt: str, path, split: str = "valid"):
    """Dispatch by format name: mag, mmim, mmsa -> Segments; csd -> read_csd dict."""
    if fmt == "mag":
        return load_mag_pickle(path, split)
    if fmt == "mmim":
        return load_mmim_pickle(path, split)
    if fmt == "mmsa":
        return load_mmsa_pickle(path, split)
    if fmt == "csd":
        return read_csd(path)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")

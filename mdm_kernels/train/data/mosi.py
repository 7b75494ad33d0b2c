"""Real CMU-MOSI data: bc-LSTM utterance features + GloVe word sequences + continuous labels.

The package ships ``mdm_kernels/data/mosi_bclstm.npz`` (built by ``python/convert_mosi.py``
from the MIT-licensed bc-LSTM release, see ``mdm_kernels/data/LICENSE-bclstm``).  Loading
never downloads anything.

Split: the bc-LSTM release's own speaker-independent split (1,447 train / 752 test rows).
Validation is carved out of the *train videos* (whole videos, never segments;
deterministic), because the bc-LSTM features were learnt supervised on that split and its
train rows overlap the canonical MOSI test split: never mix the two splits.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGED = Path(__file__).resolve().parents[2] / "data" / "mosi_bclstm.npz"
VALID_FRACTION = 0.15
SPLIT_SEED = 0
TRAIN, VALID, TEST = 0, 1, 2


def _read_csv(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"MOSI raw file not found: {path} (check --data-dir)")
    with open(path, newline="") as fh:
        return [row for row in csv.reader(fh) if row]


def tokenize(text: str) -> list[str]:
    return text.lower().split()


def build_from_raw(root: str | os.PathLike) -> dict[str, np.ndarray]:
    """Convert the raw release under ``root`` (the layout of ``shared/data/mosi``:
    ``bclstm/``, ``MOSI-label.csv``, ``glove/``) into the arrays stored in the npz."""
    root = Path(root)
    bc = root / "bclstm"
    transcripts = _read_csv(bc / "transcripts.csv")
    seg_ids = [r[0] for r in transcripts]
    texts = [r[1] for r in transcripts]

    labels: dict[str, float] = {}
    lab_path = root / "MOSI-label.csv"
    if not lab_path.is_file():
        raise FileNotFoundError(f"MOSI label file not found: {lab_path} (check --data-dir)")
    with open(lab_path, newline="") as fh:
        for row in csv.DictReader(fh):
            labels[f"{row['video_id']}_{row['clip_id']}"] = float(row["label"])

    vocab: dict[str, int] = {}
    vpath = root / "glove" / "vocab.tsv"
    if not vpath.is_file():
        raise FileNotFoundError(f"GloVe vocabulary not found: {vpath} (check --data-dir)")
    for line in open(vpath, encoding="utf-8"):
        w, r = line.rstrip("\n").split("\t")
        vocab[w] = int(r)
    gpath = root / "glove" / "glove840b_mosi_vocab.npy"
    if not gpath.is_file():
        raise FileNotFoundError(f"GloVe matrix not found: {gpath} (check --data-dir)")
    glove = np.load(gpath)

    out: dict[str, list] = {k: [] for k in ("text", "audio", "video", "label", "binary", "seg", "split")}
    for split_name, split_code in (("train", TRAIN), ("test", TEST)):
        idx = [int(float(r[0])) for r in _read_csv(bc / f"text_{split_name}.csv")]
        mods = {m: _read_csv(bc / m / f"{m}_{split_name}0.csv") for m in ("text", "audio", "video")}
        n = len(idx)
        for m, rows in mods.items():
            if len(rows) != n:
                raise ValueError(f"{m}_{split_name}0.csv has {len(rows)} rows, expected {n}")
        for r in range(n):
            sid = seg_ids[idx[r]]
            if sid not in labels:
                raise ValueError(f"segment {sid} has no continuous label in MOSI-label.csv")
            out["seg"].append(sid)
            out["split"].append(split_code)
            out["label"].append(labels[sid])
            out["binary"].append(int(float(mods["text"][r][-1])))
            for m in ("text", "audio", "video"):
                out[m].append([float(x) for x in mods[m][r][:-1]])

    # validation = ~15% of the train *videos*, chosen deterministically
    vids = np.array([s.rsplit("_", 1)[0] for s in out["seg"]])
    split = np.array(out["split"], dtype=np.int8)
    train_videos = sorted(set(vids[split == TRAIN]))
    rng = np.random.RandomState(SPLIT_SEED)
    n_val = max(1, int(round(VALID_FRACTION * len(train_videos))))
    val_videos = set(rng.choice(train_videos, size=n_val, replace=False).tolist())
    split[(split == TRAIN) & np.isin(vids, list(val_videos))] = VALID

    # word-level sequences through the GloVe vocabulary; ship only the rows used
    seg_text = {s: t for s, t in zip(seg_ids, texts)}
    toks = [[vocab.get(w, 0) for w in tokenize(seg_text[s])] or [0] for s in out["seg"]]
    used = sorted({0, 1} | {t for seq in toks for t in seq})
    remap = {old: new for new, old in enumerate(used)}
    flat = np.array([remap[t] for seq in toks for t in seq], dtype=np.int16)
    offsets = np.cumsum([0] + [len(s) for s in toks]).astype(np.int32)

    return {
        "text_feat": np.asarray(out["text"], dtype=np.float32),
        "audio_feat": np.asarray(out["audio"], dtype=np.float32),
        "video_feat": np.asarray(out["video"], dtype=np.float32),
        "label": np.asarray(out["label"], dtype=np.float32),
        "binary": np.asarray(out["binary"], dtype=np.int8),
        "segment_id": np.asarray(out["seg"]),
        "transcript": np.asarray([seg_text[s].lower() for s in out["seg"]]),
        "split": split,
        "token_flat": flat,
        "token_offsets": offsets,
        "glove": glove[used].astype(np.float16),
    }


def load_arrays(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Packaged arrays (default), or ``data_dir``: a directory holding ``mosi_bclstm.npz``
    or the raw release (``bclstm/``, ``MOSI-label.csv``, ``glove/``)."""
    if data_dir is None:
        path = PACKAGED
        if not path.is_file():
            raise FileNotFoundError(
                f"embedded MOSI data missing: {path}; reinstall mdm_kernels or regenerate it "
                "with `python python/convert_mosi.py`")
    else:
        d = Path(data_dir)
        if not d.exists():
            raise FileNotFoundError(f"--data-dir {d} does not exist")
        path = d / "mosi_bclstm.npz" if d.is_dir() else d
        if d.is_dir() and not path.is_file():
            if (d / "mosi").is_dir() and not (d / "bclstm").is_dir():
                d = d / "mosi"
            return build_from_raw(d)
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass
class Split:
    text: np.ndarray        # (N, L, Dt) float32, zero-padded
    text_len: np.ndarray    # (N,) int64
    audio: np.ndarray       # (N, 1, Da)
    video: np.ndarray       # (N, 1, Dv)
    y: np.ndarray           # (N,) float32 in [-3, 3]
    words: list[str]        # transcripts (for models with their own tokenizer)

    def __len__(self) -> int:
        return len(self.y)


def _standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    mu, sd = train.mean(0), train.std(0)
    return ((x - mu) / np.where(sd > 1e-6, sd, 1.0)).astype(np.float32)


def load_mosi(data_dir=None, text_features: str = "both", max_len: int = 50) -> dict[str, Split]:
    """Return ``{"train","valid","test"}`` splits as padded arrays.

    ``text_features``: ``"glove"`` (word vector sequence, 300-d), ``"utterance"`` (the
    100-d bc-LSTM text features as a length-1 sequence) or ``"both"`` (each word vector
    concatenated with the utterance features, 400-d).  Audio and video are utterance-level,
    standardised with train statistics, as length-1 sequences.
    """
    if text_features not in ("glove", "utterance", "both"):
        raise ValueError(f"text_features must be glove|utterance|both, got {text_features!r}")
    a = load_arrays(data_dir)
    split = a["split"]
    tr = split == TRAIN
    feats = {m: _standardise(a[f"{m}_feat"], a[f"{m}_feat"][tr]) for m in ("text", "audio", "video")}
    off = a["token_offsets"]
    n = len(split)
    lens = np.minimum(np.diff(off), max_len).astype(np.int64)
    if text_features != "utterance":
        glove = a["glove"].astype(np.float32)
        L = int(lens.max())
        seq = np.zeros((n, L, 300), dtype=np.float32)
        for i in range(n):
            ids = a["token_flat"][off[i]:off[i] + lens[i]].astype(np.int64)
            seq[i, :lens[i]] = glove[ids]
    if text_features == "glove":
        text = seq
    elif text_features == "utterance":
        text, lens = feats["text"][:, None, :], np.ones(n, dtype=np.int64)
    else:
        ut = np.broadcast_to(feats["text"][:, None, :], (n, L, feats["text"].shape[1]))
        text = np.concatenate([seq, ut], axis=-1) * (np.arange(L)[None, :, None] < lens[:, None, None])
        text = text.astype(np.float32)
    out = {}
    for name, code in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        m = split == code
        out[name] = Split(text=text[m], text_len=lens[m], audio=feats["audio"][m][:, None, :],
                          video=feats["video"][m][:, None, :], y=a["label"][m].astype(np.float32),
                          words=[str(w) for w in a["transcript"][m]])
    return out

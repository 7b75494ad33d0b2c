"""Community data formats: MAG-BERT / MMIM / MulT-MMSA pickles, CMU-MultimodalSDK .csd, label
CSVs (MOSI, MOSEI); the restricted unpickler; errors that name the file and the problem."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from mdm_kernels.train.data.formats import (FormatError, csd_to_segment_labels, embed_words,
                                            load_format, load_label_csv, load_labelled_dataset,
                                            load_mag_pickle, load_mmim_pickle, load_mmsa_pickle,
                                            read_csd, safe_load_pickle)

# shared/ sits beside the checkout (../shared from the repo root); never a fixed absolute path
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MOSI = SHARED / "mosi"
needs_shared = pytest.mark.skipif(not MOSI.is_dir(), reason=f"shared data not found at {SHARED}")


# --------------------------------------------------------------------------- restricted unpickler
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch PWNED_MARKER')",))


@pytest.mark.parametrize("payload", [_Evil(), _EvalEvil(), [np.zeros(2), _Evil()]])
def test_malicious_pickle_refused_and_not_executed(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(payload))
    with pytest.raises(FormatError) as ei:
        safe_load_pickle(p)
    msg = str(ei.value)
    assert str(p) in msg and "refusing" in msg
    assert ("system" in msg) or ("eval" in msg)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_arbitrary_class_refused(tmp_path):
    p = tmp_path / "cls.pkl"
    p.write_bytes(pickle.dumps(Path("/x")))  # pathlib class: not numpy, not a plain container
    with pytest.raises(FormatError, match="pathlib"):
        safe_load_pickle(p)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_numpy_containers_allowed(tmp_path, protocol):
    obj = {"a": [np.arange(6, dtype=np.float32).reshape(2, 3), (np.int64(3), "w")], "b": np.array(["x", "yy"])}
    p = tmp_path / "ok.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    back = safe_load_pickle(p)
    np.testing.assert_array_equal(back["a"][0], obj["a"][0])
    assert int(back["a"][1][0]) == 3 and list(back["b"]) == ["x", "yy"]


def test_protocol5_buffer_class_is_refused_by_name(tmp_path):
    # protocol 5 rebuilds arrays through numpy's _frombuffer, which is not on the allow-list
    p = tmp_path / "p5.pkl"
    p.write_bytes(pickle.dumps(np.arange(3.0), protocol=5))
    with pytest.raises(FormatError, match=r"p5\.pkl: refusing to unpickle numpy\.(_core|core)\.numeric\._frombuffer"):
        safe_load_pickle(p)


def test_truncated_and_empty_pickles(tmp_path):
    data = pickle.dumps([np.zeros((50, 4))] * 5)
    p = tmp_path / "cut.pkl"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"cut\.pkl.*truncated"):
        safe_load_pickle(p)
    e = tmp_path / "empty.pkl"
    e.write_bytes(b"")
    with pytest.raises(FormatError, match=r"empty\.pkl.*empty"):
        safe_load_pickle(e)
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        safe_load_pickle(tmp_path / "missing.pkl")


# --------------------------------------------------------------------------- MAG / MMIM on real files
@needs_shared
def test_mag_format_real_valid_file():
    s = load_mag_pickle(MOSI / "sequences" / "mag_format_valid.pkl")
    assert len(s) == 229
    assert s.ids[0] == "WKA5OygbEKI[0]"
    assert s.video[0].shape[1] == 47 and s.audio[0].shape[1] == 74
    assert all(len(w) == v.shape[0] == a.shape[0] for w, v, a in zip(s.words, s.video, s.audio))
    assert np.all(np.abs(s.labels) <= 3)
    with pytest.raises(FormatError, match="no text vectors"):
        s.to_split()
    sp = s.to_split(text=embed_words(s.words, MOSI / "glove"))
    assert sp.text.shape[0] == 229 and sp.text.shape[2] == 300 and sp.audio.shape == (229, 1, 74)


@needs_shared
def test_mmim_format_real_valid_file_matches_canonical_labels():
    s = load_mmim_pickle(MOSI / "sequences" / "mmim_format_valid.pkl")
    assert len(s) == 229 and s.video[0].shape[1] == 20 and s.audio[0].shape[1] == 5
    labels = load_label_csv(MOSI / "MOSI-label.csv")
    assert all(labels[i]["mode"] == "valid" for i in s.ids)
    np.testing.assert_allclose(s.labels, [labels[i]["label"] for i in s.ids], atol=1e-5)
    assert s.words[0] == ["i", "definitely", "will", "buy", "it"]


@needs_shared
def test_wrong_layout_named(tmp_path):
    with pytest.raises(FormatError, match=r"mmim_format_valid\.pkl.*not the MAG-BERT layout"):
        load_format("mag", MOSI / "sequences" / "mmim_format_valid.pkl")
    with pytest.raises(FormatError, match=r"mag_format_valid\.pkl.*not the MMIM layout"):
        load_format("mmim", MOSI / "sequences" / "mag_format_valid.pkl")
    # truncated copy of a real file
    src = (MOSI / "sequences" / "mag_format_valid.pkl").read_bytes()
    cut = tmp_path / "mag_cut.pkl"
    cut.write_bytes(src[:100_000])
    with pytest.raises(FormatError, match=r"mag_cut\.pkl.*truncated"):
        load_mag_pickle(cut)


def _mag_entry(L=4, label=1.0, dv=47, da=74, vis_rows=None):
    return ((np.arange(L), np.zeros((vis_rows or L, dv), np.float32), np.zeros((L, da), np.float32),
             ["w"] * L), np.array([[label]], np.float32), "vid[0]")


def test_mag_mislabelled_and_misshaped(tmp_path):
    p = tmp_path / "mag_bad_label.pkl"
    p.write_bytes(pickle.dumps([_mag_entry(), _mag_entry(label=7.5)]))
    with pytest.raises(FormatError, match=r"mag_bad_label\.pkl: entry 1: label 7.5 is outside"):
        load_mag_pickle(p)
    p = tmp_path / "mag_bad_shape.pkl"
    p.write_bytes(pickle.dumps([_mag_entry(vis_rows=3)]))
    with pytest.raises(FormatError, match=r"mag_bad_shape\.pkl: entry 0: visual has 3 time steps, expected 4"):
        load_mag_pickle(p)
    p = tmp_path / "mag_dims.pkl"
    p.write_bytes(pickle.dumps([_mag_entry(), _mag_entry(dv=35)]))
    with pytest.raises(FormatError, match=r"mag_dims\.pkl: visual feature width differs"):
        load_mag_pickle(p)
    p = tmp_path / "mag_split.pkl"
    p.write_bytes(pickle.dumps({"train": [_mag_entry()], "dev": [_mag_entry(L=2)]}))
    assert len(load_mag_pickle(p, "valid")) == 1 and len(load_mag_pickle(p, "train")) == 1
    with pytest.raises(FormatError, match=r"mag_split\.pkl: no split 'test'"):
        load_mag_pickle(p, "test")


def test_mmim_length_mismatch(tmp_path):
    e = (([], np.zeros((5, 20)), np.zeros((4, 5)), ["a", "b"], np.int64(9), np.int64(4)), np.array([[0.5]]), "v_1")
    p = tmp_path / "mmim_len.pkl"
    p.write_bytes(pickle.dumps([e]))
    with pytest.raises(FormatError, match=r"mmim_len\.pkl: entry 0: visual_len = 9 but the array has 5"):
        load_mmim_pickle(p)


# --------------------------------------------------------------------------- MulT / MMSA aligned
def _mmsa(n=6, L=5, label_key="regression_labels", labels=None, audio_L=None):
    rng = np.random.RandomState(0)

    def split(n):
        d = {"text": rng.randn(n, L, 8).astype(np.float32), "audio": rng.randn(n, audio_L or L, 3).astype(np.float32),
             "vision": rng.randn(n, L, 4).astype(np.float32),
             "raw_text": np.array([f"Hello world {i}" for i in range(n)]),
             "id": np.array([f"vid_{i}" for i in range(n)])}
        d["text"][0, :2] = 0  # front padding, as in MulT files
        y = rng.uniform(-3, 3, n) if labels is None else np.asarray(labels)
        d[label_key] = y.reshape(n, 1, 1) if label_key == "labels" else y.astype(np.float32)
        return d
    return {"train": split(n), "valid": split(n // 2), "test": split(n // 2)}


@pytest.mark.parametrize("label_key", ["regression_labels", "labels"])
def test_mmsa_aligned_roundtrip(tmp_path, label_key):
    obj = _mmsa(label_key=label_key)
    p = tmp_path / "aligned_50.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=4))
    s = load_mmsa_pickle(p, "train")
    assert len(s) == 6 and s.ids[0] == "vid_0" and s.words[1] == ["hello", "world", "1"]
    assert s.text[0].shape == (3, 8) and s.text[1].shape == (5, 8)  # padding dropped
    np.testing.assert_allclose(s.labels, np.asarray(obj["train"][label_key]).reshape(-1), atol=1e-6)
    sp = s.to_split()
    assert sp.text.shape == (6, 5, 8) and list(sp.text_len) == [3, 5, 5, 5, 5, 5]
    assert sp.audio.shape == (6, 1, 3) and sp.video.shape == (6, 1, 4)
    assert len(load_format("mmsa", p, "dev")) == 3  # 'dev' / 'valid' are aliases


def _assert_rejected(path, content, reader, match):
    """Write ``content`` (bytes or text) to ``path``: ``reader(path)`` must raise a
    FormatError matching ``match``."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(FormatError, match=match):
        reader(path)


def test_mmsa_errors(tmp_path):
    _assert_rejected(tmp_path / "mis.pkl", pickle.dumps(_mmsa(audio_L=4)), load_mmsa_pickle,
                     r"mis\.pkl: split 'test': 'audio' is \(3, 4, 3\).*share N and L")
    _assert_rejected(tmp_path / "lab.pkl", pickle.dumps(_mmsa(labels=[0, 1, 2, 3, 4, 5])),
                     lambda p: load_mmsa_pickle(p, "train"),
                     r"lab\.pkl: split 'train': label 4.0 of segment 4 is outside")
    obj = _mmsa()
    del obj["test"]["vision"]
    _assert_rejected(tmp_path / "novis.pkl", pickle.dumps(obj), load_mmsa_pickle,
                     r"novis\.pkl: split 'test' has no 'vision'")


# --------------------------------------------------------------------------- .csd (HDF5)
@needs_shared
def test_csd_opinion_labels_match_canonical_csv():
    pytest.importorskip("h5py")
    csd = read_csd(MOSI / "CMU_MOSI_Opinion_Labels.csd")
    assert csd["root"] == "Opinion Segment Labels" and len(csd["data"]) == 93
    assert csd["metadata"]["dataset name"] == "CMU-MOSI"
    lab = csd_to_segment_labels(csd)
    ref = load_label_csv(MOSI / "MOSI-label.csv")
    assert len(lab) == 2199 and set(lab) == set(ref)
    assert max(abs(lab[k] - ref[k]["label"]) for k in lab) < 1e-4


def _write_csd(path, intervals, features):
    """A one-video CMU-MultimodalSDK .csd (HDF5) file at ``path``."""
    import h5py
    with h5py.File(path, "w") as f:
        g = f.create_group("Root/data/vid")
        g["intervals"] = intervals
        g["features"] = features
    return path


def test_csd_errors(tmp_path):
    pytest.importorskip("h5py")
    p = _write_csd(tmp_path / "bad.csd", np.zeros((3, 2)), np.zeros((2, 1)))
    with pytest.raises(FormatError, match=r"bad\.csd: video 'vid': features \(2, 1\) do not match intervals \(3, 2\)"):
        read_csd(p)
    p2 = _write_csd(tmp_path / "lab.csd", np.zeros((1, 2)), np.full((1, 1), 9.0))
    with pytest.raises(FormatError, match=r"lab\.csd: video 'vid': label 9.0 outside"):
        csd_to_segment_labels(read_csd(p2))
    good = _write_csd(tmp_path / "good.csd", np.zeros((40, 2)), np.zeros((40, 1000)))
    _assert_rejected(tmp_path / "cut.csd", good.read_bytes()[:3000], read_csd, r"cut\.csd")
    _assert_rejected(tmp_path / "text.csd", "hello", read_csd,
                     r"text\.csd: not a readable HDF5")


def test_csd_without_h5py_gives_clear_error(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "h5py":
            raise ImportError("no h5py")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install h5py"):
        read_csd(tmp_path / "x.csd")


# --------------------------------------------------------------------------- labels CSV + MOSEI by name
@needs_shared
def test_mosei_labels_with_synthetic_features():
    path = SHARED / "mosei" / "MOSEI-label.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    labels = load_label_csv(path)
    assert len(labels) == 22856
    modes = [r["mode"] for r in labels.values()]
    assert (modes.count("train"), modes.count("valid"), modes.count("test")) == (16326, 1871, 4659)
    rng = np.random.RandomState(0)
    chosen = [k for k, r in labels.items() if r["mode"] == "test"][:20] + \
             [k for k, r in labels.items() if r["mode"] == "train"][:30]
    feats = {k: {"text": rng.randn(rng.randint(1, 6), 8), "audio": rng.randn(3, 4), "video": rng.randn(2, 5)} for k in chosen}
    ds = load_labelled_dataset("mosei", path, feats)
    assert len(ds["train"]) == 30 and len(ds["test"]) == 20 and len(ds["valid"]) == 0
    np.testing.assert_allclose(ds["test"].labels, [labels[k]["label"] for k in chosen[:20]], atol=1e-6)
    sp = ds["train"].to_split()
    assert sp.text.shape[0] == 30 and sp.audio.shape == (30, 1, 4) and sp.video.shape == (30, 1, 5)
    with pytest.raises(FormatError, match="lack features"):
        load_labelled_dataset("mosei", path, feats, strict=True)
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_labelled_dataset("iemocap", path, feats)


def test_label_csv_errors(tmp_path):
    hdr = "video_id,clip_id,text,label,annotation,mode,label_by\n"
    for name, text, match in [
            ("bad_label.csv", hdr + "v,1,hi,0.5,Positive,train,0\nv,2,yo,4.5,Positive,train,0\n",
             r"bad_label\.csv: line 3: label 4.5 outside"),
            ("trunc.csv", hdr + "v,1,hi,0.5,Positive,train,0\nv,2,yo", r"trunc\.csv: line 3"),
            ("cols.csv", "video_id,clip_id,label\nv,1,0.5\n", r"cols\.csv: missing column")]:
        _assert_rejected(tmp_path / name, text, load_label_csv, match)

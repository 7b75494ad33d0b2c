"""Embedded MOSI data and the synthetic generator."""
from pathlib import Path

import numpy as np
import pytest

from mdm_kernels.train.data import iterate_batches, load_dataset, make_synthetic
from mdm_kernels.train.data.mosi import PACKAGED, build_from_raw, load_arrays

RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mosi"


def test_packaged_file_small_with_licence():
    assert PACKAGED.is_file()
    assert PACKAGED.stat().st_size < 5e6
    assert (PACKAGED.parent / "LICENSE-bclstm").is_file()
    assert (PACKAGED.parent / "CREDITS.md").is_file()


def test_split_counts_and_video_level_validation():
    a = load_arrays()
    sp = a["split"]
    assert (sp != 2).sum() == 1447 and (sp == 2).sum() == 752
    assert 150 < (sp == 1).sum() < 300
    vids = np.array([s.rsplit("_", 1)[0] for s in a["segment_id"]])
    tr, va, te = (set(vids[sp == k]) for k in (0, 1, 2))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr | va) == 62 and len(te) == 31
    assert np.all(np.abs(a["label"]) <= 3)
    # the bc-LSTM binary labels agree with the sign of the continuous labels
    assert np.mean(a["binary"] == (a["label"] >= 0)) > 0.99
    assert a["glove"].dtype == np.float16 and a["glove"].shape[1] == 300


def test_loader_shapes():
    d = load_dataset("mosi")
    assert len(d["train"]) + len(d["valid"]) == 1447 and len(d["test"]) == 752
    tr = d["train"]
    assert tr.text.shape[-1] == 400 and tr.audio.shape[1:] == (1, 73) and tr.video.shape[1:] == (1, 100)
    assert tr.text_len.min() >= 1
    b = next(iterate_batches(tr, 5))
    assert b["text"].shape[0] == 5 and b["text"].shape[1] == int(b["text_len"].max())
    g = load_dataset("mosi", text_features="glove")["test"]
    assert g.text.shape[-1] == 300


@pytest.mark.skipif(not (RAW / "bclstm").is_dir(), reason="raw MOSI release not at ../shared/data/mosi")
def test_converter_reproduces_packaged_file():
    raw = build_from_raw(RAW)
    pk = load_arrays()
    for k in pk:
        np.testing.assert_array_equal(raw[k], pk[k], err_msg=k)


def test_missing_data_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_arrays(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="transcripts.csv"):
        load_arrays(tmp_path)


def test_synthetic_dependency_structure():
    d = make_synthetic(n_train=2000, seed=1, noise=0.1)["train"]
    a, v = d.audio[:, 0], d.video[:, 0]
    # shared latent: audio and video are strongly correlated (linear CCA proxy)
    c = np.corrcoef(np.concatenate([a, v], 1).T)[: a.shape[1], a.shape[1]:]
    assert np.abs(c).max() > 0.5
    ind = make_synthetic(n_train=2000, seed=1, noise=0.1, shared=0.0)["train"]
    c0 = np.corrcoef(np.concatenate([ind.audio[:, 0], ind.video[:, 0]], 1).T)[:8, 8:]
    assert np.abs(c0).max() < 0.15
    assert np.all(np.abs(d.y) <= 3)

"""``python -m mdm_kernels.train.analyze reproduce`` (issue 16) on a tiny synthetic grid, and
its statistics helpers."""
import json
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import mannwhitneyu

from mdm_kernels.train import analyze, loop
from mdm_kernels.train import reproduce as rep

TINY = ["reproduce", "--dataset", "synthetic", "--models", "ef_lstm", "--penalties", "none,nwj",
        "--epochs", "1", "--lambdas", "0.1,1", "--unrolls", "1", "--critic-hiddens", "8", "--no-progress"]


@pytest.fixture
def count_training(monkeypatch):
    calls = []
    real = loop.train

    def counting(cfg, **kw):
        calls.append(cfg)
        return real(cfg, **kw)
    monkeypatch.setattr(loop, "train", counting)
    return calls


def test_tiny_grid_end_to_end_and_resume(tmp_path, count_training, capsys):
    out, doc = tmp_path / "grid", tmp_path / "docs" / "reproduction.md"
    assert analyze.main(TINY + ["--seeds", "0,1", "--out", str(out), "--doc", str(doc)]) == 0
    # 2 selection runs (one per lambda) + 2 seeds x 2 penalties, less nwj at seed 0: the chosen
    # selection run itself (test_selection_seed_final_run_is_the_chosen_selection_run)
    assert len(count_training) == 5
    res = json.loads((out / "reproduce.json").read_text())
    assert len(res["runs"]) == 4 and not res["missing"]
    for r in res["runs"]:  # the full configuration of every run
        assert r["config"]["model"] == "ef_lstm" and r["config"]["seed"] == r["seed"]
        assert {"critic_input", "epochs", "critic_steps", "critic_hidden", "weight"} <= set(r["config"])
        assert 0 <= r["metrics"]["acc2"] <= 1 and r["metrics"]["robust_ratio"] >= 0
    sel = res["selection"]["ef_lstm/nwj"]
    maes = [c["val_mae"] for c in sel["candidates"]]
    assert len(maes) == 2 and sel["chosen"] == sel["candidates"][maes.index(min(maes))]["point"]
    for c in sel["candidates"]:  # selection never evaluated the test split
        m = json.loads((Path(c["run_dir"]) / "metrics.json").read_text())
        assert m["config"]["skip_test"] and "acc2" not in m
    pen_runs = [r for r in res["runs"] if r["penalty"] == "nwj"]
    assert all(r["config"]["weight"] == sel["chosen"]["weight"] for r in pen_runs)
    (cmp,) = res["comparisons"]
    a = [r["metrics"]["mae"] for r in pen_runs]
    b = [r["metrics"]["mae"] for r in res["runs"] if r["penalty"] == "none"]
    assert cmp["mae"]["p"] == pytest.approx(mannwhitneyu(a, b, alternative="two-sided").pvalue)
    text = doc.read_text()
    assert "| EF-LSTM | ours (2 seeds) |" in text and "| | paper | 31.1 / 76.1 / 1.00 / 0.65 |" in text
    assert "cannot be tested" in text  # 2 seeds: p < 0.05 is unattainable
    assert (doc.parent / "reproduction" / "dots_acc7.png").stat().st_size > 0
    assert (doc.parent / "reproduction" / "dots_acc2.png").stat().st_size > 0

    # resumable: a wider grid trains only what is new
    count_training.clear()
    assert analyze.main(TINY + ["--seeds", "0,1,2", "--out", str(out), "--doc", str(doc)]) == 0
    assert [(c.penalty, c.seed) for c in count_training] == [("none", 2), ("nwj", 2)]

    # report only: nothing trains, unfinished runs are listed as not run
    count_training.clear()
    notes = tmp_path / "notes.md"
    notes.write_text("Scale: one epoch (a test).\n")
    assert analyze.main(TINY + ["--seeds", "0,1,2,3", "--out", str(out), "--doc", str(doc), "--report-only",
                                "--notes", str(notes)]) == 0
    assert not count_training
    res = json.loads((out / "reproduce.json").read_text())
    assert len(res["runs"]) == 6 and res["missing"] == ["ef_lstm/none/s3", "ef_lstm/nwj/s3"]
    assert "**Not run** (2 final runs): ef_lstm: 2 (none s3, nwj s3)." in doc.read_text() and "Scale: one epoch (a test)." in doc.read_text()
    assert "not BERT-base" in doc.read_text()


def test_plan_selection_first_and_seed_major():
    grid = {"weight": (0.1, 1.0), "critic_steps": (1,), "critic_hidden": (8,)}
    p = rep.plan(["ef_lstm", "lmf", "mag"], ["none", "mine"], [0, 1], grid, model_seeds={"mag": [1]},
                 no_select=("mag",))
    labels = [(r["phase"], r["model"], r["penalty"], r.get("seed")) for r in p]
    assert labels == [("select", "ef_lstm", "mine", None)] * 2 + [("select", "lmf", "mine", None)] * 2 + [
        ("final", "ef_lstm", "none", 0), ("final", "ef_lstm", "mine", 0),
        ("final", "lmf", "none", 0), ("final", "lmf", "mine", 0),
        ("final", "ef_lstm", "none", 1), ("final", "ef_lstm", "mine", 1),
        ("final", "lmf", "none", 1), ("final", "lmf", "mine", 1),
        ("final", "mag", "none", 1), ("final", "mag", "mine", 1)]


def test_holm_matches_hand_values():
    adj = rep.holm([0.01, 0.04, float("nan"), 0.03])
    # sorted 0.01, 0.03, 0.04 with m = 3: 0.03, 0.06, 0.06 (monotone)
    assert adj[0] == pytest.approx(0.03) and adj[3] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06)
    assert math.isnan(adj[2])


def test_min_attainable_p_and_verdicts():
    assert rep.min_mwu_p(4, 4) == pytest.approx(2 / 70)
    assert rep.min_mwu_p(3, 3) == pytest.approx(0.1)
    base = {"n": 10, "base_n": 10, "min_p": rep.min_mwu_p(10, 10)}
    assert rep.verdict({**base, "delta": 0.02, "p": 0.01}, "acc7") == "holds"
    assert rep.verdict({**base, "delta": 0.02, "p": 0.01}, "mae") == "does not hold (significantly worse)"
    assert rep.verdict({**base, "delta": -0.02, "p": 0.01}, "mae") == "holds"
    assert rep.verdict({**base, "delta": 0.02, "p": 0.2}, "acc7") == "does not hold"
    assert rep.verdict({"n": 3, "base_n": 3, "min_p": 0.1, "delta": 0.1, "p": 0.1}, "acc7") == "cannot be tested"
    assert math.isnan(rep.mann_whitney([1.0], [2.0, 3.0]))


def test_remove_text_zeroes_features_and_empties_transcripts():
    b = {"text": torch.ones(2, 3, 4), "audio": torch.ones(2, 1, 2), "words": ["a b", "c"]}
    cut = rep.remove_text(b)
    assert torch.all(cut["text"] == 0) and cut["words"] == ["", ""] and torch.all(cut["audio"] == 1)
    assert torch.all(b["text"] == 1)  # the input batch is untouched


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        analyze.main(TINY + ["--seeds", "0", "--out", str(tmp_path / "o"), "--model-option", "ef_lstm:epochz=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "epochz" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        analyze.main(TINY + ["--seeds", "0", "--out", str(tmp_path / "o"), "--penalties", "nwj"])
    assert e.value.code == 2 and "none" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        analyze.main(TINY + ["--seeds", "0", "--out", str(tmp_path / "o"), "--lambdas", "0.1,x"])
    assert e.value.code == 2 and "--lambdas" in capsys.readouterr().err


# --------------------------------------------------------------------------- issue 25
def test_plan_order_blocks_variants_and_pairs():
    grid = {"weight": (0.1, 1.0), "critic_steps": (1,), "critic_hidden": (8,)}
    order = rep.parse_order("mfn:none+wasserstein; glove/mfn:none+wasserstein")
    assert order == [[(None, "mfn", ["none", "wasserstein"])], [("glove", "mfn", ["none", "wasserstein"])]]
    p = rep.plan(["mfn"], ["none", "mine", "wasserstein"], [0, 1], grid,
                 extra={"glove": (["mfn"], ["none", "wasserstein"])}, order=order)
    labels = [(r["phase"], r["variant"], r["penalty"], r.get("seed")) for r in p]
    assert labels == [
        # block 1: its selection, then both arms seed by seed
        ("select", None, "wasserstein", None), ("select", None, "wasserstein", None),
        ("final", None, "none", 0), ("final", None, "wasserstein", 0),
        ("final", None, "none", 1), ("final", None, "wasserstein", 1),
        # block 2: the GloVe table, selected on its own
        ("select", "glove", "wasserstein", None), ("select", "glove", "wasserstein", None),
        ("final", "glove", "none", 0), ("final", "glove", "wasserstein", 0),
        ("final", "glove", "none", 1), ("final", "glove", "wasserstein", 1),
        # the cells no block named come last
        ("select", None, "mine", None), ("select", None, "mine", None),
        ("final", None, "mine", 0), ("final", None, "mine", 1)]
    with pytest.raises(ValueError, match="variant"):
        rep.parse_order("bert/mfn")


def test_paired_statistics_match_scipy_and_hand_values():
    from scipy.stats import norm, wilcoxon
    a = [0.70, 0.72, 0.71, 0.75, 0.74, 0.73, 0.76, 0.70]
    b = [0.69, 0.70, 0.71, 0.72, 0.73, 0.70, 0.74, 0.68]
    d = [x - y for x, y in zip(a, b)]
    assert rep.signed_rank(a, b) == pytest.approx(wilcoxon(d).pvalue)
    assert math.isnan(rep.signed_rank([1.0, 2.0], [1.0, 2.0]))  # no non-zero difference
    assert rep.min_signed_rank_p(5) == pytest.approx(0.0625) and rep.min_signed_rank_p(6) < 0.05
    lo, hi = rep.bootstrap_ci(d)
    assert lo < sum(d) / len(d) < hi and (lo, hi) == rep.bootstrap_ci(d)  # fixed generator: exact rerun
    sd = float(torch.tensor(d, dtype=torch.float64).std())
    want = (norm.ppf(0.975) + norm.ppf(0.8)) * sd / math.sqrt(len(d)) / math.sqrt(3 / math.pi)
    assert rep.min_detectable_effect(sd, len(d)) == pytest.approx(want)
    assert rep.min_detectable_effect(sd, len(d), alpha=0.05 / 9) > want


def _run(m, p, seed, acc7):
    return {"model": m, "penalty": p, "seed": seed, "metrics": {k: acc7 for k in ("acc7", "acc2", "f1",
            "acc2_nonzero", "f1_nonzero", "mae", "corr", "robust_ratio")}}


def test_report_states_the_holm_family_holm_used():
    """A cell with one pair has no p-value: Holm leaves it out, and the report must say m = 1 of 2,
    not m = 2 (the size of the table)."""
    base = [0.30, 0.31, 0.32, 0.33, 0.34, 0.35]
    runs = [_run("mfn", "none", s, v) for s, v in enumerate(base)]
    runs += [_run("mfn", "wasserstein", s, v + 0.02) for s, v in enumerate(base)]
    runs += [_run("mfn", "mine", 0, base[0] + 0.01)]
    rows = rep.compare(runs, ["mfn"], ["none", "mine", "wasserstein"])
    assert rep._family_sentence(rows).startswith("m = 1 of the 2 cells here")
    runs += [_run("mfn", "mine", s, v + 0.01 * s) for s, v in enumerate(base) if s]
    assert rep._family_sentence(rep.compare(runs, ["mfn"], ["none", "mine", "wasserstein"])) == "m = 2 here"


def test_validation_vs_test_table_flags_opposite_significant_effects():
    """A penalty that lowers the validation MAE on every seed but raises the test MAE on every
    seed is flagged; a cell with one pair is left out."""
    runs = []
    for s in range(8):
        runs.append({"model": "mag", "penalty": "none", "seed": s, "metrics": {"val_mae": 0.75 + 0.01 * s, "mae": 0.84 + 0.01 * s}})
        runs.append({"model": "mag", "penalty": "wasserstein", "seed": s,
                     "metrics": {"val_mae": 0.73 + 0.011 * s, "mae": 0.90 + 0.012 * s}})
    runs.append({"model": "mag", "penalty": "mine", "seed": 0, "metrics": {"val_mae": 0.7, "mae": 0.8}})
    table = rep.validation_vs_test_table(runs, ["mag"], ["none", "mine", "wasserstein"])
    rows = [ln for ln in table.splitlines() if ln.startswith("| main |")]
    assert len(rows) == 1 and "| W | 8 |" in rows[0] and rows[0].endswith("**opposite (both p < 0.05)** |")
    assert "-0.0165" in rows[0] and "+0.0670" in rows[0]  # mean paired differences


def test_compare_pairs_by_seed_and_holm_over_the_family():
    base = [0.30, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36, 0.37]
    runs = [_run("mfn", "none", s, v) for s, v in enumerate(base)]
    runs += [_run("mfn", "wasserstein", s, v + 0.02 + 0.001 * s) for s, v in enumerate(base)]
    runs += [_run("mfn", "mine", s, v - 0.001 * (s + 1)) for s, v in enumerate(base[:5])]  # 5 seeds only
    rows = rep.compare(runs, ["mfn"], ["none", "mine", "wasserstein"])
    w = next(r for r in rows if r["penalty"] == "wasserstein")["acc7"]
    assert w["seeds"] == list(range(8)) and w["delta"] == pytest.approx(0.0235)
    assert w["p_signed"] == pytest.approx(2 / 2 ** 8) and w["p_holm"] == pytest.approx(2 * w["p_signed"])
    assert w["family"] == 2 and rep.cell_verdict(w, "acc7") == "holds"
    assert rep.cell_verdict(w, "mae") == "does not hold (significantly worse)"  # higher MAE is worse
    k = next(r for r in rows if r["penalty"] == "mine")["acc7"]
    assert k["seeds"] == [0, 1, 2, 3, 4] and rep.cell_verdict(k, "acc7") == "cannot be tested"


def test_tiny_grid_with_glove_table_order_and_previous(tmp_path):
    out, doc = tmp_path / "grid", tmp_path / "docs" / "reproduction.md"
    args = ["reproduce", "--dataset", "synthetic", "--models", "ef_lstm", "--penalties", "none,nwj",
            "--epochs", "2", "--patience", "1", "--lambdas", "0.1", "--unrolls", "1", "--critic-hiddens", "8",
            "--no-progress", "--seeds", "0,1", "--out", str(out), "--doc", str(doc),
            "--glove-models", "ef_lstm", "--glove-penalties", "none,nwj", "--drop-checkpoints",
            "--order", "glove/ef_lstm;ef_lstm"]
    assert analyze.main(args) == 0
    res = json.loads((out / "reproduce.json").read_text())
    assert len(res["runs"]) == 8 and not res["missing"] and res["planned_final_runs"] == 8
    glove = [r for r in res["runs"] if r["variant"] == "glove"]
    assert len(glove) == 4 and all(r["config"]["text_features"] == "glove" for r in glove)
    assert all("/glove/runs/" in r["run_dir"] for r in glove)
    assert not list(out.rglob("runs/*/*.pt"))  # --drop-checkpoints: the JSON results stay
    pen = [r for r in res["runs"] if r["penalty"] == "nwj"]
    assert all(r["cap_binds"] is not None and r["batches"] > 0 for r in pen)
    (c,) = res["comparisons"]
    assert c["acc7"]["seeds"] == [0, 1] and "p_signed" in c["acc7"] and len(c["acc7"]["ci"]) == 2
    # a second report compares its verdicts with the first one's
    prev = tmp_path / "prev.json"
    prev.write_text((out / "reproduce.json").read_text())
    notes = tmp_path / "notes.md"
    notes.write_text("State: __FINISHED__ of __PLANNED__ final runs.\n")
    assert analyze.main(args + ["--report-only", "--previous", str(prev), "--notes", str(notes)]) == 0
    text = doc.read_text()
    assert "State: 8 of 8 final runs." in text
    for section in ("## Each penalty minus its baseline (paired by seed)", "## What changed since the earlier report",
                    "## Second table", "## Best epochs", "## The cap on the model's term", "earlier verdict"):
        assert section in text, section


def test_selection_seed_final_run_is_the_chosen_selection_run(tmp_path, count_training):
    """The final run of a penalty at the selection seed is not trained again: the chosen
    selection run's best checkpoint reads the test split once, and gives the metrics (and
    history) a run trained from scratch with the final configuration gives, bit for bit."""
    out = tmp_path / "grid"
    assert analyze.main(TINY + ["--seeds", "0", "--out", str(out), "--doc", str(tmp_path / "r.md")]) == 0
    assert [(c.penalty, c.skip_test) for c in count_training] == [("nwj", True), ("nwj", True), ("none", False)]
    res = json.loads((out / "reproduce.json").read_text())
    (nwj,) = [r for r in res["runs"] if r["penalty"] == "nwj"]
    m = json.loads((Path(nwj["run_dir"]) / "metrics.json").read_text())
    chosen = rep._chosen_run_dir(res["selection"]["ef_lstm/nwj"])
    assert Path(m["promoted_from"]) == chosen and m["config"]["skip_test"] is False
    direct = loop.train(rep.TrainConfig(**{**m["config"], "out": str(tmp_path / "direct")}))
    for k in rep.KEYS + ("best_epoch", "best_val_mae", "epochs_run"):
        assert m[k] == direct[k], k
    assert m["history"] == direct["history"]
    assert nwj["metrics"]["robust_ratio"] >= 0  # robustness read the copied checkpoint
    # the promoted run is cached like a trained one
    count_training.clear()
    assert analyze.main(TINY + ["--seeds", "0", "--out", str(out), "--doc", str(tmp_path / "r.md")]) == 0
    assert not count_training


def test_promotion_refuses_a_different_configuration(tmp_path):
    """A selection run of another configuration (or one without its checkpoint) is not promoted."""
    from mdm_kernels.train.config import TrainConfig
    sel = tmp_path / "sel"
    cfg = TrainConfig(dataset="synthetic", model="ef_lstm", epochs=1, d=4, hidden=8, quiet=True,
                      skip_test=True, out=str(sel))
    loop.train(cfg)
    final = TrainConfig(**{**cfg.to_dict(), "skip_test": False, "out": str(tmp_path / "final")})
    other = TrainConfig(**{**final.to_dict(), "lr": 0.0005})
    assert rep.promote_selection_run(sel, other, {}) is None
    (sel / "best.pt").unlink()
    assert rep.promote_selection_run(sel, final, {}) is None
    assert not (tmp_path / "final" / "metrics.json").exists()

"""Analyses (modality drop, critic interpretability, sweep): tiny synthetic runs, 1 epoch."""
import csv
import json

import numpy as np
import pytest
import torch

from mdm_kernels.train.analysis import (drop_conditions, load_run, modality_drop, run_critic, run_sweep, summarise)
from mdm_kernels.train.analyze import main as analyze_main
from mdm_kernels.train.config import TrainConfig
from mdm_kernels.train.metrics import KEYS

TINY = dict(dataset="synthetic", epochs=1, d=8, hidden=16, critic_hidden=16, batch_size=64, device="cpu",
            backend="reference", quiet=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mdm_kernels.train.loop import train
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for pen in ("none", "mine"):
        cfg = TrainConfig(**TINY, model="lf_lstm", penalty=pen, out=str(root / pen))
        train(cfg)
        out[pen] = root / pen
    return out


def test_drop_conditions():
    c = drop_conditions()
    assert c[0] == () and len(c) == 7 and ("text", "audio") in c and ("video",) in c


def test_modality_drop_rows_and_effect(runs):
    run = load_run(runs["none"], "best")
    test = run["data"]["test"]
    rows = modality_drop(run["model"], test, stats_split=run["data"]["train"])
    assert len(rows) == 1 + 6 * 2
    assert rows[0]["condition"].startswith("none") and all(k in rows[0] for k in KEYS)
    # the intact condition equals a plain evaluation of the model
    from mdm_kernels.train.loop import predict
    from mdm_kernels.train.metrics import sentiment_metrics
    ref = sentiment_metrics(predict(run["model"], test, 64, "cpu"), test.y)
    assert rows[0]["mae"] == pytest.approx(ref["mae"], abs=1e-6)
    # zeroing every input except one changes predictions (the model reads its inputs)
    zero_text = next(r for r in rows if r["mode"] == "zero" and r["dropped"] == ["text"])
    assert zero_text["mae"] != pytest.approx(rows[0]["mae"], abs=1e-9)
    # deterministic given the seed
    again = modality_drop(run["model"], test, stats_split=run["data"]["train"])
    assert [r["mae"] for r in again] == [r["mae"] for r in rows]


def test_drop_cli_writes_markdown_and_json(runs, tmp_path, capsys):
    assert analyze_main(["drop", str(runs["none"]), str(runs["mine"]), "--out", str(tmp_path), "--modes", "zero"]) == 0
    md = (tmp_path / "modality_drop.md").read_text()
    assert "| run | mode | condition |" in md and "lf_lstm/mine/s0" in md and "-audio,-video" in md
    js = json.loads((tmp_path / "modality_drop.json").read_text())
    assert set(js["results"]) == {"lf_lstm/none/s0", "lf_lstm/mine/s0"}
    assert len(js["results"]["lf_lstm/mine/s0"]) == 7


def test_critic_export(runs, tmp_path):
    summ = run_critic(runs["mine"], tmp_path, n_shuffles=4)
    rows = list(csv.DictReader(open(tmp_path / "critic_scores.csv")))
    run = load_run(runs["mine"], "last")
    test = run["data"]["test"]
    assert len(rows) == len(test) == summ["n"]
    assert rows[0]["transcript"] == test.words[0]
    r = rows[3]
    assert float(r["dependency"]) == pytest.approx(float(r["joint_score"]) - float(r["shuffled_score_mean"]), abs=2e-5)
    assert sorted(int(r["dependency_rank"]) for r in rows) == list(range(1, len(rows) + 1))
    # joint score recomputed from the checkpoint's model + critic
    with torch.no_grad():
        from mdm_kernels.train.data import batch_from
        _, zs = run["model"](batch_from(test, np.arange(4), "cpu"))
        j = run["penalty"].critic(*zs).numpy()
    np.testing.assert_allclose([float(rows[i]["joint_score"]) for i in range(4)], j, atol=1e-4)
    png = (tmp_path / "critic_scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert 0 <= summ["frac_joint_above_shuffled"] <= 1


def test_critic_needs_penalty_run(runs, tmp_path):
    with pytest.raises(ValueError, match="need a run trained with a penalty"):
        run_critic(runs["none"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run(tmp_path / "nothing", "best")


def test_sweep_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "sw"
    args = ["sweep", "--seeds", "0,1", "--penalties", "none,js", "--models", "tfn", "--dataset", "synthetic",
            "--epochs", "1", "--device", "cpu", "--backend", "reference", "--out", str(out), "--no-progress"]
    assert analyze_main(args) == 0
    md = (out / "sweep.md").read_text()
    for name in ("Acc-7", "Acc-2", "F1", "Acc-2 (nz)", "F1 (nz)", "MAE", "Corr", "±", "| tfn | js | 2 |"):
        assert name in md
    assert "python -m mdm_kernels.train.analyze sweep" in md
    js = json.loads((out / "sweep.json").read_text())
    assert len(js["runs"]) == 4 and {r["penalty"] for r in js["runs"]} == {"none", "js"}
    assert all(set(KEYS) <= set(r["metrics"]) for r in js["runs"])
    s = {(r["model"], r["penalty"]): r for r in js["summary"]}
    maes = [r["metrics"]["mae"] for r in js["runs"] if r["penalty"] == "js"]
    assert s[("tfn", "js")]["mae"][0] == pytest.approx(np.mean(maes))
    assert s[("tfn", "js")]["mae"][1] == pytest.approx(np.std(maes, ddof=1))
    # a second call reuses finished runs (no retraining): same numbers
    first = (out / "runs" / "tfn_js_s1" / "metrics.json").stat().st_mtime_ns
    run_sweep([1], ["js"], ["tfn"], out, base=dict(dataset="synthetic", epochs=1, device="cpu", backend="reference"),
              progress=False)
    assert (out / "runs" / "tfn_js_s1" / "metrics.json").stat().st_mtime_ns == first


def test_sweep_rejects_bad_names(tmp_path):
    with pytest.raises(SystemExit):
        analyze_main(["sweep", "--penalties", "bogus", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--epochs"):
        run_sweep([0], ["none"], ["tfn"], tmp_path, base=dict(epochs=0), progress=False)


def test_summarise_single_seed_std_zero():
    runs = [{"model": "m", "penalty": "none", "seed": 0, "metrics": {k: 0.5 for k in KEYS}}]
    s = summarise(runs)[0]
    assert s["acc2"] == (0.5, 0.0) and s["n"] == 1


def test_aggregate_drop_over_seeds():
    from mdm_kernels.train.analysis import aggregate_drop, aggregate_drop_table
    mk = lambda mae: {"mode": "zero", "condition": "-text", "mae": mae, "acc2": 0.5, "corr": 0.1}
    base = lambda mae: {"mode": "-", "condition": "none (all modalities)", "mae": mae, "acc2": 0.7, "corr": 0.6}
    results = {"a": [base(1.0), mk(1.5)], "b": [base(0.9), mk(1.2)]}
    meta = {k: {"config": {"model": "tfn", "penalty": "none"}} for k in results}
    agg = aggregate_drop(results, meta)
    assert len(agg) == 1 and agg[0]["n"] == 2
    assert agg[0]["delta_mae"][0] == pytest.approx(0.4) and agg[0]["delta_mae"][1] == pytest.approx(np.std([0.5, 0.3], ddof=1))
    assert "| tfn | none | zero | -text | 2 | +0.4000" in aggregate_drop_table(agg)
    assert aggregate_drop({"a": results["a"]}, {"a": meta["a"]}) == []


def test_critic_cli_prints_a_table(runs, tmp_path, capsys):
    assert analyze_main(["critic", str(runs["mine"]), "--out", str(tmp_path), "--shuffles", "2"]) == 0
    out = capsys.readouterr().out
    summ = json.loads((tmp_path / "critic_summary.json").read_text())
    assert "{" not in out  # no raw dict
    frac = next(line for line in out.splitlines() if line.startswith("fraction joint > shuffled"))
    assert frac.split()[-1] == f"{summ['frac_joint_above_shuffled']:.4f}"
    err = next(line for line in out.splitlines() if line.startswith("Pearson(dependency, |error|)"))
    assert err.split()[-1] == f"{summ['pearson_dependency_abs_error']:.4f}"


@pytest.mark.parametrize("argv, needle", [
    (["critic", "{tmp}/nothing", "--out", "{tmp}/o"], "no checkpoint"),
    (["critic", "{none}", "--out", "{tmp}/o"], "need a run trained with a penalty"),
    (["drop", "{none}", "--out", "{tmp}/file"], "--out {tmp}/file: exists and is not a directory"),
    (["sweep", "--penalties", "bogus", "--out", "{tmp}"], "argument --penalties: unknown ['bogus']"),
    (["critic", "{none}"], "the following arguments are required: --out"),
])
def test_analyze_user_errors_are_one_line(argv, needle, runs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fill = dict(tmp=tmp_path, none=runs["none"])
    with pytest.raises(SystemExit) as e:
        analyze_main([a.format(**fill) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "usage:" not in err, err
    assert err.startswith("python -m mdm_kernels.train.analyze") and needle.format(**fill) in err


def test_analyze_debug_shows_the_traceback(runs, tmp_path):
    with pytest.raises(ValueError, match="need a run trained with a penalty"):
        analyze_main(["critic", str(runs["none"]), "--out", str(tmp_path), "--debug"])

"""The claims runner (issue 12): a tiny grid writes every key, and a re-run resumes without retraining."""
import json
import os

import claims


def test_grid_rows_cover_modes_partitions_ks_and_pdae():
    rows = claims.grid_rows()
    assert len(rows) == 9 and "stop_grad-fitted-k8" in rows and "base-uniform-k4" in rows and rows[-1] == "pdae"


def test_row_config_reads_the_row_id():
    cfg = claims.row_config("stop_grad-fitted-k8", "tiny", 3, "/tmp/x")
    assert (cfg.mode, cfg.partition, cfg.k, cfg.seed) == ("stop_grad", "fitted", 8, 3)
    pdae = claims.row_config("pdae", "tiny", 0, "/tmp/x")
    assert (pdae.k, pdae.mode) == (1, "base")


def test_answer_needs_every_factor_and_stop_grad():
    c = dict(loss_times={"a": 1, "b": 2, "c": 3})
    full = {"probe_map": dict(rho_mean=0.9, n_factors=3), "usage": dict(rho_mean=0.1, n_factors=3)}
    partial = {"probe_map": dict(rho_mean=1.0, n_factors=2)}
    assert "stop_grad-uniform-k8 (probe_map)" in claims.answer(c, {"stop_grad-uniform-k8": full})
    assert claims.answer(c, {"base-uniform-k8": full}).startswith("In no stop_grad row")
    assert claims.answer(c, {"stop_grad-uniform-k8": partial}).startswith("In no stop_grad row")


def test_tiny_grid_writes_every_key_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "claims")
    args = ["--out", out, "--preset", "tiny", "--seeds", "0", "--rows", "stop_grad-fitted-k4", "--threads", "1"]
    claims.main(args)
    result = json.load(open(os.path.join(out, "claims.json")))
    assert set(result["runs"]) == {"seed0/stop_grad-fitted-k4"}
    run = result["runs"]["seed0/stop_grad-fitted-k4"]
    for key in ("probe", "learned", "dci_d", "mse", "probe_map", "importance", "usage", "edit"):
        assert key in run, key
    assert set(run["probe"]) == set(result["loss_times"])
    md = open(os.path.join(out, "claims.md")).read()
    assert "| stop_grad-fitted-k4 |" in md and "**Answer.**" in md
    ckpt = os.path.join(out, "seed0", "stop_grad-fitted-k4", "ckpt.pt")
    mtime = os.path.getmtime(ckpt)
    capsys.readouterr()
    claims.main(args)                                            # resume: nothing left to do
    assert "0 runs to go" in capsys.readouterr().out
    assert os.path.getmtime(ckpt) == mtime

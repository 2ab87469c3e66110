"""The claims runner and its tables (issue 12): a tiny grid writes every key, and a re-run resumes without
retraining."""
import json
import os

import pytest

import claims
import claims_table
import config


def test_grid_rows_cover_modes_partitions_ks_and_the_controls():
    rows = claims_table.grid_rows()
    assert len(rows) == 10 and "stop_grad-fitted-k8" in rows and "base-uniform-k4" in rows
    assert rows[-2:] == ["pdae", "disdiff"] and claims.row_stage("disdiff") == "disdiff"


def test_row_config_reads_the_row_id():
    cfg = claims.row_config("stop_grad-fitted-k8", "tiny", 3, "/tmp/x")
    assert (cfg.mode, cfg.partition, cfg.k, cfg.seed) == ("stop_grad", "fitted", 8, 3)
    pdae = claims.row_config("pdae", "tiny", 0, "/tmp/x")
    assert (pdae.k, pdae.mode) == (1, "base")
    dis = claims.row_config("disdiff", "tiny", 2, "/tmp/x")
    assert (type(dis).__name__, dis.seed, dis.factors) == ("DisDiffConfig", 2, 4)


def test_diti_options_skip_the_disdiff_row_but_steps_reach_every_row():
    overrides = dict(diti_fields=dict(steps=7, loss_gamma=1.0, encoder_heads=True))
    assert claims.stage2_fields(claims.row_config("disdiff", "tiny", 0, ""), overrides) == dict(steps=7)
    assert claims.stage2_fields(claims.row_config("pdae", "tiny", 0, ""), overrides) == overrides["diti_fields"]


def test_stage2_batch_flag_reaches_every_row_as_a_budget_not_an_option():
    a = claims.parser().parse_args(["--batch-size", "64", "--steps", "9", "--position-embedding"])
    overrides = claims.overrides_of(a)
    assert overrides["diti_fields"] == dict(steps=9, batch_size=64, position_embedding=True)
    assert claims.stage2_fields(claims.row_config("disdiff", "tiny", 0, ""), overrides) == dict(steps=9, batch_size=64)
    assert claims_table.preset_options(dict(overrides=overrides)) == [("position_embedding", True)]
    assert claims.overrides_of(claims.parser().parse_args([])) == dict(dm=[], diti_fields={})
    with pytest.raises(config.UserError, match="--batch-size must be at least 1, got -2"):
        claims.main(["--batch-size", "-2", "--rows", "pdae", "--out", "/nonexistent/never-written"])


def test_the_ddpm_flags_are_checked_before_any_work(tmp_path):
    """A bad data option (it reaches train.py dm) is one line before the grid's folder is made."""
    assert claims.overrides_of(claims.parser().parse_args(["--texture-region", "image"]))["dm"] == ["--texture-region", "image"]
    for flags, message in ((["--texture-region", "edge"], "--texture-region must be object .* got 'edge'"),
                           (["--texture-cell", "9"], "--texture-cell must be 1"),
                           (["--fine-loss-time", "2000"], "--fine-loss-time must be 0")):
        with pytest.raises(config.UserError, match=message):
            claims.main([*flags, "--rows", "pdae", "--out", str(tmp_path / "never-written")])
    assert not (tmp_path / "never-written").exists()


def test_answer_needs_every_factor_every_seed_and_stop_grad():
    c = dict(loss_times={"a": 1, "b": 2, "c": 3})
    full = {"seeds": 2, "probe_map": dict(rho_mean=0.9, n_factors=3, rho_seeds=2),
            "usage": dict(rho_mean=0.1, n_factors=3, rho_seeds=2)}
    partial = {"seeds": 2, "probe_map": dict(rho_mean=1.0, n_factors=2, rho_seeds=2)}
    one_seed = {"seeds": 2, "probe_map": dict(rho_mean=1.0, n_factors=3, rho_seeds=1)}
    assert "stop_grad-uniform-k8 (probe_map)" in claims_table.answer(c, {"stop_grad-uniform-k8": full})
    assert claims_table.answer(c, {"base-uniform-k8": full}).startswith("In no stop_grad row")
    assert claims_table.answer(c, {"stop_grad-uniform-k8": partial}).startswith("In no stop_grad row")
    assert claims_table.answer(c, {"stop_grad-uniform-k8": one_seed}).startswith("In no stop_grad row")


def test_a_spearman_that_exists_in_one_seed_says_so():
    """A seed with < 3 learned factors has no Spearman: the mean is over the others, and the table says how many."""
    def run(seed, rho, factors):
        view = dict(rho=rho, factors=factors, spread=[1.0, 3.0] if rho is not None else [1.0, 2.0], rho_all=0.1)
        return dict(row="stop_grad-uniform-k8", seed=seed, steps=10, dm_steps=10, batch_size=2, dci_d=0.5, mse=0.1,
                    probe={}, learned=factors, **{v: view for v in claims_table.VIEWS})
    c = dict(rows=["stop_grad-uniform-k8"], loss_times={},
             runs={"seed0/x": run(0, None, ["a", "b"]), "seed1/x": run(1, -0.5, ["a", "b", "c"])})
    e = claims_table.aggregate(c)["stop_grad-uniform-k8"]
    assert (e["probe_map"]["rho"], e["probe_map"]["rho_seeds"], e["probe_map"]["n_factors"]) == ("-0.50", 1, 3)
    assert e["learned"] == {0: ["a", "b"], 1: ["a", "b", "c"]}


def test_tiny_grid_writes_every_key_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "claims")
    args = ["--out", out, "--preset", "tiny", "--seeds", "0", "--rows", "stop_grad-fitted-k4,disdiff", "--threads", "1"]
    claims.main(args)
    result = json.load(open(os.path.join(out, "claims.json")))
    assert set(result["runs"]) == {"seed0/stop_grad-fitted-k4", "seed0/disdiff"}
    for row, units in (("stop_grad-fitted-k4", 4), ("disdiff", 4)):       # DisDiff's units: its 4 factors
        run = result["runs"][f"seed0/{row}"]
        for key in ("probe", "learned", "dci_d", "mse", "probe_map", "importance", "usage", "edit"):
            assert key in run, (row, key)
        assert set(run["probe"]) == set(result["loss_times"])
        assert all(0 <= h <= units - 1 for h in run["probe_map"]["homes"] if h == h)
    assert result["runs"]["seed0/disdiff"]["batch_size"] == 8
    md = open(os.path.join(out, "claims.md")).read()
    assert "| stop_grad-fitted-k4 | 1 | 30 x 16 |" in md and "| disdiff | 1 | 20 x 8 |" in md and "**Answer.**" in md
    assert "**Scope.** 2 of the 10 grid rows, 2 runs over seeds 0;" in md and "Not run: base-uniform-k4" in md
    assert "pdae and disdiff are the controls" in md
    ckpt = os.path.join(out, "seed0", "stop_grad-fitted-k4", "ckpt.pt")
    mtime = os.path.getmtime(ckpt)
    capsys.readouterr()
    claims.main(args)                                            # resume: nothing left to do
    assert "0 runs to go" in capsys.readouterr().out
    assert os.path.getmtime(ckpt) == mtime
    claims.main(["--compare", out, "--out", str(tmp_path / "cmp")])      # the runs of several folders in one table
    table = open(tmp_path / "cmp" / "compare.md").read()
    assert "| stop_grad-fitted-k4 | 30 | 30 x 16 | 0 | - |" in table and "corner_mark (" in table
    assert "    python claims.py --out " in table                               # how to regenerate it


def test_options_beyond_the_paper_are_named_in_the_scope_line():
    c = dict(overrides=dict(dm=["--steps", "10", "--fine-loss-time", "140", "--base-channels", "32"],
                            diti_fields=dict(steps=10, loss_gamma=1.0, encoder_heads=True)))
    assert claims_table.preset_options(c) == [("loss_gamma", 1.0), ("encoder_heads", True), ("fine_loss_time", "140"),
                                      ("base_channels", "32")]
    assert claims_table.scope(dict(c, preset="tiny", runs={}), {}).endswith(". Options beyond the `tiny` preset: "
                                                                      "--loss-gamma 1.0, --encoder-heads, "
                                                                      "--fine-loss-time 140, --base-channels 32.")
    assert "Options" not in claims_table.scope(dict(preset="tiny", runs={}), {})


def test_the_image_size_reaches_the_ddpm_and_the_scope_line(tmp_path):
    overrides = claims.overrides_of(claims.parser().parse_args(["--image-size", "32"]))
    assert overrides["dm"] == ["--image-size", "32"]
    line = claims_table.scope(dict(preset="claims", runs={}, overrides=overrides), {})
    assert "; 32-px built-in data;" in line and line.endswith("Options beyond the `claims` preset: --image-size 32.")
    assert "; 16-px built-in data;" in claims_table.scope(dict(preset="claims", runs={}), {})
    for size in ("24", "8"):
        with pytest.raises(config.UserError, match=f"--image-size must be a multiple of 16 .*got {size}"):
            claims.main(["--image-size", size, "--rows", "pdae", "--out", str(tmp_path / "never-written")])
    assert not (tmp_path / "never-written").exists()


def test_compare_heads_the_table_with_the_default_datas_loss_times(tmp_path):
    def folder(name, dm_flags, loss_times):
        run = dict(row="base-uniform-k8", dm_steps=10, steps=5, seed=0, batch_size=32, learned=["a"],
                   probe={"a": 0.95, "b": 0.1})
        os.makedirs(tmp_path / name)
        json.dump(dict(overrides=dict(dm=dm_flags), loss_times=loss_times, runs={"seed0/base-uniform-k8": run},
                       commands=[f"--out {name}"]), open(tmp_path / name / "claims.json", "w"))
        return str(tmp_path / name)
    plain = folder("px16", [], {"a": 666, "b": 61})
    wide = folder("px32", ["--image-size", "32"], {"a": 762, "b": 140})      # listed last: it must not head the table
    claims_table.compare([plain, wide], str(tmp_path / "compare.md"))
    table = open(tmp_path / "compare.md").read()
    assert "| a (666) | b (61) |" in table and "(762)" not in table
    assert "--image-size has its own" in table
    assert "| --image-size 32 | 1 | 0.95 | 0.10 |" in table and "| - | 1 | 0.95 | 0.10 |" in table


def test_runs_written_by_another_process_are_kept(tmp_path):
    """Two claims.py side by side (one per seed) each read claims.json at start: neither may drop the other's runs."""
    path = str(tmp_path / "claims.json")
    claims.save_json(path, dict(runs={"seed1/pdae": {"row": "pdae"}}, seeds=[1], rows=["pdae"], commands=["b"]))
    mine = dict(runs={"seed0/pdae": {"row": "pdae"}}, seeds=[0], rows=["pdae"], commands=["a"])
    claims.merge_from_disk(path, mine)
    assert set(mine["runs"]) == {"seed0/pdae", "seed1/pdae"} and mine["seeds"] == [1, 0]
    assert mine["commands"] == ["b", "a"]


def test_a_precision_for_both_stages_is_named_once():
    c = dict(overrides=dict(dm=["--precision", "fp32"], diti_fields=dict(steps=10, precision="fp32")))
    assert claims_table.preset_options(c) == [("precision", "fp32")]


def test_the_lock_lets_one_writer_in_at_a_time(tmp_path):
    """Processes side by side merge and write claims.json under claims.locked: a second holder waits."""
    import threading
    import time
    path, events = str(tmp_path / "claims.json"), []

    def writer(name):
        with claims.locked(path):
            events.append(f"{name} in")
            time.sleep(0.2)
            events.append(f"{name} out")
    threads = [threading.Thread(target=writer, args=(n,)) for n in "ab"]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert events[0].endswith(" in") and events[1] == events[0].replace(" in", " out")    # never interleaved

"""Tests for evaluate.py, editing.py, report.py and run.py: the usage view on a decoder whose reading is known,
the map wrapper (homes + Spearman over learned factors) on a code whose homes are known, counterfactual codes,
specificity, and a smoke run of the main job at the tiny preset."""
import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import checkpoint
import config
import data
import diffusion
import editing
import evaluate
import report
import representation
import run
from diti import DiTi, uniform_partition
from unet import UNet, UNetConfig


pytestmark = pytest.mark.usefixtures("one_thread")     # the fixture lives in conftest.py


# ----------------------------------------------------------------------------- usage: a decoder that reads subset j

class ZeroKnowledgeUNet:
    """eps_theta(x_t, t) = x_t / sqrt(1 - abar_t), the noise prediction of a model that takes x_0 = 0, so
    eps - eps_theta = -sqrt(SNR_t) x_0. Features: (h = x_t, skips, emb = t)."""

    def __init__(self, sched):
        self.sched = sched

    def encode(self, x, t):
        return x, [x], t

    def decode(self, feats):
        x, _, t = feats
        return x / (1 - diffusion.at(self.sched.abar, t, x)).sqrt()

    def eps_from(self, feats, x, t):          # what unet.eps_and_shift and editing call (UNet.eps_from)
        return self.decode(feats)


class ReadsOneSubset(nn.Module):
    """G that reads only dims `dims` of the condition: it takes their mean as the image's constant colour v and
    returns the exact correction, shift_t G = -sqrt(SNR_t) v, so the loss is 0 when v is the target's colour."""

    def __init__(self, sched, dims):
        super().__init__()
        self.sched, self.dims = sched, dims

    def forward(self, feats, c):
        x, _, t = feats
        shift = diffusion.shift_coef(self.sched, t)
        coef = torch.where(shift == 0, torch.zeros_like(shift), -self.sched.snr[t].sqrt() / shift)
        return (coef * c[:, self.dims].mean(1)).view(-1, 1, 1, 1).expand_as(x)


def test_usage_home_is_the_only_subset_the_decoder_reads():
    sched, part, j = diffusion.linear_schedule(), uniform_partition(8, 4), 2
    units, t_ranges = representation.subsets(part)
    model = SimpleNamespace(partition=part, decoder=ReadsOneSubset(sched, units[j]))
    encode = lambda x: x.mean((1, 2, 3))[:, None].repeat(1, 8)        # every subset holds the colour
    rep = representation.Representation("fake", encode, units, t_ranges,
                                  editing.diti_decoder(model, ZeroKnowledgeUNet(sched), sched))
    gen = torch.Generator().manual_seed(0)
    colours = lambda: (torch.rand(12, generator=gen) * 2 - 1).view(12, 1, 1, 1).expand(12, 3, 4, 4)
    pairs = [(colours(), colours()) for _ in range(3)]                # 3 factors, 4 t ranges x 3 pairs

    grid = editing.decoder_usage(rep, pairs)                          # (F, R, U)
    usage = grid.sum(1)
    np.testing.assert_array_equal(evaluate.metrics.home(usage), [j, j, j])
    assert (usage[:, j] > 0).all() and (np.delete(usage, j, axis=1) == 0).all()
    assert (grid[:, :j] == 0).all()                                    # t ranges before j mask subset j off


# ----------------------------------------------------------------------------- maps: homes, Spearman over learned

@pytest.fixture
def known_homes_data():
    """Factors 0-3 written into units 0-3 (one-hot + noise), loss times rising with the unit; factor 4 is not in
    the code at all (never learned) and has the earliest loss time, so it would wreck an all-factor Spearman."""
    rng = np.random.default_rng(0)
    n_train, n_test, n_values = 600, 300, [3, 3, 3, 3, 2]
    labels = np.stack([rng.integers(0, v, n_train + n_test) for v in n_values], axis=1)
    code = rng.normal(scale=0.2, size=(n_train + n_test, 15))
    for f in range(4):
        code[:, 3 * f:3 * f + 3] += 2.0 * np.eye(3)[labels[:, f]]
    names = ["a", "b", "c", "d", "unlearned"]
    split = lambda s: data.Dataset(np.zeros((len(labels[s]), 1, 1, 3), np.uint8), labels[s], names, n_values,
                                   "multiclass")
    ev = evaluate.EvalData(split(slice(0, n_train)), split(slice(n_train, None)),
                           loss_times=np.array([200, 400, 600, 800, 50]))
    units = [np.arange(3 * u, 3 * u + 3) for u in range(5)]
    return code[:n_train], code[n_train:], units, ev


def test_map_homes_follow_loss_times_over_learned_factors(known_homes_data, tmp_path):
    z_train, z_test, units, ev = known_homes_data
    cfg = config.eval_config("tiny", probe_epochs=30, unit_probe_epochs=3, sparse_steps=100)
    probe = evaluate.attribute_probe(z_train, z_test, ev, cfg)
    learned = probe["rescaled"] >= cfg.learned
    np.testing.assert_array_equal(learned, [True, True, True, True, False])

    probe_map, importance = evaluate.probe_views(z_train, z_test, units, ev, cfg, learned, str(tmp_path / "m"))
    for view in (probe_map, importance):
        np.testing.assert_allclose(view["homes"][:4], [0, 1, 2, 3], atol=0.3)
        assert view["ordering"]["learned"]["rho"] == pytest.approx(1.0)
        assert view["ordering"]["learned"]["factors"] == ["a", "b", "c", "d"]
        assert view["ordering"]["learned"]["spread"][0] < 0.3 and view["ordering"]["learned"]["spread"][1] > 2.7
        assert os.path.isfile(view["png"])


def test_few_shot_verdict_calls_a_difference_only_beyond_two_standard_errors():
    # sd 0.01 over 10 draws each: se = sqrt(2e-4 / 10) = 0.00447, so the bar is 0.0089
    assert report.few_shot_verdict(0.500, 0.01, 0.505, 0.01, 10).startswith("matched")
    assert report.few_shot_verdict(0.500, 0.01, 0.491, 0.01, 10) == "fell behind"
    assert report.few_shot_verdict(0.500, 0.01, 0.510, 0.01, 10) == "beat"
    assert report.few_shot_verdict(0.500, 0.0, 0.501, 0.0, 10) == "beat"


def test_ordering_needs_three_factors_and_reports_what_it_covers():
    o = evaluate.ordering([0.0, 1.0, np.nan, 2.0], [100, 300, 500, 700], [True, True, True, False], list("wxyz"))
    assert o["learned"]["rho"] is not None and np.isnan(o["learned"]["rho"])     # only w, x: too few
    assert o["learned"]["factors"] == ["w", "x"]
    assert o["all"]["rho"] == pytest.approx(1.0) and o["all"]["factors"] == ["w", "x", "z"]
    assert o["all"]["spread"] == [0.0, 2.0]


# ----------------------------------------------------------------------------- counterfactuals and specificity

def test_interpolated_codes_start_at_z1_and_end_with_z2_on_the_chosen_dims():
    z1, z2 = torch.randn(3, 8), torch.randn(3, 8)
    codes = editing.interpolate_codes(z1, z2, [2, 3], [0.0, 0.5, 1.0])
    assert codes.shape == (3, 3, 8)
    torch.testing.assert_close(codes[0], z1)
    torch.testing.assert_close(codes[2][:, [2, 3]], z2[:, [2, 3]])
    torch.testing.assert_close(codes[2][:, [0, 1, 4, 5, 6, 7]], z1[:, [0, 1, 4, 5, 6, 7]])
    torch.testing.assert_close(codes[1][:, 2], (z1[:, 2] + z2[:, 2]) / 2)


def test_counterfactual_decodes_one_image_per_alpha_and_pair():
    cfg = UNetConfig(image_size=16, base_channels=8, channel_mult=(1,), attn_resolutions=())
    model, unet = DiTi(cfg, uniform_partition(8, 4)).eval(), UNet(cfg).eval()
    decoder = editing.diti_decoder(model, unet, diffusion.linear_schedule())
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode(x0)
    x_T = editing.invert(decoder, z, x0, steps=2)
    images, codes = editing.counterfactual(decoder, z[:2], x_T[:2], z[2:], x_T[2:], np.arange(0, 4),
                                           np.linspace(0, 1, 3), steps=2, use_slerp=True)
    assert images.shape == (3, 2, 3, 16, 16) and codes.shape == (3, 2, 8)
    torch.testing.assert_close(codes[0], z[:2])


def test_slerp_ends_are_the_inputs():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(editing.slerp(a, b, 0.0), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(editing.slerp(a, b, 1.0), b, atol=1e-5, rtol=1e-5)


def test_granularity_group_is_the_unit_whose_t_range_holds_t_f():
    t_ranges = [(0, 249), (250, 499), (500, 749), (750, 999)]
    np.testing.assert_array_equal(editing.granularity_groups([90, 250, 600, 1000], t_ranges), [0, 1, 2, 3])


def test_specificity_of_perfectly_specific_edits_is_one():
    # factor f is in group f and only editing unit f changes it
    result = editing.specificity(np.eye(3), [0, 1, 2], editing.unit_ranges(3))
    assert (result["own"], result["other"], result["specificity"]) == (1.0, 0.0, 1.0)


# ----------------------------------------------------------------------------- the main job

def test_main_job_smoke_writes_every_key_for_all_four_methods(tmp_path, monkeypatch):
    # the tiny preset with fewer steps, so the test stays near a minute on a busy 2-core CPU
    tiny = config.PRESETS["tiny"]
    monkeypatch.setitem(config.PRESETS, "tiny", dict(dm=dict(tiny["dm"], steps=6, ckpt_every=3),
                                                    diti=dict(tiny["diti"], steps=6, ckpt_every=3),
                                                    disdiff=dict(tiny["disdiff"], steps=6, ckpt_every=3)))
    out = str(tmp_path / "smoke")
    report_md = run.main(["--preset", "tiny", "--out", out, "--device", "cpu"])

    result = json.load(open(os.path.join(out, "report.json")))
    assert set(result["methods"]) == {"diti", "diti_stop_grad", "pdae", "disdiff"}
    keys = {"info", "units", "t_ranges", "probe", "probe_map", "importance", "usage", "edit", "dci", "dci_pca",
            "mig", "few_shot", "reconstruction", "specificity", "counterfactual", "manipulation", "timings"}
    for name, method in result["methods"].items():
        assert set(method) == keys, name
        for view in ("probe_map", "importance", "usage", "edit"):
            assert {"matrix", "homes", "ordering", "png"} <= set(method[view])
            assert set(method[view]["ordering"]["learned"]) == {"rho", "factors", "spread"}
        assert os.path.isfile(os.path.join(out, method["reconstruction"]["png"]))
    assert len(result["methods"]["pdae"]["units"]) == len(result["methods"]["diti"]["units"]) == 4
    text = open(report_md).read()
    assert "ordering" in text and all(name in text for name in result["methods"])
    assert os.path.isfile(os.path.join(out, result["data"]["tv_curves_png"]))
    dm_cfg, stage2 = run.stage_configs("tiny", out, "cpu")                  # a rerun would reuse every stage
    assert run.stage_state(dm_cfg, "dm") == "finished"
    assert all(run.stage_state(cfg, "disdiff" if name == "disdiff" else "diti") == "finished"
               for name, cfg in stage2.items())


def test_stage_state_resumes_an_unfinished_checkpoint_and_refuses_other_settings(tmp_path):
    dm_cfg, _ = run.stage_configs("tiny", str(tmp_path), "cpu")
    assert run.stage_state(dm_cfg, "dm") == "new"
    path = os.path.join(dm_cfg.out, "ckpt.pt")
    checkpoint.save_checkpoint(path, dict(kind="dm", step=dm_cfg.steps - 1, config=dataclasses.asdict(dm_cfg)))
    assert run.stage_state(dm_cfg, "dm") == "unfinished"
    checkpoint.save_checkpoint(path, dict(kind="dm", step=dm_cfg.steps, config=dataclasses.asdict(dm_cfg)))
    assert run.stage_state(dm_cfg, "dm") == "finished"
    with pytest.raises(config.UserError, match="base_channels"):
        run.stage_state(dataclasses.replace(dm_cfg, base_channels=64), "dm")


def test_every_training_preset_has_eval_sizes_and_flags_override_them():
    assert all(config.eval_config(p) for p in config.PRESETS)
    with pytest.raises(config.UserError, match="unknown preset 'nope'"):
        config.eval_config("nope")
    args = SimpleNamespace(**{f.name: None for f in dataclasses.fields(config.EvalConfig)})
    args.manip_scales, args.usage_pairs = "0,0.5,1", "8"
    assert evaluate.parse_overrides(args) == dict(manip_scales=(0.0, 0.5, 1.0), usage_pairs=8)

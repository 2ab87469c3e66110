"""gains.py: what the DiTi loss pays for each factor under the exact denoiser (beyond the paper; issue 12)."""
import json

import numpy as np
import pytest
import torch

import diffusion
import gains
import synthetic


def test_exact_term_is_the_exact_denoisers_weighted_eps_error_and_knowing_every_factor_earns_all_of_it():
    """At 8 px: the `exact` term equals weight_t E||eps - E[eps | x_t]||^2 from synthetic.ExactDenoiser (a separate
    implementation) on the same x_t; conditioning on all factors (the image itself) removes exactly that much;
    one factor removes less; and at t = 3, where x_t still shows every factor, nothing is left to earn."""
    gen = synthetic.Synthetic(8, 0)
    every = tuple(range(len(gen.factor_names)))
    times = (3, 150, 600)
    r = gains.factor_gains(gen, n=16, times=times, seed=1, chunk=8, groups=[every, (0,), (8,)])
    labels = synthetic.all_labels(gen)
    pick = np.random.default_rng(1).choice(len(labels), 16, replace=False)
    x0 = torch.from_numpy(gen.render(labels[pick]).transpose(0, 3, 1, 2)).float() / 127.5 - 1
    denoiser, sched = synthetic.ExactDenoiser(torch.nn.Identity(), gen), diffusion.linear_schedule()
    for j, t in enumerate(times):
        eps = torch.randn(16, x0[0].numel(), generator=torch.Generator().manual_seed(t)).double()
        abar = sched.abar[t].double()
        x_t = (abar.sqrt() * x0.flatten(1).double() + (1 - abar).sqrt() * eps).float().view_as(x0)
        err = (eps.float() - denoiser(x_t, torch.full((16,), t)).flatten(1)).pow(2).sum(1).mean()
        want = diffusion.pdae_weight(sched, torch.tensor([t])).item() * err.item()
        assert abs(r["exact"][j] - want) <= 0.02 * want + 1e-4, (t, r["exact"][j], want)
        assert abs(r["gain"][0, j] - r["exact"][j]) <= 1e-3 * r["exact"][j] + 1e-6
        assert r["gain"][1, j] <= r["exact"][j] + 1e-6 and r["gain"][2, j] <= r["exact"][j] + 1e-6
    assert r["exact"][0] < 1e-3 and r["gain"][1:, 0].max() < 1e-3
    assert r["gain"][1, 2] > r["gain"][2, 2]        # at t = 600 the background (t_f 666) earns more than the texture


def test_gains_table_lists_every_factor_coarse_first_with_its_share():
    gen = synthetic.Synthetic(8, 0)
    F = len(gen.factor_names)
    result = dict(t=[0, 50, 100], exact=np.array([0.0, 1.0, 2.0]), gain=np.tile([0.0, 0.5, 0.25], (F, 1)))
    loss_times = list(range(100, 100 + 10 * F, 10))
    table = gains.gains_table(gen, result, loss_times, shown=(50, 100))
    rows = table.splitlines()[2:-3]
    assert [r.split(" (")[0].strip("| ") for r in rows] == gen.factor_names[::-1]
    # gain 0.5 at t = 50 and 0.25 at t = 100: peak 50, mean t (0.5 * 50 + 0.25 * 100) / 0.75 = 66.7, share 0.25 / 1
    assert rows[0].endswith("| 50 | 67 | 25.00 % |") and "| 0.5000 | 0.2500 |" in rows[0]
    assert table.splitlines()[-1].startswith(f"Spearman(mean t, t_f) over all {F} factors:")


def test_command_line_prints_the_table(capsys):
    gains.main(["--size", "8", "--n", "4"])
    out = capsys.readouterr().out
    assert "| background (" in out and "| exact (knowing x0) |" in out and out.count("\n|") == 13
    assert "Spearman(mean t, t_f) over all 10 factors" in out


# ----------------------------------------------------------------------------- the oracle decoder (gains.py --oracle)

def test_one_hot_labels_zeroes_the_blocks_of_unknown_factors():
    gen = synthetic.Synthetic(8, 0)                                   # blocks of 4, 5, 5, 3, 4, 6, 2, 2, 2, 2 values
    labels = torch.tensor([[3, 0, 4, 2, 1, 5, 1, 0, 1, 1]])
    known = torch.ones(1, 10, dtype=torch.bool)
    known[0, 1] = known[0, 5] = False
    z = gains.one_hot_labels(gen, labels, known)[0]
    assert z.shape == (35,)
    assert z.nonzero().flatten().tolist() == [3, 4 + 5 + 4, 14 + 2, 17 + 1, 27 + 1, 29 + 0, 31 + 1, 33 + 1]


class ReadsOneFactor(torch.nn.Module):
    """G = (z's value in factor f's first one-hot slot) x a fixed image: only f's block moves the loss."""

    def __init__(self, start):
        super().__init__()
        self.start, self.image = start, torch.randn(1, 3, 8, 8)

    def forward(self, feats, z):
        return z[:, self.start].view(-1, 1, 1, 1) * self.image


class NoisyZeroUNet:
    """eps_theta = 0 whatever x_t; features ignored by ReadsOneFactor."""

    def encode(self, x, t):
        return None

    def eps_from(self, feats, x, t):
        return torch.zeros_like(x)


def test_realised_gains_are_zero_for_a_decoder_that_ignores_z_and_land_on_the_factor_it_reads():
    gen, sched = synthetic.Synthetic(8, 0), diffusion.linear_schedule()
    labels, images = synthetic.all_images(gen)
    X, lab = torch.from_numpy(images).float().view(-1, 3, 8, 8) / 127.5 - 1, torch.from_numpy(labels)
    ignores = lambda feats, z: torch.zeros(z.shape[0], 3, 8, 8)       # noqa: E731
    assert np.abs(gains.realised_gains(NoisyZeroUNet(), ignores, sched, gen, X, lab, n=32, times=(100,))).max() == 0
    hue = gen.factor_names.index("hue")                                  # its block starts after 4 + 5 + 5 + 3 + 4
    r = gains.realised_gains(NoisyZeroUNet(), ReadsOneFactor(21), sched, gen, X, lab, n=64, times=(100, 500))
    assert np.count_nonzero(r) == 2 and np.all(r[hue] != 0)


def test_oracle_trains_resumes_and_writes_its_tables(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("DITI_CACHE", str(tmp_path / "cache"))
    import train
    dm = tmp_path / "dm"
    train.main(["dm", "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--n-train", "32", "--image-size", "8",
                "--sample-steps", "1", "--out", str(dm)])
    out = tmp_path / "oracle"
    args = ["--oracle", str(dm / "ckpt.pt"), "--out", str(out), "--n", "4", "--oracle-n", "8", "--oracle-evals", "2"]
    gains.main(args + ["--oracle-steps", "3"])
    first = json.loads((out / "oracle.json").read_text())
    assert sorted(first["realised"]) == ["2", "3"] and np.asarray(first["realised"]["3"]).shape == (10, 10)
    md = (out / "oracle.md").read_text()
    assert md.count("| texture (") == 2 and "After 3 steps:" in md and (out / "oracle.png").stat().st_size > 0
    gains.train_oracle(str(dm / "ckpt.pt"), 5, str(out), evals={2}, n_eval=8)          # resumes at step 3
    second = json.loads((out / "oracle.json").read_text())
    assert sorted(second["realised"]) == ["2", "3", "5"] and second["realised"]["3"] == first["realised"]["3"]
    assert torch.load(out / "oracle.pt", weights_only=True)["step"] == 5
    whole = tmp_path / "whole"                                             # resume is exact: 0 -> 5 in one go
    uninterrupted = gains.train_oracle(str(dm / "ckpt.pt"), 5, str(whole), evals={2}, n_eval=8)[1]
    assert uninterrupted == {k: second["realised"][k] for k in ("2", "5")}
    with pytest.raises(SystemExit, match="was trained with --gamma 0.1: pass that"):
        gains.main(args + ["--oracle-steps", "6", "--gamma", "1"])
    with pytest.raises(SystemExit, match="was trained without --position-embedding"):
        gains.main(args + ["--oracle-steps", "6", "--position-embedding"])
    positioned = tmp_path / "positioned"                                    # G with the learned position map
    gains.main(["--oracle", str(dm / "ckpt.pt"), "--out", str(positioned), "--n", "4", "--oracle-n", "8",
                "--oracle-steps", "2", "--position-embedding"])
    assert "position" in torch.load(positioned / "oracle.pt", weights_only=True)["decoder"]
    assert "--position-embedding" in (positioned / "oracle.md").read_text()
    with pytest.raises(SystemExit, match="was trained with --position-embedding"):
        gains.main(["--oracle", str(dm / "ckpt.pt"), "--out", str(positioned), "--oracle-steps", "3"])


def test_supervised_encoder_learns_the_background_and_its_table_lists_every_factor(tmp_path, monkeypatch,
                                                                                  one_thread):
    monkeypatch.setenv("DITI_CACHE", str(tmp_path / "cache"))
    gen, results = gains.supervised_encoder(16, steps=60, evals=(30,), n_train=512, n_test=256)
    assert sorted(results) == [30, 60]
    assert all(len(r) == len(gen.factor_names) and max(r) <= 1 for r in results.values())
    assert results[60][gen.factor_index("background")] > 0.9     # a colour: learned within 60 steps of 32
    table = gains.supervised_table(gen, results)
    assert table.splitlines()[0].startswith("| steps | images | background | x position")
    assert table.splitlines()[-1].startswith("| 60 | 1920 | ")
    with pytest.raises(SystemExit, match="--supervised-encoder must be a number of steps >= 1, got -5"):
        gains.main(["--supervised-encoder", "-5"])
    with pytest.raises(SystemExit, match="needs a --size divisible by 16 .*, got 8"):
        gains.main(["--supervised-encoder", "5", "--size", "8"])
    with pytest.raises(SystemExit, match="--supervised-evals must be steps separated by commas, .*got '500,x'"):
        gains.main(["--supervised-encoder", "5", "--supervised-evals", "500,x"])
    with pytest.raises(SystemExit, match="--oracle-evals must be steps separated by commas, .*got '2k'"):
        gains.main(["--oracle", "runs/never-read/ckpt.pt", "--oracle-evals", "2k"])


def test_stage_two_starts_from_the_supervised_encoder_holds_it_and_refuses_a_wrong_one(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("DITI_CACHE", str(tmp_path / "cache"))
    import config
    import train
    dm, sup, run = tmp_path / "dm", tmp_path / "sup", tmp_path / "run"
    train.main(["dm", "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--n-train", "32", "--image-size", "16",
                "--sample-steps", "1", "--out", str(dm)])
    gains.supervised_encoder(16, steps=2, z_dim=16, n_train=32, n_test=16, out=str(sup))
    saved = torch.load(sup / "encoder.pt", map_location="cpu", weights_only=True)["encoder"]
    stage2 = ["diti", "--preset", "tiny", "--dm", str(dm / "ckpt.pt"), "--steps", "1", "--batch-size", "4"]
    train.main(stage2 + ["--lr", "0", "--out", str(run), "--encoder-init", str(sup / "encoder.pt")])
    trained = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)["model"]   # trained on CUDA if any
    assert all(torch.equal(trained[f"encoder.{k}"], v) for k, v in saved.items())    # lr 0: E is still the init
    held = stage2 + ["--out", str(tmp_path / "held"), "--encoder-init", str(sup / "encoder.pt"),
                     "--encoder-hold", "3"]
    for steps, kept in (("3", True), ("5", False)):     # held for 3 steps, then released (a resume to 5)
        train.main(held + ["--steps", steps, "--resume"])
        trained = torch.load(tmp_path / "held" / "ckpt.pt", map_location="cpu", weights_only=True)["model"]
        assert all(torch.equal(trained[f"encoder.{k}"], v) for k, v in saved.items()) == kept
    with pytest.raises(config.UserError, match="--encoder-hold must be a number of steps >= 0"):
        train.main(held + ["--encoder-hold", "-1"])
    with pytest.raises(config.UserError, match="holds another encoder than this run's"):
        train.main(stage2 + ["--z-dim", "32", "--out", str(tmp_path / "wide"), "--encoder-init", str(sup / "encoder.pt")])
    with pytest.raises(config.UserError, match="--encoder-init nowhere.pt does not exist: write it with gains.py"):
        train.main(stage2 + ["--out", str(tmp_path / "none"), "--encoder-init", "nowhere.pt"])


def test_encoder_lr_scale_slows_e_alone_keeps_its_ratio_on_resume_and_refuses_a_changed_setup(tmp_path, monkeypatch, one_thread):
    """--encoder-lr-scale 0.001: after 3 Adam steps of lr 1e-3 E has moved by at most a few 1e-6 while G moved by
    ~1e-3; a resume with --lr 2e-3 gives E 2e-6 and G 2e-3; a run resumed with the scale switched on is refused."""
    monkeypatch.setenv("DITI_CACHE", str(tmp_path / "cache"))
    import config
    import train
    dm = tmp_path / "dm"
    train.main(["dm", "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--n-train", "32", "--image-size", "16",
                "--sample-steps", "1", "--out", str(dm)])
    stage2 = ["diti", "--preset", "tiny", "--dm", str(dm / "ckpt.pt"), "--batch-size", "4", "--lr", "1e-3"]
    train.main(stage2 + ["--steps", "1", "--lr", "0", "--out", str(tmp_path / "init")])    # lr 0: the init weights
    init = torch.load(tmp_path / "init" / "ckpt.pt", weights_only=True)["model"]
    slow = stage2 + ["--out", str(tmp_path / "slow"), "--encoder-lr-scale", "0.001"]
    train.main(slow + ["--steps", "3"])
    ckpt = torch.load(tmp_path / "slow" / "ckpt.pt", weights_only=True)
    moved = {k: (v - init[k]).abs().max().item() for k, v in ckpt["model"].items() if v.is_floating_point()}
    assert max(v for k, v in moved.items() if k.startswith("encoder.")) < 2e-5
    assert max(v for k, v in moved.items() if not k.startswith("encoder.")) > 5e-4
    train.main(slow + ["--steps", "4", "--lr", "2e-3", "--resume"])
    lrs = [g["lr"] for g in torch.load(tmp_path / "slow" / "ckpt.pt", weights_only=True)["opt"]["param_groups"]]
    assert lrs == pytest.approx([2e-6, 2e-3])
    with pytest.raises(config.UserError, match="--encoder-lr-scale must be > 0"):
        train.main(slow + ["--steps", "1", "--encoder-lr-scale", "0"])
    with pytest.raises(config.UserError, match=r"another optimiser setup .*encoder_lr_scale: 1.0 -> 0.5"):
        train.main(stage2 + ["--steps", "2", "--out", str(tmp_path / "init"), "--encoder-lr-scale", "0.5", "--resume"])

"""GitHub issue 6: exact resume after a kill, one clear line for every bad input, torchrun.

Every test runs `python train.py ...` as a subprocess, as a user would, on tiny models (16 px, 8 channels,
batch 8) with one thread each, on the CPU even where there is a GPU (CUDA hidden from the subprocesses): exact
resume and the torchrun match are claims about the CPU (gloo), and on an H200 a 15-step run had written its last
checkpoint before the kill landed. A bad input must give exit code 2, one line `error: <what is wrong, which
file, what to do>` on stderr, no traceback, and leave any existing checkpoint byte for byte as it was.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
DM = ["--preset", "tiny", "--image-size", "16", "--n-train", "64", "--base-channels", "8", "--batch-size", "8",
      "--sample-steps", "1"]
DITI = ["--preset", "tiny", "--batch-size", "8"]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """One thread per process, no GPU; the synthetic data cached once for the session."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DITI_CACHE": str(tmp_path_factory.mktemp("cache")),
            "CUDA_VISIBLE_DEVICES": ""}


def train(env, *args, timeout=120):
    return subprocess.run([sys.executable, TRAIN, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def start(env, *args):
    return subprocess.Popen([sys.executable, TRAIN, *map(str, args)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def finished(result):
    assert result.returncode == 0, result.stderr[-2000:]
    return result


SHORT = ["--steps", 2, "--precision", "fp32"]     # the shared runs, also the one-process runs torchrun must match


@pytest.fixture(scope="session")
def dm_ckpt(env, tmp_path_factory):
    """A DDPM checkpoint trained for 2 steps, shared by the tests; they must not change it."""
    out = tmp_path_factory.mktemp("dm")
    finished(train(env, "dm", *DM, *SHORT, "--out", out))
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def diti_ckpt(env, dm_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("diti")
    finished(train(env, "diti", *DITI, "--dm", dm_ckpt, *SHORT, "--out", out))
    return out / "ckpt.pt"


def snapshot(path):
    return Path(path).read_bytes(), os.stat(path).st_mtime_ns


def assert_user_error(result, *fragments):
    """Exit code 2, no traceback, and stderr's last line is `error: ...` holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert sum(line.startswith("error: ") for line in lines) == 1
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def losses(out):
    return [row["loss"] for row in json.loads((Path(out) / "log.json").read_text())]


def weights(out, key="model"):
    return torch.load(Path(out) / "ckpt.pt", weights_only=True)[key]


def checkpoint_step(path):
    try:
        return torch.load(path, weights_only=True)["step"]
    except Exception:                     # not written yet
        return 0


def kill_after_checkpoint(proc, path, step, timeout=60):
    """SIGKILL the run once its checkpoint holds `step` or later; returns the step it held."""
    deadline = time.time() + timeout
    while checkpoint_step(path) < step:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    return checkpoint_step(path)


# ---- exact resume ---------------------------------------------------------------------------------------

def check_kill_and_resume(env, stage, args, steps, kill_at, tmp_path):
    """The uninterrupted run and the run killed then resumed log the same losses and end on the same weights."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    args = [stage, *args, "--steps", steps, "--seed", 3]
    uninterrupted = start(env, *args, "--out", whole)                  # runs alongside the killed run
    killed_at = kill_after_checkpoint(start(env, *args, "--out", broken), broken / "ckpt.pt", kill_at)
    assert kill_at <= killed_at < steps
    resumed = finished(train(env, *args, "--out", broken, "--resume"))
    assert f"resumed {broken / 'ckpt.pt'} at step {killed_at}" in resumed.stdout
    assert uninterrupted.wait(timeout=120) == 0
    assert len(losses(broken)) == steps
    assert losses(broken) == losses(whole)                              # exactly, on CPU
    for key in ("model", "ema"):
        a, b = weights(whole, key), weights(broken, key)
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_ddpm_killed_and_resumed_repeats_the_uninterrupted_losses(env, tmp_path):
    check_kill_and_resume(env, "dm", [*DM, "--ckpt-every", 3], steps=15, kill_at=6, tmp_path=tmp_path)


def test_diti_killed_and_resumed_repeats_the_uninterrupted_losses(env, dm_ckpt, tmp_path):
    check_kill_and_resume(env, "diti", [*DITI, "--dm", dm_ckpt, "--ckpt-every", 2], steps=8, kill_at=2,
                          tmp_path=tmp_path)


# ---- the loss guard -------------------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(env, dm_ckpt, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(dm_ckpt.read_bytes())          # a good run at step 2
    before = snapshot(tmp_path / "ckpt.pt")
    # --lr applies on resume; lr 1e30 throws the weights to ~1e30 at step 3, so step 4's loss overflows
    result = train(env, "dm", *DM, "--steps", 8, "--ckpt-every", 100, "--lr", 1e30, "--resume", "--out", tmp_path)
    assert_user_error(result, "the dm loss became", "at step 4", "checkpoint", "(step 2) is intact", "--resume")
    assert snapshot(tmp_path / "ckpt.pt") == before


# ---- bad input: one line, exit code 2, no traceback -----------------------------------------------------

def test_missing_data_folder(env, tmp_path):
    result = train(env, "dm", *DM, "--data", "folder", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "o")
    assert_user_error(result, str(tmp_path / "nowhere"), "does not exist")


def make_celeba(root, attributes=True, bad_line=False):
    (root / "img_align_celeba").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((218, 178, 3), 90 * i, np.uint8)).save(root / "img_align_celeba" / f"00000{i + 1}.jpg")
    if attributes:
        names = [f"Attr{i}" for i in range(40)]
        rows = [f"00000{i + 1}.jpg " + " ".join(["1"] * 40) for i in range(2)]
        if bad_line:
            rows[1] = rows[1].replace(" 1", " 2", 1)
        (root / "list_attr_celeba.txt").write_text("\n".join(["2", " ".join(names), *rows]) + "\n")
    return root


def test_celeba_folder_without_attribute_file(env, tmp_path):
    root = make_celeba(tmp_path / "celeba", attributes=False)
    result = train(env, "dm", *DM, "--data", "celeba", "--data-dir", root, "--out", tmp_path / "o")
    assert_user_error(result, "list_attr_celeba.txt", str(root), "download")


def test_malformed_attribute_line(env, tmp_path):
    root = make_celeba(tmp_path / "celeba", bad_line=True)
    result = train(env, "dm", *DM, "--data", "celeba", "--data-dir", root, "--out", tmp_path / "o")
    assert_user_error(result, str(root / "list_attr_celeba.txt"), "line 4", "-1/1")


def test_corrupt_jpeg_is_skipped_with_a_one_line_warning_and_the_run_proceeds(env, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "broken.jpg")
    (folder / "broken.jpg").write_bytes((folder / "broken.jpg").read_bytes()[:300])
    result = finished(train(env, "dm", *DM, "--data", "folder", "--data-dir", folder, "--steps", 1,
                            "--out", tmp_path / "o"))
    assert "warning: skipped 1 corrupt or truncated image(s), e.g. " + str(folder / "broken.jpg") in result.stderr
    assert "4 images" in result.stdout and "Traceback" not in result.stderr
    assert (tmp_path / "o" / "ckpt.pt").exists()


def test_image_folder_without_images(env, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no pictures here")
    result = train(env, "dm", *DM, "--data", "folder", "--data-dir", tmp_path / "images", "--out", tmp_path / "o")
    assert_user_error(result, str(tmp_path / "images"), "has no jpg/jpeg/png/webp files")


def test_resuming_stage_2_against_a_ddpm_with_another_unet(env, dm_ckpt, diti_ckpt, tmp_path):
    ck = torch.load(dm_ckpt, weights_only=True)                    # a DDPM of another width, never trained
    sys.path.insert(0, str(ROOT))
    from unet import UNet, UNetConfig
    cfg = UNetConfig(**{**ck["unet"], "base_channels": 16, "channel_mult": tuple(ck["unet"]["channel_mult"]),
                        "attn_resolutions": tuple(ck["unet"]["attn_resolutions"])})
    ck["unet"], ck["model"] = dict(cfg.__dict__), UNet(cfg).state_dict()
    ck["ema"] = ck["model"]
    torch.save(ck, tmp_path / "other_dm.pt")
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(diti_ckpt.read_bytes())
    before = snapshot(out / "ckpt.pt")
    result = train(env, "diti", *DITI, "--dm", tmp_path / "other_dm.pt", "--steps", 2, "--resume", "--out", out)
    assert_user_error(result, str(out / "ckpt.pt"), str(dm_ckpt), "base_channels: 8 -> 16",
                      "pass the --dm it was trained with")
    assert snapshot(out / "ckpt.pt") == before


def test_stage_2_checkpoint_given_as_the_ddpm(env, diti_ckpt, tmp_path):
    before = snapshot(diti_ckpt)
    result = train(env, "diti", *DITI, "--dm", diti_ckpt, "--out", tmp_path / "o")
    assert_user_error(result, str(diti_ckpt), "is a 'diti' checkpoint but a 'dm' one is needed",
                      "--dm takes the DDPM checkpoint")
    assert snapshot(diti_ckpt) == before


def test_truncated_checkpoint(env, dm_ckpt, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(dm_ckpt.read_bytes()[:5000])
    before = snapshot(out / "ckpt.pt")
    result = train(env, "dm", *DM, "--resume", "--out", out)
    assert_user_error(result, str(out / "ckpt.pt"), "cannot be read", "truncated")
    assert snapshot(out / "ckpt.pt") == before


def test_existing_run_needs_resume(env, dm_ckpt, tmp_path):
    before = snapshot(dm_ckpt)
    result = train(env, "dm", *DM, "--out", dm_ckpt.parent)
    assert_user_error(result, str(dm_ckpt), "exists: pass --resume")
    assert snapshot(dm_ckpt) == before


def test_unknown_preset(env, tmp_path):
    assert_user_error(train(env, "dm", "--preset", "huge"), "unknown preset 'huge'", "tiny")


def test_flag_value_of_the_wrong_type(env, tmp_path):
    assert_user_error(train(env, "dm", *DM, "--steps", "ten"), "--steps 'ten' is not a valid int")


def test_unknown_flag_is_one_line_not_a_usage_block(env, tmp_path):
    result = train(env, "dm", *DM, "--stepz", 5)
    assert_user_error(result, "unrecognized arguments: --stepz 5", "train.py dm --help")
    assert len(result.stderr.strip().splitlines()) == 1


def test_k_larger_than_the_latent(env, dm_ckpt, tmp_path):
    before = snapshot(dm_ckpt)
    result = train(env, "diti", *DITI, "--dm", dm_ckpt, "--k", 32, "--z-dim", 16, "--out", tmp_path / "o")
    assert_user_error(result, "k=32", "d=16", "choose 1 <= k <= d")
    assert snapshot(dm_ckpt) == before


def test_stage_dims_not_summing_to_the_latent(env, dm_ckpt, tmp_path):
    result = train(env, "diti", *DITI, "--dm", dm_ckpt, "--partition", "staged", "--k", 5, "--z-dim", 16,
                   "--stage-dims", "1,2,3,4,5", "--out", tmp_path / "o")
    assert_user_error(result, "sum to 15, not the latent size d=16")


def test_cuda_asked_for_where_there_is_none(env, tmp_path):
    assert_user_error(train(env, "dm", *DM, "--device", "cuda", "--out", tmp_path / "o"), "no CUDA GPU",
                      "--device cpu")


# ---- torchrun -------------------------------------------------------------------------------------------

def torchrun(env, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           TRAIN, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("stage", ["dm", "diti"])
def test_two_processes_match_one_at_the_same_global_batch(env, dm_ckpt, diti_ckpt, stage, tmp_path):
    """Rank r takes rows r, r + 2, ... of the global batch, with those rows' t and eps; the gradients are
    averaged over the ranks. So 2 gloo processes train as 1 does, up to float rounding (fp32 here).
    The one-process runs are the shared checkpoints, trained with the same flags."""
    one = (dm_ckpt if stage == "dm" else diti_ckpt).parent
    args = [*DM] if stage == "dm" else [*DITI, "--dm", dm_ckpt]
    result = torchrun(env, stage, *args, *SHORT, "--out", tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (result.stdout + result.stderr).count("parameters, ") == 1   # rank 0 alone prints
    assert np.allclose(losses(tmp_path), losses(one), rtol=1e-4, atol=0)
    for key in ("model", "ema"):
        a, b = weights(one, key), weights(tmp_path, key)
        assert max((a[name] - b[name]).abs().max().item() for name in a) < 1e-5
    assert len(torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"]) == 2


def test_encoder_grid_option_is_saved_and_rebuilt_on_load(env, dm_ckpt, tmp_path):
    """--encoder-grid (beyond the paper) travels in the checkpoint: load_diti rebuilds the same encoder."""
    import train as train_module
    finished(train(env, "diti", *DITI, "--dm", dm_ckpt, *SHORT, "--encoder-grid", 2, "--out", tmp_path))
    model, _, ckpt = train_module.load_diti(str(tmp_path / "ckpt.pt"))
    assert ckpt["config"]["encoder_grid"] == 2 and model.encoder.net[-1].in_features == 128 * 2 * 2


def test_encoder_heads_option_is_saved_and_rebuilt_on_load(env, dm_ckpt, tmp_path):
    """--encoder-heads (beyond the paper) travels in the checkpoint: load_diti rebuilds one head per subset."""
    import train as train_module
    finished(train(env, "diti", *DITI, "--dm", dm_ckpt, *SHORT, "--encoder-heads", "true", "--out", tmp_path))
    model, _, ckpt = train_module.load_diti(str(tmp_path / "ckpt.pt"))
    assert ckpt["config"]["encoder_heads"] is True and len(model.encoder.heads) == model.partition.k


def test_loss_gamma_is_saved_and_checked(env, dm_ckpt, tmp_path):
    """--loss-gamma (beyond the paper) travels in the checkpoint; a gamma outside [0, 1] is refused before any work."""
    import train as train_module
    finished(train(env, "diti", *DITI, "--dm", dm_ckpt, *SHORT, "--loss-gamma", 1, "--out", tmp_path))
    assert train_module.load_diti(str(tmp_path / "ckpt.pt"))[2]["config"]["loss_gamma"] == 1.0
    assert_user_error(train(env, "diti", *DITI, "--dm", dm_ckpt, "--loss-gamma", 2), "--loss-gamma must lie in [0, 1]")


def test_t_max_draws_every_stage2_time_step_below_it(env, dm_ckpt, tmp_path):
    """--t-max (beyond the paper, a diagnostic) trains only on t < t_max: the checkpoint's loss-by-t histogram
    (20 buckets of 50 steps, decayed counts) has rows in buckets 0 and 1 and nowhere else for --t-max 100;
    1001 is refused before any work."""
    finished(train(env, "diti", *DITI, "--dm", dm_ckpt, "--steps", 6, "--precision", "fp32", "--t-max", 100,
                   "--out", tmp_path))
    counts = torch.load(tmp_path / "ckpt.pt", weights_only=False)["hist"][1]
    assert (counts[:2] > 0).all() and counts[2:].sum() == 0
    assert_user_error(train(env, "diti", *DITI, "--dm", dm_ckpt, "--t-max", 1001), "--t-max must be 0")


def test_exact_eps_option_trains_and_loads_with_the_exact_denoiser(env, dm_ckpt, tmp_path):
    """--exact-eps (beyond the paper) trains stage 2 on the data's exact E[eps | x_t] and load_diti rebuilds it;
    a DDPM of other data is refused with the fix named."""
    import synthetic
    import train as train_module
    finished(train(env, "diti", *DITI, "--dm", dm_ckpt, *SHORT, "--exact-eps", "true", "--out", tmp_path))
    _, unet, ckpt = train_module.load_diti(str(tmp_path / "ckpt.pt"))
    assert ckpt["config"]["exact_eps"] is True and isinstance(unet, synthetic.ExactDenoiser)
    with pytest.raises(train_module.UserError, match="--exact-eps needs the built-in data"):
        train_module.frozen_eps(unet.unet, dict(data="folder"), exact=True)
    spread = {**ckpt["dm_config"], "texture_region": "image"}          # the texture on the stripe's and mark's pixels
    with pytest.raises(train_module.UserError, match="--exact-eps cannot use this DDPM's data .*--texture-region object"):
        train_module.frozen_eps(unet.unet, spread, exact=True)
    # claims.py --eps-errors: nothing beats the exact denoiser, which at t = 10 knows the image; this run's own
    # eps is the exact one (its shift is still near 0), the 2-step DDPM's is far off
    import gains
    errors = gains.eps_errors(str(tmp_path / "ckpt.pt"), n=16, times=(10, 300))
    assert all(e <= d for e, d in zip(errors["exact"], errors["DDPM"])) and errors["exact"][0] < 0.01
    assert errors["DiTi"][0] < 1 < errors["DDPM"][0]


def test_stage_two_refuses_a_ddpm_whose_size_the_encoder_cannot_take(env, tmp_path):
    """E halves the image four times: a 24-px DDPM (a size the U-Net takes) is refused by DiTi and DisDiff."""
    dm = tmp_path / "dm24"
    finished(train(env, "dm", *DM, *SHORT, "--image-size", 24, "--out", dm))
    for stage in ("diti", "disdiff"):
        result = train(env, stage, *DITI, "--dm", dm / "ckpt.pt", "--steps", 1, "--out", tmp_path / stage)
        assert_user_error(result, f"{dm / 'ckpt.pt'} was trained at 24 px", "divisible by 16",
                          "--image-size 16 or 32")
        assert not (tmp_path / stage / "ckpt.pt").exists()


def test_ddpm_resumed_on_other_data_is_refused(env, dm_ckpt, tmp_path):
    """--fine-loss-time, --texture-cell and --texture-region change the data: a DDPM trained without them is not continued with
    them (nor reused by claims.py), and values out of range are refused before any work."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(dm_ckpt.read_bytes())
    before = snapshot(out / "ckpt.pt")
    result = train(env, "dm", *DM, "--fine-loss-time", 140, "--resume", "--out", out)
    assert_user_error(result, str(out / "ckpt.pt"), "trained on other data", "fine_loss_time: 0 -> 140")
    assert snapshot(out / "ckpt.pt") == before
    assert_user_error(train(env, "dm", *DM, "--fine-loss-time", 1000), "--fine-loss-time must be 0 (off)")
    result = train(env, "dm", *DM, "--texture-cell", 2, "--resume", "--out", out)
    assert_user_error(result, str(out / "ckpt.pt"), "trained on other data", "texture_cell: 1 -> 2")
    assert_user_error(train(env, "dm", *DM, "--texture-cell", 0), "--texture-cell must be 1")
    result = train(env, "dm", *DM, "--texture-region", "image", "--resume", "--out", out)
    assert_user_error(result, str(out / "ckpt.pt"), "trained on other data", "texture_region: object -> image")
    assert_user_error(train(env, "dm", *DM, "--texture-region", "edge"), "--texture-region must be object")


def test_claims_does_not_reuse_a_ddpm_of_another_width(dm_ckpt, tmp_path):
    """claims.py --base-channels: a finished DDPM in the folder with another U-Net is refused, not reused."""
    import claims
    import train as train_module
    cfg, _, _ = train_module.make_config("dm", [*map(str, DM), "--steps", "1", "--out", str(tmp_path)])
    (tmp_path / "ckpt.pt").write_bytes(dm_ckpt.read_bytes())
    assert claims.finished(cfg, "dm")
    wide, _, _ = train_module.make_config("dm", [*map(str, DM), "--base-channels", "16", "--out", str(tmp_path)])
    with pytest.raises(train_module.UserError, match="trained with another U-Net.*base_channels: 8 -> 16"):
        claims.finished(wide, "dm")


def test_open_z_path_option_reaches_the_shift_decoder(dm_ckpt):
    """--open-z-path (beyond the paper): build_diti gives G's ResBlocks a non-zero last conv; off, every one is zero."""
    import train as train_module
    from config import DiTiConfig
    from unet import ResBlock
    ckpt = torch.load(dm_ckpt, weights_only=False)
    for open_z_path in (False, True):
        model = train_module.build_diti(ckpt, DiTiConfig(open_z_path=open_z_path))
        blocks = [m for m in model.decoder.modules() if isinstance(m, ResBlock)]
        assert blocks and all(bool(b.conv2.weight.abs().sum() > 0) == open_z_path for b in blocks)
        assert model.decoder.up.out[-1].weight.abs().sum() == 0          # G = 0 at step 0 either way


def test_position_embedding_option_reaches_the_shift_decoder_and_its_checkpoint(dm_ckpt):
    """--position-embedding (beyond the paper): train.py diti's flag gives G its learned position map."""
    import train as train_module
    from config import DiTiConfig, make_config
    ckpt = torch.load(dm_ckpt, weights_only=False)
    cfg, _, _ = make_config("diti", ["--dm", str(dm_ckpt), "--position-embedding", "true"])
    assert cfg.position_embedding and not make_config("diti", ["--dm", str(dm_ckpt)])[0].position_embedding
    on, off = train_module.build_diti(ckpt, cfg), train_module.build_diti(ckpt, DiTiConfig())
    assert "decoder.position" in on.state_dict() and "decoder.position" not in off.state_dict()


def test_a_checkpoint_from_another_device_resumes_with_a_fresh_noise_seed(capsys):
    """A CUDA generator's state (16 bytes: seed and offset) cannot enter a CPU generator (MT19937): resuming a
    GPU-trained run on a CPU reseeds the t/eps generator, says so, and restores everything else."""
    import checkpoint

    class Stream:
        def state_dict(self):
            return {"pos": 3}

        def load_state_dict(self, state):
            self.loaded = state

    stream, noise = Stream(), torch.Generator().manual_seed(0)
    state = checkpoint.rng_state(stream, noise)
    state["noise"] = torch.arange(16, dtype=torch.uint8)          # what a CUDA generator's get_state() returns
    draws = []
    for _ in range(2):
        checkpoint.set_rng_state(state, stream, noise)
        draws.append(torch.rand(3, generator=noise))
    assert "written on another device" in capsys.readouterr().out
    assert torch.equal(draws[0], draws[1]) and stream.loaded == {"pos": 3}   # deterministic, stream restored

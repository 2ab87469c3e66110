"""The paper's CelebA-64 scale (SPEC §2, §3, §6): the celeba64 preset builds the paper's configuration, and
train.py runs one step of stage 1 and one of stage 2 on a CelebA folder in the official format (also an
unlabelled image folder, FFHQ/LSUN style). Batch size and steps are overridden; the architecture is not."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import config
import train
from diti import paper_partition
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_ENDS = [2, 4, 6, 10, 18, 26, 35, 60, 85, 110, 135, 160, 185, 210, 235, 260, 285, 310, 335, 362,
              370, 378, 386, 394, 402, 410, 418, 426, 434, 442, 450, 462] + list(range(463, 494)) + [512]


pytestmark = pytest.mark.usefixtures("one_thread")     # the fixture lives in conftest.py


def make_celeba(root, n=8):
    """CelebA as downloaded: img_align_celeba/NNNNNN.jpg (178 x 218), list_attr_celeba.txt (count, 40 names,
    rows of -1/1 with runs of spaces), list_eval_partition.txt (file 0|1|2)."""
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"Attr_{i}" for i in range(40)]
    lines = [str(n), " ".join(names)]
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(root / "img_align_celeba" / name)
        lines.append(name + "  " + " ".join(rng.choice(["-1", " 1"], size=40)))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    splits = [0] * (n - 2) + [1, 2]
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {s}\n" for i, s in enumerate(splits)))
    return root


def test_celeba64_preset_is_the_papers_configuration():
    dm, _, _ = config.make_config("dm", ["--preset", "celeba64"])
    diti, _, _ = config.make_config("diti", ["--preset", "celeba64"])
    assert (dm.data, dm.image_size, dm.base_channels, dm.channel_mult, dm.num_res_blocks, dm.attn_resolutions,
            dm.dropout, dm.flip) == ("celeba", 64, 64, (1, 2, 2, 2), 2, (16,), 0.1, True)
    # SPEC §2: k = 64, d = 512, the non-uniform stages; batch 128, EMA 0.9999
    assert (diti.k, diti.z_dim, diti.partition, diti.batch_size, diti.ema_decay) == (64, 512, "paper", 128, 0.9999)
    model = train.build_diti({"unet": vars(config.unet_config(dm))}, diti)
    assert list(model.partition.ends) == PAPER_ENDS == list(paper_partition().ends)
    # SPEC §3: the 64 x 64 encoder has 1.49M parameters (1,487,104)
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_487_104
    assert sum(p.numel() for p in UNet(config.unet_config(dm)).parameters()) == 9_593_539
    assert model.encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def test_celeba64_one_step_of_each_stage_on_an_official_format_folder(tmp_path, monkeypatch):
    save_samples = train.save_samples
    monkeypatch.setattr(train, "save_samples", lambda *args: save_samples(*args, n=4))   # not 64: CPU time
    root = make_celeba(tmp_path / "celeba")
    dm_out, diti_out = tmp_path / "dm", tmp_path / "diti"
    small = ["--batch-size", "2", "--steps", "1", "--ckpt-every", "1", "--device", "cpu"]
    train.main(["dm", "--preset", "celeba64", "--data-dir", str(root), "--out", str(dm_out), "--sample-steps", "1",
                *small])
    cache = np.load(root / ".diti_cache" / "celeba_v1_64" / "images.npy", mmap_mode="r")
    assert cache.shape == (8, 64, 64, 3) and cache.dtype == np.uint8           # one-time crop + resize
    dm = checkpoint.load_checkpoint(str(dm_out / "ckpt.pt"), kind="dm")
    assert dm["step"] == 1 and dm["config"]["data_dir"] == str(root) and dm["unet"]["base_channels"] == 64
    assert (dm_out / "samples.png").exists()
    train.main(["diti", "--preset", "celeba64", "--dm", str(dm_out / "ckpt.pt"), "--out", str(diti_out), *small])
    ck = checkpoint.load_checkpoint(str(diti_out / "ckpt.pt"), kind="diti")
    assert ck["step"] == 1 and list(ck["partition"]) == PAPER_ENDS
    assert np.isfinite(ck["log"][0]["loss"])
    model, unet, _ = train.load_diti(str(diti_out / "ckpt.pt"))
    assert model.encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def test_an_incomplete_celeba_folder_is_one_clear_line_and_exit_code_2(tmp_path):
    root = make_celeba(tmp_path / "celeba", n=2)
    (root / "list_attr_celeba.txt").unlink()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "dm", "--preset", "celeba64",
                           "--data-dir", str(root), "--out", str(tmp_path / "dm")],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "list_attr_celeba.txt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unlabelled_image_folder_trains_both_stages(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):       # FFHQ/LSUN style: any jpg/png under the folder, any size, centre-cropped
        Image.fromarray(rng.integers(0, 256, (40 + i, 30, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "sub" / f"{i}.png")
    small = ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--ckpt-every", "1", "--device", "cpu"]
    train.main(["dm", "--data", "folder", "--data-dir", str(tmp_path / "imgs"), "--image-size", "16",
                "--out", str(tmp_path / "dm"), "--sample-steps", "1", *small])
    assert np.load(next((tmp_path / "imgs" / ".diti_cache").glob("folder_*/images.npy"))).shape == (6, 16, 16, 3)
    train.main(["diti", "--dm", str(tmp_path / "dm" / "ckpt.pt"), "--out", str(tmp_path / "diti"), *small])
    assert checkpoint.load_checkpoint(str(tmp_path / "diti" / "ckpt.pt"), kind="diti")["step"] == 1

"""SPEC §8: DisDiff, the comparison method: factor chunks, the batched factor shifts, L_r and L_dis, the factor
swap, and the `train.py disdiff` stage."""
import json

import numpy as np
import pytest
import torch

import diffusion as D
import train
from disdiff import (DisDiff, disdiff_loss, disdiff_step, disentangle_loss, factor_shifts, load_disdiff,
                     representation, shift_rows, shifts_and_chosen)
from unet import UNet, UNetConfig

CFG = UNetConfig(image_size=16, base_channels=8, channel_mult=(1, 2), attn_resolutions=())
N, Z_DIM, B = 3, 6, 4


@pytest.fixture
def setup():
    torch.set_num_threads(1)
    unet = UNet(CFG).eval().requires_grad_(False)
    for p in unet.parameters():                      # a frozen U-Net whose eps_theta is not zero
        p.add_(0.05 * torch.randn_like(p))
    model = DisDiff(CFG, Z_DIM, N)
    x0 = torch.rand(B, 3, 16, 16) * 2 - 1
    return unet, model, D.linear_schedule(), x0


def perturb_decoder(model, scale=0.05):
    with torch.no_grad():
        for p in list(model.decoder.parameters()) + list(model.factor_embed.parameters()):
            p.add_(scale * torch.randn_like(p))


def frozen_features(unet, sched, x0, t):
    x_t = D.q_sample(sched, x0, t, torch.randn_like(x0))
    with torch.no_grad():
        return x_t, unet.encode(x_t, t)


def test_units_are_n_equal_consecutive_chunks():
    model = DisDiff(CFG, 12, 4)
    assert [u.tolist() for u in model.units] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    z = torch.arange(24.).reshape(2, 12)
    assert model.chunks(z)[1, 2].tolist() == [18, 19, 20]
    with pytest.raises(ValueError, match="divisible by --factors"):
        DisDiff(CFG, 64, 6)


def test_at_init_l_dis_is_exactly_zero_and_l_r_is_the_frozen_models_l1_error(setup):
    unet, model, sched, x0 = setup
    t, eps, c = torch.tensor([0, 300, 700, 999]), torch.randn_like(x0), torch.tensor([0, 1, 2, 0])
    for stabilise in ("none", "clip", "cap", "clip+cap"):
        loss, per_sample, _, parts = disdiff_loss(model, unet, sched, x0, stabilise=stabilise, t=t, eps=eps, c=c)
        eps_theta = unet(D.q_sample(sched, x0, t, eps), t)
        assert torch.equal(parts["dis"], torch.zeros(B))
        assert torch.equal(parts["w"], torch.zeros(B))
        assert torch.allclose(loss, (eps - eps_theta).abs().mean(), atol=1e-6)


def test_batched_n_passes_equal_n_separate_passes(setup):
    unet, model, sched, x0 = setup
    perturb_decoder(model)
    t = torch.tensor([10, 250, 600, 990])
    _, feats = frozen_features(unet, sched, x0, t)
    z = model.encode(x0)
    G = factor_shifts(model, feats, z)                                      # (B, N, C, H, W)
    assert G.shape == (B, N, 3, 16, 16)
    for k in range(N):
        offset = model.factor_embed(torch.full((B,), k))
        separate = model.decoder(feats, model.chunks(z)[:, k], emb_offset=offset)
        assert torch.allclose(G[:, k], separate, atol=1e-5), k
    c = torch.tensor([2, 0, 1, 2])
    G_all, G_c = shifts_and_chosen(model, feats, z, c)
    assert torch.allclose(G_all, G, atol=1e-5)
    assert torch.allclose(G_c, G[torch.arange(B), c], atol=1e-5)


def test_l_dis_gives_gradient_to_the_decoder_only_never_to_the_encoder_or_z(setup):
    unet, model, sched, x0 = setup
    perturb_decoder(model)
    t, c = torch.tensor([100, 300, 450, 600]), torch.tensor([0, 1, 2, 1])
    x_t, feats = frozen_features(unet, sched, x0, t)
    eps_theta = unet.decode(feats)
    for stabilise in ("none", "clip", "cap"):
        z = model.encode(x0)
        _, G_c = shifts_and_chosen(model, feats, z, c)
        dis, _, _ = disentangle_loss(model, sched, x_t, t, eps_theta, G_c, z, c, stabilise=stabilise)
        enc, dec = list(model.encoder.parameters()), list(model.decoder.parameters())
        grads = torch.autograd.grad(dis.sum(), [z] + enc + dec, allow_unused=True)
        unused_or_zero = lambda g: g is None or not g.any()
        assert unused_or_zero(grads[0]), "L_dis reached z"
        assert all(unused_or_zero(g) for g in grads[1:1 + len(enc)]), "L_dis reached the encoder's weights"
        assert any(g is not None and g.abs().sum() > 0 for g in grads[1 + len(enc):]), "the decoder got nothing"
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_different_factor_indices_give_different_shifts(setup):
    unet, model, sched, x0 = setup
    perturb_decoder(model)
    _, feats = frozen_features(unet, sched, x0, torch.full((B,), 400))
    z_row = torch.randn(1, Z_DIM // N).expand(B, -1)                        # the same z_k for every row
    same_sample = torch.zeros(B, dtype=torch.long)
    G = shift_rows(model, feats, z_row, torch.tensor([0, 1, 2, 0]), same_sample)
    assert torch.allclose(G[0], G[3])
    assert (G[0] - G[1]).abs().max() > 1e-4 and (G[1] - G[2]).abs().max() > 1e-4


def test_w_carries_no_gradient_and_equals_mean_squared_x0_move(setup):
    unet, model, sched, x0 = setup
    perturb_decoder(model, 0.2)
    t, c = torch.tensor([100, 500, 900, 999]), torch.tensor([0, 1, 2, 1])
    x_t, feats = frozen_features(unet, sched, x0, t)
    eps_theta = unet.decode(feats)
    z = model.encode(x0)
    _, G_c = shifts_and_chosen(model, feats, z, c)
    dis, w, w_raw = disentangle_loss(model, sched, x_t, t, eps_theta, G_c, z, c, stabilise="none")
    assert not w.requires_grad and not w_raw.requires_grad and dis.requires_grad
    # x0_c - x0_hat = (1 - abar_t) / sqrt(abar_t) G_c, so w = (1 - abar_t)^2 / abar_t mean(G_c^2): 2.5e4 at t = 999
    abar = sched.abar[t]
    expected = (1 - abar) ** 2 / abar * G_c.detach().pow(2).flatten(1).mean(1)
    assert torch.allclose(w, expected, rtol=1e-3)
    assert torch.equal(w, w_raw)
    _, w_clip, _ = disentangle_loss(model, sched, x_t, t, eps_theta, G_c, z, c, stabilise="clip")
    _, w_cap, _ = disentangle_loss(model, sched, x_t, t, eps_theta, G_c, z, c, stabilise="cap", w_cap=0.5)
    assert w_clip.max() <= 4 and w_cap.max() <= 0.5


def test_loss_falls_when_overfitting_a_tiny_batch(setup):
    unet, model, sched, x0 = setup
    t, eps, c = torch.tensor([50, 200, 400, 700]), torch.randn_like(x0), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = disdiff_loss(model, unet, sched, x0, t=t, eps=eps, c=c)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert disdiff_step(model, unet, sched, x0).requires_grad


def test_factor_swap_returns_images_of_the_right_shape_and_range(setup):
    unet, model, sched, x0 = setup
    perturb_decoder(model)
    out = model.factor_swap(unet, sched, x0[:2], x0[2:], k=1, steps=3)
    assert out.shape == (2, 3, 16, 16)
    assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()


def test_train_py_disdiff_tiny_writes_a_checkpoint_that_reloads(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setenv("DITI_CACHE", str(tmp_path / "cache"))
    dm, out = tmp_path / "dm", tmp_path / "disdiff"
    train.main(["dm", "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--n-train", "32",
                "--sample-steps", "1", "--out", str(dm)])
    train.main(["disdiff", "--preset", "tiny", "--dm", str(dm / "ckpt.pt"), "--steps", "3", "--batch-size", "4",
                "--out", str(out)])
    model, unet, ckpt = load_disdiff(str(out / "ckpt.pt"))
    assert ckpt["kind"] == "disdiff" and ckpt["step"] == 3
    assert ckpt["config"]["factors"] == 4 and ckpt["config"]["stabilise"] == "cap"
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["ema"][name]), name
    assert model.encode(torch.zeros(2, 3, 32, 32)).shape == (2, 16) and len(model.units) == 4
    assert {"L_r", "L_dis", "w_max"} <= set(ckpt["log"][-1])
    hazard = json.loads((out / "hazard_by_t.json").read_text())
    assert len(hazard) == 10 and sum(r["n"] for r in hazard) == 12
    assert np.isclose(ckpt["opt"]["param_groups"][0]["lr"], 2.56e-4 * 3 / 5)          # warm-up: 5 steps
    rep = representation(str(out / "ckpt.pt"), "cpu", "disdiff")              # what evaluate.py reads
    x0 = torch.zeros(2, 3, 32, 32)
    assert rep.encode(x0).shape == (2, 16) and [u.tolist() for u in rep.units][1] == [4, 5, 6, 7]
    assert rep.t_ranges == [(0, 249), (250, 499), (500, 749), (750, 999)] and rep.info["k"] == 4
    losses = rep.decoder.weighted_losses(x0, torch.randn_like(x0), torch.tensor([10, 900]), torch.randn(3, 2, 16))
    assert losses.shape == (3, 2) and torch.isfinite(losses).all()

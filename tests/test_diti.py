"""SPEC §2-3: partitions, cumulative masks, the two DiTi modes, PDAE as k = 1, and the loss itself."""
import pytest
import torch

import diffusion as D
from diti import (DiTi, Encoder, Partition, condition, cumulative_mask, diti_loss, fitted_partition, make_partition,
                  SubsetEncoders, paper_partition, staged_partition, subset_table, uniform_partition)
from unet import UNet, UNetConfig

PAPER_ENDS = [2, 4, 6, 10, 18, 26, 35, 60, 85, 110, 135, 160, 185, 210, 235, 260, 285, 310, 335, 362,
              370, 378, 386, 394, 402, 410, 418, 426, 434, 442, 450, 462] + list(range(463, 494)) + [512]


def test_paper_partition_reproduces_the_64_end_dims_of_the_spec():
    assert len(PAPER_ENDS) == 64
    assert list(paper_partition().ends) == PAPER_ENDS


def test_paper_partition_stage_blocks():
    p = paper_partition()
    # [0,10) t 0-62, [10,35) t 63-109, [35,362) t 110-312, [362,462) t 313-499, [462,512) t 500-999
    for t, end in [(0, 2), (62, 10), (63, 18), (109, 35), (110, 60), (312, 362), (313, 370), (499, 462),
                   (500, 463), (999, 512)]:
        assert p.ends[p.subset_of_t(t)] == end, t


@pytest.mark.parametrize("d,k,ends", [(8, 4, [2, 4, 6, 8]), (10, 3, [3, 6, 10]), (64, 1, [64]), (5, 5, [1, 2, 3, 4, 5])])
def test_uniform_partition(d, k, ends):
    p = uniform_partition(d, k)
    assert list(p.ends) == ends
    assert [p.subset_of_t(t) for t in (0, 999)] == [0, k - 1]


def test_uniform_subset_of_t_is_floor_of_t_over_T_by_k():
    p = uniform_partition(64, 8)
    assert [p.subset_of_t(t) for t in (0, 124, 125, 249, 250, 999)] == [0, 0, 1, 1, 2, 7]
    assert p.t_range(1) == (125, 249)


def test_cumulative_mask_hand_worked():
    p = uniform_partition(8, 4)                       # ends 2, 4, 6, 8; subsets of 250 time-steps
    m = cumulative_mask(p, torch.tensor([0, 249, 250, 600, 999]))
    assert m.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0],
                          [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]


def test_mask_switches_on_exactly_dims_up_to_end_of_idx_t_for_the_paper_partition():
    p = paper_partition()
    t = torch.arange(1000)
    m = cumulative_mask(p, t)
    ends = torch.tensor(p.ends)[t * 64 // 1000]
    assert torch.equal(m.sum(1).long(), ends)
    assert torch.equal(m, (torch.arange(512)[None] < ends[:, None]).float())


def test_partition_errors_name_the_fix():
    with pytest.raises(ValueError, match="k=9 subsets cannot cut a latent of d=8"):
        uniform_partition(8, 9)
    with pytest.raises(ValueError, match="sum to 15, not the latent size d=64"):
        make_partition("staged", 64, 8, (50, 100, 300, 500, 1000), (1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="needs d=512"):
        make_partition("paper", 64, 64)
    with pytest.raises(ValueError, match="must rise strictly"):
        Partition((2, 2, 4))


def test_condition_values_equal_in_both_modes():
    p = uniform_partition(8, 4)
    z, t = torch.randn(5, 8), torch.tensor([0, 300, 500, 800, 999])
    assert torch.equal(condition(z, t, p, "base"), condition(z, t, p, "stop_grad"))


def test_stop_grad_gives_gradient_only_to_subset_idx_t():
    p = uniform_partition(8, 4)
    z = torch.randn(3, 8, requires_grad=True)
    t = torch.tensor([100, 600, 999])                 # subsets 0, 2, 3
    condition(z, t, p, "stop_grad").pow(2).sum().backward()
    nonzero = (z.grad != 0).int().tolist()
    assert nonzero == [[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1]]


def test_base_mode_gives_gradient_to_all_switched_on_dims():
    p = uniform_partition(8, 4)
    z = torch.randn(1, 8, requires_grad=True)
    condition(z, torch.tensor([600]), p, "base").pow(2).sum().backward()
    assert (z.grad != 0).int().tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]


def test_encoder_of_spec_has_about_1_49M_parameters():
    n = sum(q.numel() for q in Encoder(64, 512).parameters())
    assert abs(n - 1.49e6) < 0.01e6
    assert Encoder(32, 64)(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_encoder_grid_keeps_a_spatial_map_only_where_the_paper_would_collapse_it():
    strides = lambda e: [m.stride[0] for m in e.net if isinstance(m, torch.nn.Conv2d)]   # noqa: E731
    paper16, grid16 = Encoder(16, 8), Encoder(16, 8, min_grid=2)
    assert strides(paper16) == [2, 2, 2, 2] and paper16.net[-1].in_features == 128          # 16 -> 1x1
    assert strides(grid16) == [2, 2, 2, 1] and grid16.net[-1].in_features == 128 * 2 * 2    # stops at 2x2
    assert grid16(torch.randn(3, 3, 16, 16)).shape == (3, 8)
    same = Encoder(64, 512, min_grid=2)                                                       # 4x4 already
    assert strides(same) == [2, 2, 2, 2] and sum(q.numel() for q in same.parameters()) == 1487104


def test_subset_encoders_give_each_subset_its_own_head():
    """--encoder-heads (beyond the paper): subset i's dims depend only on head i's weights, and the heads
    together have no more parameters than the shared encoder."""
    part = uniform_partition(64, 8)
    heads = SubsetEncoders(16, part)
    x = torch.randn(2, 3, 16, 16)
    z = heads(x)
    assert z.shape == (2, 64) and len(heads.heads) == 8
    z[:, 8:16].sum().backward()                                                    # subset 1
    grads = [any(q.grad is not None and q.grad.abs().sum() > 0 for q in h.parameters()) for h in heads.heads]
    assert grads == [False, True] + [False] * 6
    assert sum(q.numel() for q in heads.parameters()) <= sum(q.numel() for q in Encoder(16, 64).parameters())


def tiny_setup(k=4, d=8):
    cfg = UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2), attn_resolutions=())
    unet = UNet(cfg).eval().requires_grad_(False)
    return unet, DiTi(cfg, uniform_partition(d, k)), D.linear_schedule()


def test_at_initialisation_the_loss_is_the_weighted_ddpm_loss_of_the_frozen_model():
    unet, model, s = tiny_setup()
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t, eps = torch.tensor([10, 200, 500, 990]), torch.randn(4, 3, 16, 16)
    loss, per_sample, _ = diti_loss(model, unet, s, x0, "base", t, eps)
    plain = (eps - unet(D.q_sample(s, x0, t, eps), t)).pow(2).flatten(1).mean(1)
    assert torch.allclose(per_sample, D.pdae_weight(s, t) * plain, atol=1e-6)
    assert torch.allclose(loss, (D.pdae_weight(s, t) * plain).mean(), atol=1e-6)
    abar_weighted = diti_loss(model, unet, s, x0, "base", t, eps, gamma=1.0)[1]     # --loss-gamma 1: abar_t
    assert torch.allclose(abar_weighted, s.abar[t].float() * plain, atol=1e-6)


def perturb(module, std=0.05):
    with torch.no_grad():
        for q in module.parameters():
            q.add_(std * torch.randn_like(q))


def test_k1_is_the_pdae_loss():
    unet, model, s = tiny_setup(k=1, d=8)
    perturb(model.decoder)
    x0, t, eps = torch.rand(3, 3, 16, 16) * 2 - 1, torch.tensor([5, 400, 900]), torch.randn(3, 3, 16, 16)
    loss, _, _ = diti_loss(model, unet, s, x0, "base", t, eps)
    # PDAE: z always fully on; L = weight_t || eps - (eps_theta + shift_t G(x_t, t, z)) ||^2
    xt = D.q_sample(s, x0, t, eps)
    feats = unet.encode(xt, t)
    G = model.decoder(feats, model.encode(x0))
    pred = unet.decode(feats) + D.shift_coef(s, t).view(-1, 1, 1, 1) * G
    want = (D.pdae_weight(s, t) * (eps - pred).pow(2).flatten(1).mean(1)).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    assert torch.allclose(diti_loss(model, unet, s, x0, "stop_grad", t, eps)[0], want, atol=1e-6)


def test_loss_falls_when_overfitting_a_tiny_batch():
    unet, model, s = tiny_setup()
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t, eps = torch.randint(0, 1000, (8,), generator=gen), torch.randn(8, 3, 16, 16, generator=gen)
    first = diti_loss(model, unet, s, x0, "base", t, eps)[0].item()
    for _ in range(60):
        loss = diti_loss(model, unet, s, x0, "base", t, eps)[0]
        opt.zero_grad(), loss.backward(), opt.step()
    assert loss.item() < 0.7 * first
    assert all(q.grad is None for q in unet.parameters())


def test_subset_table_lists_every_subset():
    table = subset_table(uniform_partition(8, 4)).splitlines()
    assert len(table) == 5 and "750-999" in table[-1] and "[   6,   8)" in table[-1]


def test_staged_partition_rejects_an_empty_stage():
    with pytest.raises(ValueError, match="holds no subset"):
        staged_partition(4, (50, 100, 1000), (1, 1, 6))


def step_tv(loss_times, T=1000):
    """TV curves that fall from 1 to 0 exactly at each loss time."""
    return (torch.arange(T)[None] < torch.tensor(loss_times)[:, None]).double()


def test_fitted_partition_puts_the_dims_where_the_factors_are_lost():
    # k = 4 subsets of 250 steps; three factors lost at t = 100, 120 (subset 0) and 600 (subset 2)
    p = fitted_partition(step_tv([100, 120, 600]), d=64, k=4)
    dims = [e - s for s, e in zip(p.starts(), p.ends)]
    # 60 spare dims split 2:0:1:0 -> 40, 0, 20, 0, plus one dim each
    assert dims == [41, 1, 21, 1] and p.d == 64


def test_fitted_partition_without_any_loss_is_uniform():
    assert fitted_partition(torch.zeros(2, 1000), d=8, k=4).ends == (2, 4, 6, 8)


def test_diti_loss_reads_only_the_dims_switched_on_at_t():
    unet, model, s = tiny_setup(k=4, d=8)                 # ends 2, 4, 6, 8; subsets of 250 time-steps
    perturb(model.decoder)
    x0, eps = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randn(4, 3, 16, 16)
    t = torch.tensor([100, 300, 600, 900])                # subsets 0, 1, 2, 3: dims [0, 2), [0, 4), [0, 6), all
    z = torch.randn(4, 8)
    model.encode = lambda x: z
    losses = {}
    for mode in ("base", "stop_grad"):
        losses[mode] = diti_loss(model, unet, s, x0, mode, t, eps)[1]
        late = z.clone()
        late[:, 6:] += 1.0                                 # dims that only t >= 750 sees
        model.encode = lambda x: late
        changed = diti_loss(model, unet, s, x0, mode, t, eps)[1] != losses[mode]
        model.encode = lambda x: z
        assert changed.tolist() == [False, False, False, True], mode
    assert torch.allclose(losses["base"], losses["stop_grad"])              # same value, other gradients

"""SPEC §3: the U-Net, its time conditioning, and the shift decoder that shares its encoder half."""
import pytest
import torch

from unet import ResBlock, ShiftDecoder, UNet, UNetConfig, eps_and_shift

CONFIGS = [
    UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=()),
    UNetConfig(image_size=32, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,)),
    UNetConfig(image_size=64, base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
               dropout=0.1),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.image_size}px-{len(c.channel_mult)}levels")
def test_unet_and_decoder_output_shapes(cfg):
    unet, dec = UNet(cfg), ShiftDecoder(cfg, z_dim=12)
    x, t = torch.randn(3, 3, cfg.image_size, cfg.image_size), torch.randint(0, 1000, (3,))
    eps, G = eps_and_shift(unet, dec, x, t, torch.randn(3, 12))
    assert eps.shape == x.shape and G.shape == x.shape


def test_time_conditioning_is_scale_and_shift_of_the_normalised_features():
    block = ResBlock(8, 8, emb_dim=4)
    torch.nn.init.normal_(block.conv2.weight)
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 4)
    h = block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x))))
    s, b = block.time_proj(torch.nn.functional.silu(emb)).chunk(2, dim=1)
    want = x + block.conv2(torch.nn.functional.silu(h * (1 + s[:, :, None, None]) + b[:, :, None, None]))
    assert torch.allclose(block(x, emb), want, atol=1e-5)


def test_decoder_G_is_exactly_zero_at_initialisation_and_frozen_path_gets_no_gradient():
    cfg = CONFIGS[1]
    unet, dec = UNet(cfg).requires_grad_(False), ShiftDecoder(cfg, z_dim=6)
    x, t = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
    z = torch.randn(2, 6, requires_grad=True)
    eps, G = eps_and_shift(unet, dec, x, t, z)
    assert G.abs().max().item() == 0.0
    assert not eps.requires_grad and eps.grad_fn is None          # no autograd graph on the frozen path
    G.sum().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert dec.up.out[-1].weight.grad is not None


def test_frozen_path_builds_no_graph_even_if_parameters_require_grad():
    cfg = CONFIGS[0]
    unet, dec = UNet(cfg), ShiftDecoder(cfg, z_dim=4)              # unet not frozen by the caller
    eps, G = eps_and_shift(unet, dec, torch.randn(1, 3, 16, 16), torch.tensor([5]), torch.randn(1, 4))
    (G.sum() + 0 * eps.sum()).backward()
    assert all(p.grad is None for p in unet.parameters())


def perturb(module, std=0.05):
    """Move every parameter off its initial value (zero-initialised layers hide z and t at step 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


def test_z_changes_G_once_the_decoder_is_nonzero():
    cfg = CONFIGS[0]
    unet, dec = UNet(cfg), perturb(ShiftDecoder(cfg, z_dim=4))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([300])
    _, G1 = eps_and_shift(unet, dec, x, t, torch.zeros(1, 4))
    _, G2 = eps_and_shift(unet, dec, x, t, torch.ones(1, 4))
    assert (G1 - G2).abs().max() > 1e-4


def test_unet_sees_time():
    cfg = CONFIGS[0]
    unet = perturb(UNet(cfg))
    x = torch.randn(1, 3, 16, 16)
    assert (unet(x, torch.tensor([1])) - unet(x, torch.tensor([900]))).abs().max() > 1e-4


@pytest.mark.parametrize("open_z_path", [False, True])
def test_output_conv_gradient_sees_z_at_step_0_only_with_the_open_z_path(open_z_path):
    """The saddle ShiftDecoder's docstring names: with zero-initialised ResBlock convs, the output conv's first
    gradient is the same whatever z is (so a residual that x_t alone cannot predict teaches G nothing);
    --open-z-path makes it depend on z. G = 0 at step 0 either way."""
    cfg = CONFIGS[0]
    torch.manual_seed(0)
    unet, dec = UNet(cfg).requires_grad_(False), ShiftDecoder(cfg, z_dim=4, open_z_path=open_z_path)
    x, t, residual = torch.randn(2, 3, 16, 16), torch.tensor([100, 600]), torch.randn(2, 3, 16, 16)
    grads = []
    for z in (torch.zeros(2, 4), 3 * torch.randn(2, 4)):
        dec.zero_grad()
        _, G = eps_and_shift(unet, dec, x, t, z)
        assert G.abs().max().item() == 0.0
        (G * residual).sum().backward()
        grads.append(dec.up.out[-1].weight.grad.clone())
    differ = (grads[0] - grads[1]).abs().max().item()
    assert (differ > 1e-3) if open_z_path else (differ == 0.0)


def fit_checker(position_embedding, steps):
    """Train G to draw a 1-px checker fixed to the pixel grid on flat images when z says so; the last loss
    (mean squared error over the target's mean square, so 1 = G drew nothing)."""
    cfg = CONFIGS[0]
    torch.manual_seed(0)
    unet, dec = UNet(cfg).requires_grad_(False), ShiftDecoder(cfg, z_dim=2, position_embedding=position_embedding)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    i = torch.arange(cfg.image_size)
    checker = ((i[:, None] + i) % 2 * 2 - 1).float()
    for _ in range(steps):
        on = torch.randint(0, 2, (8,))
        x = (0.3 * torch.randn(8, 3, 1, 1)).expand(8, 3, cfg.image_size, cfg.image_size)
        _, G = eps_and_shift(unet, dec, x, torch.randint(0, 1000, (8,)), torch.nn.functional.one_hot(on, 2).float())
        loss = (G - on.view(8, 1, 1, 1) * checker).pow(2).mean() / 0.5
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_position_embedding_is_a_learned_map_that_keeps_g_zero_at_step_0():
    cfg = CONFIGS[0]
    unet, dec = UNet(cfg), ShiftDecoder(cfg, z_dim=4, position_embedding=True)
    assert dec.position.shape == (1, cfg.base_channels, cfg.image_size, cfg.image_size)
    assert "position" in dec.state_dict() and ShiftDecoder(cfg, z_dim=4).position is None
    x = torch.randn(2, 3, 16, 16)
    _, G = eps_and_shift(unet, dec, x, torch.tensor([5, 500]), torch.randn(2, 4))
    assert G.abs().max().item() == 0.0


def test_position_embedding_lets_g_draw_a_pattern_fixed_to_the_pixel_grid_sooner():
    """On flat images only the zero padding tells a convolution where it is, so G without the map draws the
    checker slowly (it does get there: ~0.1 after 100 steps); with it, G draws it within 50."""
    assert fit_checker(True, 50) < 0.1 < 0.5 < fit_checker(False, 50)

"""A small DDPM U-Net (SPEC §3) and the PDAE/DiTi shift decoder G that shares its encoder half.

The U-Net is split in two halves so the frozen encoder half runs once per batch and feeds both the frozen
decoder half (eps_theta) and the trainable shift decoder (G):

    feats = unet.encode(x_t, t)        # frozen: skip features, bottom activation, time embedding
    eps   = unet.decode(feats)         # frozen decoder half (unet.eps_from(feats, x_t, t) in eps_and_shift)
    G     = decoder(feats, z)          # trainable middle + output blocks with AdaGN on z
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple = (8,)
    dropout: float = 0.0
    num_heads: int = 4


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer time-steps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def group_norm(ch):
    return nn.GroupNorm(min(32, ch // 4) if ch >= 4 else 1, ch)


def zero(module):
    """Zero-initialise a layer's parameters (so a residual branch or output starts as exactly 0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """SPEC §3 ResBlock. Time conditioning: h = GN(h) (1 + s_t) + b_t, [s_t, b_t] = Linear(SiLU(e_t)).
    With cond_dim set (the shift decoder), AdaGN on z as well:
    h = (1 + s_z) (GN(h) (1 + s_t) + b_t) + b_z, [s_z, b_z] = Linear(SiLU(e_z))."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout=0.0, cond_dim=None):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(emb_dim, 2 * out_ch)
        self.cond_proj = nn.Linear(cond_dim, 2 * out_ch) if cond_dim else None
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb, cond=None):
        h = self.conv1(F.silu(self.norm1(x)))
        s_t, b_t = self.time_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + s_t) + b_t
        if self.cond_proj is not None:
            s_z, b_z = self.cond_proj(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
            h = (1 + s_z) * h + b_z
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual, output zero-initialised."""

    def __init__(self, ch, num_heads=4):
        super().__init__()
        self.num_heads, self.norm = num_heads, group_norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x, *unused):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, *unused):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, *unused):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def run_blocks(blocks, h, emb, cond=None):
    for block in blocks:
        h = block(h, emb, cond) if isinstance(block, ResBlock) else block(h)
    return h


def skip_channels(cfg):
    """Channel count of every skip feature the encoder half stores, in order."""
    chans, ch = [cfg.base_channels], cfg.base_channels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            ch = mult * cfg.base_channels
            chans.append(ch)
        if level < len(cfg.channel_mult) - 1:
            chans.append(ch)
    return chans


class EncoderHalf(nn.Module):
    """Input conv and down path. Returns (h, skips, emb): bottom activation, skip features, time embedding."""

    def __init__(self, cfg):
        super().__init__()
        B, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        self.time_embed = nn.Sequential(nn.Linear(B, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(cfg.in_channels, B, 3, padding=1)
        self.levels = nn.ModuleList()
        ch, res = B, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(ch, mult * B, emb_dim, cfg.dropout)]
                ch = mult * B
                if res in cfg.attn_resolutions:
                    blocks.append(Attention(ch, cfg.num_heads))
                self.levels.append(nn.ModuleList(blocks))
            if level < len(cfg.channel_mult) - 1:
                self.levels.append(nn.ModuleList([Downsample(ch)]))
                res //= 2
        self.base_channels = B

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.base_channels))
        h = self.input_conv(x)
        skips = [h]
        for blocks in self.levels:
            h = run_blocks(blocks, h, emb)
            skips.append(h)
        return h, skips, emb


class DecoderHalf(nn.Module):
    """Middle block, up path with skip connections, output conv (zero-initialised).
    cond_dim=None: the plain U-Net's half. cond_dim=e: every ResBlock also applies AdaGN with e_z."""

    def __init__(self, cfg, cond_dim=None):
        super().__init__()
        B, emb_dim = cfg.base_channels, 4 * cfg.base_channels
        ch, res = cfg.channel_mult[-1] * B, cfg.image_size // 2 ** (len(cfg.channel_mult) - 1)
        res_block = lambda i, o: ResBlock(i, o, emb_dim, cfg.dropout, cond_dim)
        self.middle = nn.ModuleList([res_block(ch, ch), Attention(ch, cfg.num_heads), res_block(ch, ch)])
        skips = skip_channels(cfg)
        self.levels = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [res_block(ch + skips.pop(), mult * B)]
                ch = mult * B
                if res in cfg.attn_resolutions:
                    blocks.append(Attention(ch, cfg.num_heads))
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(Upsample(ch))
                    res *= 2
                self.levels.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, cfg.in_channels, 3, padding=1)))

    def forward(self, h, skips, emb, cond=None):
        skips = list(skips)
        h = run_blocks(self.middle, h, emb, cond)
        for blocks in self.levels:
            h = run_blocks(blocks, torch.cat([h, skips.pop()], dim=1), emb, cond)
        return self.out(h)


class UNet(nn.Module):
    """eps_theta(x_t, t): the DDPM noise predictor. (B, C, H, W), (B,) -> (B, C, H, W)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.down = EncoderHalf(cfg)
        self.up = DecoderHalf(cfg)

    def encode(self, x, t):
        return self.down(x, t)

    def decode(self, feats):
        return self.up(*feats)

    def eps_from(self, feats, x, t):
        """eps_theta from this U-Net's own features (synthetic.ExactDenoiser answers from x and t instead)."""
        return self.decode(feats)

    def forward(self, x, t):
        return self.decode(self.encode(x, t))


class ShiftDecoder(nn.Module):
    """G(x_t, t, z) of SPEC §3: trainable middle/output blocks over the frozen encoder half's features.
    z enters as e_z = Linear(z); `emb_offset` (B, emb_dim) is added to the time embedding (DisDiff's factor
    embedding). The output conv is zero-initialised, so G = 0 at step 0.
    open_z_path (beyond the paper, off by default): the ResBlocks' last convs start at PyTorch's default init
    instead of zero. Zero-initialised, z reaches the output conv through nothing at step 0, so the output conv
    first learns only from what the residual shares with x_t alone; if it shares nothing (an exact eps_theta),
    every gradient is zero in expectation and G stays at that saddle. Open, the output conv sees z at once.
    position_embedding (beyond the paper, off by default): a learned (C, H, W) map added to the full-resolution
    features of the input conv, which the last ResBlock reads. Convolutions are blind to a pixel's absolute
    position, so without it G can draw a pattern fixed to the pixel grid (the built-in 1-px texture) only
    from what x_t still shows of it."""

    def __init__(self, cfg, z_dim, open_z_path=False, position_embedding=False):
        super().__init__()
        emb_dim = 4 * cfg.base_channels
        self.z_embed = nn.Linear(z_dim, emb_dim)
        self.up = DecoderHalf(cfg, cond_dim=emb_dim)
        if open_z_path:
            for block in self.up.modules():
                if isinstance(block, ResBlock):
                    block.conv2.reset_parameters()
        size = (1, cfg.base_channels, cfg.image_size, cfg.image_size)
        self.position = nn.Parameter(0.02 * torch.randn(size)) if position_embedding else None

    def forward(self, feats, z, emb_offset=None):
        h, skips, emb = feats
        if emb_offset is not None:
            emb = emb + emb_offset
        if self.position is not None:                     # skips[0]: the input conv's features, read last
            skips = [skips[0] + self.position.to(skips[0].dtype), *skips[1:]]
        return self.up(h, skips, emb, self.z_embed(z))


def eps_and_shift(unet, decoder, x_t, t, z):
    """One pass giving the frozen eps_theta(x_t, t) (no autograd graph) and the trainable G(x_t, t, z)."""
    with torch.no_grad():
        feats = unet.encode(x_t, t)
        eps = unet.eps_from(feats, x_t, t)
    return eps, decoder(feats, z)

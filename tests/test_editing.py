"""SPEC §4 counterfactual codes: interpolating one range of z, and slerp between two noises."""
import torch

from editing import interpolate_codes, slerp


def test_interpolate_codes_replaces_only_the_chosen_dims():
    z1, z2 = torch.randn(3, 8), torch.randn(3, 8)
    codes = interpolate_codes(z1, z2, [2, 3, 4], [0.0, 0.25, 1.0])       # (A, B, d)
    assert codes.shape == (3, 3, 8)
    assert torch.equal(codes[0], z1)                                       # alpha = 0 is z1 exactly
    assert torch.allclose(codes[1][:, 2:5], 0.75 * z1[:, 2:5] + 0.25 * z2[:, 2:5])
    assert torch.allclose(codes[2][:, 2:5], z2[:, 2:5])
    outside = [0, 1, 5, 6, 7]
    assert all(torch.equal(c[:, outside], z1[:, outside]) for c in codes)  # the other dims stay z1's


def test_slerp_keeps_the_endpoints_and_the_norm_of_orthogonal_noises():
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    a.view(-1)[0], b.view(-1)[1] = 3.0, 3.0                                # orthogonal, both of norm 3
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert mid.shape == a.shape and abs(mid.norm().item() - 3.0) < 1e-5   # lerp would give 3 / sqrt(2)
    assert torch.allclose(mid.view(-1)[:2], torch.tensor([3.0, 3.0]) / 2 ** 0.5, atol=1e-5)

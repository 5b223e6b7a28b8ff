"""Kernel analysis: exact kernel-mass cases, effective size, PCA on planted components, kernels at trained sizes."""
import pytest
import torch
import torch.nn as nn

from niff_nb.analysis import (default_window_sizes, effective_kernel_size, eigen_kernels, kernel_mass_ratio,
                              kernel_mass_table, niff_layers, spatial_kernels)
from niff_nb.layers import NIFFConv2d, NIFFDepthwise

SIZES = [(7, 7), (8, 8), (9, 12), (16, 5), (1, 6), (5, 1)]


@pytest.mark.parametrize('h,w', SIZES)
def test_delta_has_all_mass_in_every_window(h, w):
    k = torch.zeros(3, h, w); k[:, h // 2, w // 2] = torch.tensor([1., -2., 0.5])
    r = kernel_mass_ratio(k)
    assert torch.allclose(r, torch.ones_like(r))
    assert effective_kernel_size(k).tolist() == [1, 1, 1]


@pytest.mark.parametrize('h,w', SIZES)
def test_uniform_kernel_window_share(h, w):
    sizes = default_window_sizes(h, w)
    r = kernel_mass_ratio(torch.full((h, w), -0.3), sizes)
    expected = torch.tensor([min(s, h) * min(s, w) / (h * w) for s in sizes])
    assert torch.allclose(r, expected, atol=1e-6)
    assert r[-1] == pytest.approx(1.0)


@pytest.mark.parametrize('h,w', [(5, 5), (8, 8), (9, 12), (16, 5)])
def test_centred_3x3_box(h, w):
    k = torch.zeros(h, w); k[h // 2 - 1:h // 2 + 2, w // 2 - 1:w // 2 + 2] = 2.0
    r = kernel_mass_ratio(k, [1, 3, 5])
    assert torch.allclose(r, torch.tensor([1 / 9, 1.0, 1.0]))
    assert effective_kernel_size(k, 0.5).item() == 3 and effective_kernel_size(k, 0.1).item() == 1


def test_kmr_shape_and_errors():
    assert kernel_mass_ratio(torch.randn(2, 3, 9, 9), [1, 3]).shape == (2, 3, 2)
    with pytest.raises(ValueError, match='odd'): kernel_mass_ratio(torch.randn(5, 5), [4])
    with pytest.raises(ValueError, match='kernels must be'): kernel_mass_ratio(torch.randn(5))
    with pytest.raises(ValueError, match='mass must be'): effective_kernel_size(torch.randn(5, 5), 1.5)


def test_pca_recovers_planted_components():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(11.) - 5, torch.arange(11.) - 5, indexing='ij')
    a = torch.exp(-(xx ** 2 + yy ** 2) / 3); a /= a.norm()
    b = torch.exp(-(xx ** 2 + yy ** 2) / 6) * xx; b /= b.norm()
    coef = torch.randn(300, 2, generator=g) * torch.tensor([4.0, 2.0])
    ks = coef[:, :1, None] * a + coef[:, 1:, None] * b + 0.005 * torch.randn(300, 11, 11, generator=g)
    comps, var = eigen_kernels(ks, 3)
    assert abs((comps[0] * a).sum()) > 0.99 and abs((comps[1] * b).sum()) > 0.99
    assert var[:2].sum() > 0.99 and var[0] > var[1]


def test_spatial_kernels_use_each_layers_feature_map_size():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), NIFFConv2d(8, 8, 'cifar'), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          NIFFConv2d(8, 4, full=True), nn.MaxPool2d(2), NIFFDepthwise(4, 'small'))
    assert list(niff_layers(model)) == ['1', '3', '5']           # the separated block's inner depthwise is not listed twice
    ks = spatial_kernels(model, (20, 14))
    assert {k: tuple(v.shape) for k, v in ks.items()} == {'1': (8, 20, 14), '3': (32, 10, 7), '5': (4, 5, 3)}
    assert torch.allclose(ks['1'], model[1].depthwise.spatial_kernel(20, 14))
    assert model.training                                         # the analysis restored the mode


def test_kernel_mass_table_fields():
    ks = {'a': torch.randn(6, 9, 9), 'b': torch.randn(4, 5, 7)}
    t = kernel_mass_table(ks)
    assert t['a']['windows'] == [1, 3, 5, 7, 9] and len(t['a']['kmr_mean']) == 5 and t['b']['size'] == [5, 7]
    assert all(1 <= row['effective_size_median'] <= 9 for row in t.values())

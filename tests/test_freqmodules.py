"""Frequency-domain modules of the paper's Appendix F: FLC pooling against its definition (sizes, band-limited maps,
window, dtypes, gradients), complex batch norm against an explicit whitening (train/eval, running statistics,
gradients), the spectral head against the spatial one, the fused FrequencyBlock, and the Table A9 variants
(which layers change, parameter counts, a checkpoint round trip, two optimiser steps for each network)."""
import math

import pytest
import torch
import torch.nn as nn
from fastcore.test import test_close as close_
from fastcore.test import test_eq as eq_

from niff_nb.convert import PLUGIN_VARIANTS, all_variants, create_model, n_params
from niff_nb.core import ArgumentError
from niff_nb.freqmodules import (FLC_WINDOWS, FREQ_VARIANTS, TABLE_A9, ComplexBatchNorm2d, FLCPool, FrequencyBlock,
                                 FrequencyHead, FrequencyHeadNet, SpectralAvgPool2d, complex_moments, complex_normalize,
                                 flc_frequencies, flc_pool, flc_reference, flc_size, flc_spectrum, flc_window, freqmodify,
                                 inv_sqrt_2x2, spectral_avg_pool)
from niff_nb.layers import NIFFConv2d, NIFFDepthwise

SIZES = [(8, 8), (32, 32), (7, 7), (5, 5), (6, 9), (9, 6), (1, 1), (1, 6), (7, 1), (2, 2), (3, 4), (12, 10)]


def band_limited(shape, dtype=torch.float64):
    "Real maps whose spectrum is zero for |k_y| >= H/4 or |k_x| >= W/4."
    *lead, h, w = shape
    ky, kx = torch.fft.fftfreq(h, 1 / h), torch.fft.rfftfreq(w, 1 / w)
    keep = (ky.abs()[:, None] < h / 4) & (kx[None] < w / 4)
    spec = torch.randn(*lead, h, w // 2 + 1, dtype=dtype) + 1j * torch.randn(*lead, h, w // 2 + 1, dtype=dtype)
    return torch.fft.irfft2(spec * keep, s=(h, w))


# ---------------------------------------------------------------- FLC pooling
@pytest.mark.parametrize('window', FLC_WINDOWS)
@pytest.mark.parametrize('size', SIZES)
def test_flc_equals_its_definition(size, window):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    y = flc_pool(x, window)
    eq_(tuple(y.shape), (2, 3, flc_size(size[0]), flc_size(size[1])))
    assert not y.is_complex() and y.dtype == torch.float64
    close_(y, flc_reference(x, window), eps=1e-12)


@pytest.mark.parametrize('size', [(8, 8), (16, 12), (32, 32), (4, 20)])
def test_flc_of_band_limited_map_is_its_decimation(size):
    torch.manual_seed(1)
    x = band_limited((2, 3, *size))
    close_(flc_pool(x), x[..., ::2, ::2], eps=1e-12)
    full = torch.randn(2, 3, *size, dtype=torch.float64)
    assert (flc_pool(full) - full[..., ::2, ::2]).abs().max() > 0.1           # the alias term is real


@pytest.mark.parametrize('n', [5, 7, 9, 11, 3])
def test_flc_odd_sizes_sample_the_trigonometric_interpolant(n):
    "Odd N: FLC gives M = (N+1)/2 samples of the band-limited interpolant at t = m N / M (no exact decimation exists)."
    torch.manual_seed(2)
    m = flc_size(n)
    k = torch.arange(1, (m - 1) // 2 + 1, dtype=torch.float64)       # frequencies strictly below the output's Nyquist
    a, b, c = torch.randn(len(k), dtype=torch.float64), torch.randn(len(k), dtype=torch.float64), torch.randn(()).double()
    def signal(t):
        ph = 2 * math.pi * k * torch.as_tensor(t, dtype=torch.float64)[:, None] / n
        return c + (a * ph.cos() + b * ph.sin()).sum(-1)
    x, want = signal(torch.arange(n)), signal(torch.arange(m, dtype=torch.float64) * n / m)
    close_(flc_pool((x[:, None] * x[None])[None, None])[0, 0], want[:, None] * want[None], eps=1e-10)


def test_flc_removes_frequencies_above_the_new_nyquist():
    n = torch.arange(16, dtype=torch.float64)
    stripes = torch.cos(2 * math.pi * 6 * n / 16)[None, None, None].expand(1, 1, 16, 16)   # 6/16 > 1/4 cycles per pixel
    assert stripes[..., ::2, ::2].abs().max() > 0.9              # plain subsampling aliases it to 2 cycles in 8
    assert flc_pool(stripes).abs().max() < 1e-12


def test_flc_helpers_and_window():
    eq_([flc_size(n) for n in (1, 2, 3, 4, 7, 8)], [1, 1, 2, 2, 4, 4])
    eq_(flc_frequencies(4).tolist(), [0, 1, -2, -1]); eq_(flc_frequencies(3).tolist(), [0, 1, -1])
    close_(flc_window(5, 'hamming') ** 2, torch.tensor([0.08, 0.54, 1.0, 0.54, 0.08], dtype=torch.float64), eps=1e-12)
    eq_(flc_window(4).tolist(), [1.0] * 4)
    x = torch.randn(1, 2, 10, 6, dtype=torch.float64)
    spec, size = flc_spectrum(torch.fft.rfft2(x), (10, 6), 'hamming')
    eq_(size, (5, 3)); eq_(tuple(spec.shape), (1, 2, 5, 2))
    close_(torch.fft.irfft2(spec, s=size), flc_pool(x, 'hamming'), eps=1e-12)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_flc_precision_island(dtype):
    x = torch.randn(2, 3, 12, 10)
    y = flc_pool(x.to(dtype))
    eq_(y.dtype, dtype)
    close_(y.float(), flc_pool(x.to(dtype).float()), eps=1e-2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        eq_(FLCPool('hamming')(x).dtype, torch.float32)
        close_(FLCPool('hamming')(x), flc_pool(x, 'hamming'), eps=1e-6)


def test_flc_gradcheck_and_empty_batch():
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    for window in FLC_WINDOWS: assert torch.autograd.gradcheck(lambda t: flc_pool(t, window), (x,))
    eq_(tuple(FLCPool()(torch.randn(0, 3, 9, 8)).shape), (0, 3, 5, 4))


def test_flc_bad_arguments():
    with pytest.raises(ArgumentError, match='window'): FLCPool('hann')
    with pytest.raises(ArgumentError, match='4-D'): FLCPool()(torch.randn(3, 8, 8))
    with pytest.raises(ArgumentError, match='real floating'): flc_pool(torch.randn(1, 1, 4, 4, dtype=torch.complex64))
    with pytest.raises(ArgumentError, match='half spectrum'): flc_spectrum(torch.randn(1, 1, 8, 8, dtype=torch.complex64), (8, 8))


# ---------------------------------------------------------------- complex batch norm
def correlated(b=4, c=3, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, n = torch.randn(2, b, c, h, w, generator=g, dtype=torch.float64)
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)[:c, None, None]
    return torch.complex(scale * a + 1, 0.8 * a - 0.4 * n + 3)


def explicit_cbn(z, mean, covar, weight, bias, eps):
    "γ V^(-1/2) (z - μ) + β per channel with V^(-1/2) from an eigendecomposition and γ, β as a 2x2 matrix and a 2-vector."
    out = torch.empty_like(z)
    for c in range(z.shape[1]):
        v = torch.stack([z[:, c].real.flatten(), z[:, c].imag.flatten()]) - mean[c][:, None]
        V = torch.tensor([[covar[c, 0], covar[c, 2]], [covar[c, 2], covar[c, 1]]], dtype=v.dtype) + eps * torch.eye(2, dtype=v.dtype)
        lam, q = torch.linalg.eigh(V)
        g = torch.tensor([[weight[c, 0], weight[c, 2]], [weight[c, 2], weight[c, 1]]], dtype=v.dtype)
        y = g @ (q @ torch.diag(lam.rsqrt()) @ q.T @ v) + bias[c][:, None]
        out[:, c] = torch.complex(y[0], y[1]).view_as(z[:, c])
    return out


def test_inverse_square_root_closed_form():
    torch.manual_seed(0)
    a = torch.randn(20, 2, 2, dtype=torch.float64)
    V = a @ a.transpose(1, 2) + 0.1 * torch.eye(2, dtype=torch.float64)
    rr, ii, ri = inv_sqrt_2x2(V[:, 0, 0], V[:, 1, 1], V[:, 0, 1])
    W = torch.stack([torch.stack([rr, ri], -1), torch.stack([ri, ii], -1)], -2)
    close_(W @ V @ W, torch.eye(2, dtype=torch.float64).expand(20, 2, 2), eps=1e-10)
    close_(W, W.transpose(1, 2), eps=1e-14)


def test_complex_batch_norm_matches_explicit_whitening():
    z = correlated()
    cbn = ComplexBatchNorm2d(3, eps=1e-3).double()
    with torch.no_grad(): cbn.weight.copy_(torch.tensor([[0.9, 0.6, 0.2], [1.1, 0.8, -0.3], [0.7, 0.7, 0.0]])); cbn.bias.normal_()
    mean, covar = complex_moments(z)
    ref = explicit_cbn(z, mean, covar, cbn.weight.detach(), cbn.bias.detach(), 1e-3)
    close_(cbn(z), ref, eps=1e-10)
    r = z.real.transpose(0, 1).flatten(1); i = z.imag.transpose(0, 1).flatten(1)
    close_(mean, torch.stack([r.mean(1), i.mean(1)], 1), eps=1e-12)
    close_(covar[:, 2], ((r - r.mean(1, keepdim=True)) * (i - i.mean(1, keepdim=True))).mean(1), eps=1e-12)


def test_complex_batch_norm_whitens_and_initialises_as_the_paper():
    cbn = ComplexBatchNorm2d(3)
    close_(cbn.weight, torch.tensor([[2 ** -.5, 2 ** -.5, 0.0]] * 3), eps=1e-7)
    eq_(cbn.bias.abs().sum().item(), 0.0)
    eq_(cbn.running_mean.abs().sum().item(), 0.0); eq_(cbn.running_covar.tolist(), [[1.0, 1.0, 0.0]] * 3)
    z = correlated()
    w = complex_normalize(z, *complex_moments(z), eps=0.0)
    m, c = complex_moments(w)
    close_(m, torch.zeros(3, 2, dtype=torch.float64), eps=1e-12)
    close_(c, torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=torch.float64), eps=1e-10)
    close_((cbn.double()(z).abs() ** 2).mean(), torch.tensor(1.0, dtype=torch.float64), eps=1e-3)   # unit mean |.|^2 at init


def test_complex_batch_norm_running_statistics_and_eval():
    z1, z2 = correlated(seed=1), correlated(seed=2) * 2
    cbn = ComplexBatchNorm2d(3, momentum=0.25).double()
    cbn(z1); cbn(z2)
    n = z1.numel() // 3
    want_mean, want_cov = torch.tensor([[0.0, 0.0]] * 3, dtype=torch.float64), torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    for z in (z1, z2):
        m, c = complex_moments(z)
        want_mean, want_cov = 0.75 * want_mean + 0.25 * m, 0.75 * want_cov + 0.25 * c * n / (n - 1)
    close_(cbn.running_mean, want_mean, eps=1e-12); close_(cbn.running_covar, want_cov, eps=1e-12)
    eq_(int(cbn.num_batches_tracked), 2)
    cbn.eval()
    y = cbn(z1)
    close_(y, explicit_cbn(z1, want_mean, want_cov, cbn.weight.detach(), cbn.bias.detach(), cbn.eps), eps=1e-10)
    close_(cbn(z1[:1]), y[:1], eps=1e-12)                                  # eval: no dependence on the batch
    eq_(int(cbn.num_batches_tracked), 2)


def test_complex_batch_norm_cumulative_average_and_no_tracking():
    z1, z2 = correlated(seed=1), correlated(seed=2)
    cbn = ComplexBatchNorm2d(3, momentum=None).double()
    cbn(z1); cbn(z2)
    close_(cbn.running_mean, (complex_moments(z1)[0] + complex_moments(z2)[0]) / 2, eps=1e-12)
    free = ComplexBatchNorm2d(3, track_running_stats=False, affine=False).double().eval()
    assert not hasattr(free, 'running_mean') or free.running_mean is None
    close_(free(z1), complex_normalize(z1, *complex_moments(z1), eps=free.eps), eps=1e-12)   # batch statistics in eval too


@pytest.mark.parametrize('train', [True, False])
def test_complex_batch_norm_gradcheck(train):
    torch.manual_seed(0)
    cbn = ComplexBatchNorm2d(2).double().train(train)
    with torch.no_grad(): cbn.weight.add_(0.1 * torch.randn_like(cbn.weight)); cbn.bias.normal_()
    if not train: cbn.running_covar.copy_(torch.tensor([[1.5, 0.7, 0.3], [0.9, 1.2, -0.2]]))
    z = torch.randn(3, 2, 3, 2, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: complex_normalize(t, *complex_moments(t), w, b), (z, cbn.weight, cbn.bias))
    assert torch.autograd.gradcheck(lambda t: cbn(t), (z,))


def test_complex_batch_norm_bad_input():
    cbn = ComplexBatchNorm2d(3)
    with pytest.raises(ArgumentError, match='complex'): cbn(torch.randn(2, 3, 4, 4))
    with pytest.raises(ArgumentError, match='num_features=3'): cbn(torch.randn(2, 4, 4, 4, dtype=torch.complex64))
    with pytest.raises(ArgumentError, match='more than 1 value'): cbn(torch.randn(1, 3, 1, 1, dtype=torch.complex64))
    with pytest.raises(ArgumentError, match='momentum'): ComplexBatchNorm2d(3, momentum=2.0)
    with pytest.raises(ArgumentError, match='num_features'): ComplexBatchNorm2d(0)


# ---------------------------------------------------------------- the spectral head
@pytest.mark.parametrize('size', [(4, 4), (7, 5), (1, 1), (32, 3), (2, 9)])
def test_frequency_head_equals_spatial_average_pool_and_linear(size):
    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()
    x = torch.randn(3, 6, *size, dtype=torch.float64)
    spatial = lin(nn.AdaptiveAvgPool2d(1)(x).flatten(1))
    head = FrequencyHead(nn.Dropout(0.5), lin).eval()
    close_(head(x), spatial, eps=1e-12)
    close_(head.spectral(torch.fft.rfft2(x), size), spatial, eps=1e-12)
    close_(spectral_avg_pool(x.float()), x.float().mean((-2, -1)), eps=1e-6)
    close_(SpectralAvgPool2d()(x), nn.AdaptiveAvgPool2d(1)(x), eps=1e-12)
    head.train(); torch.manual_seed(5); a = head(x)
    torch.manual_seed(5); b = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), lin).train()(x)
    close_(a, b, eps=1e-12)                                               # same dropout mask on the same pooled vector


def test_spectral_avg_pool_dtypes_and_empty():
    x = torch.randn(2, 3, 5, 6)
    eq_(spectral_avg_pool(x.bfloat16()).dtype, torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16): eq_(spectral_avg_pool(x).dtype, torch.float32)
    eq_(tuple(spectral_avg_pool(torch.randn(0, 3, 4, 4)).shape), (0, 3))


# ---------------------------------------------------------------- FrequencyBlock
def niff_layers():
    torch.manual_seed(0)
    layers = [NIFFDepthwise(6, 'cifar'), NIFFConv2d(6, 4, 'cifar'), NIFFConv2d(6, 8, 'cifar'), NIFFConv2d(6, 4, full=True)]
    for l in layers:
        l.double()
        with torch.no_grad(): l.bias.normal_()
    return layers


@pytest.mark.parametrize('size', [(9, 8), (8, 8), (7, 5), (1, 4)])
def test_frequency_block_equals_its_parts(size):
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    for niff in niff_layers():
        close_(FrequencyBlock(niff)(x), niff(x), eps=1e-12)
        for window in FLC_WINDOWS:
            close_(FrequencyBlock(niff, FLCPool(window))(x), niff(flc_pool(x, window)), eps=1e-12)
        cbn = ComplexBatchNorm2d(niff.out_channels).double()
        if x.numel() // 6 > 1:
            want = torch.fft.irfft2(cbn(torch.fft.rfft2(niff(flc_pool(x)))), s=(flc_size(size[0]), flc_size(size[1])))
            close_(FrequencyBlock(niff, FLCPool(), cbn)(x), want, eps=1e-12)


def test_frequency_block_gradients_precision_and_errors():
    torch.manual_seed(0)
    block = FrequencyBlock(NIFFDepthwise(2, 'cifar'), FLCPool('hamming'), ComplexBatchNorm2d(2)).double()
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block(t), (x,))
    half = FrequencyBlock(NIFFDepthwise(6, 'cifar'), FLCPool())
    eq_(half(torch.randn(2, 6, 8, 8).bfloat16()).dtype, torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16): eq_(half(torch.randn(2, 6, 8, 8)).dtype, torch.float32)
    eq_(tuple(half(torch.randn(0, 6, 9, 8)).shape), (0, 6, 5, 4))
    with pytest.raises(ArgumentError, match='circular'): FrequencyBlock(NIFFDepthwise(4, pad='zeros'))
    with pytest.raises(ArgumentError, match='in_channels=6'): half(torch.randn(1, 5, 8, 8))
    with pytest.raises(ArgumentError, match='FLCPool'): FrequencyBlock(NIFFDepthwise(4), pool=nn.AvgPool2d(2))


# ---------------------------------------------------------------- the Table A9 networks
PAPER_A9 = {'niff': 94.03, 'niff_flc': 93.61, 'niff_cbn': 78.60, 'niff_fhead': 93.82, 'niff_flc_cbn': 79.83,
            'niff_flc_fhead': 93.27, 'niff_cbn_fhead': 73.90, 'niff_flc_cbn_fhead': 55.81}
PARAMS = {'niff': 2_593_760, 'niff_flc': 2_646_320, 'niff_cbn': 2_612_528, 'niff_fhead': 2_593_760,
          'niff_flc_cbn': 2_667_824, 'niff_flc_fhead': 2_646_320, 'niff_cbn_fhead': 2_612_528, 'niff_flc_cbn_fhead': 2_667_824}
DOWNSAMPLING = ['features.4.conv.1.0', 'features.7.conv.1.0', 'features.14.conv.1.0']


def test_table_a9_variants_are_registered_with_the_papers_rows():
    eq_({v: acc for v, (*_, acc) in TABLE_A9.items()}, PAPER_A9)
    eq_(set(FREQ_VARIANTS), set(PAPER_A9) - {'niff'})
    for v in FREQ_VARIANTS:
        assert v in all_variants() and PLUGIN_VARIANTS[v] == 'niff_nb.freqmodules'
    flags = {v: t[:3] for v, t in TABLE_A9.items()}
    eq_(len(set(flags.values())), 8)                                        # every combination once


@pytest.mark.parametrize('variant', list(PARAMS))
def test_variant_parameter_counts(variant):
    eq_(n_params(create_model('mobilenet_v2', variant, 10, stem='cifar', device='meta')), PARAMS[variant])


def test_which_layers_change():
    m = create_model('mobilenet_v2', 'niff_flc_cbn_fhead', 10, stem='cifar', device='meta')
    rep = m.niff_report.replaced
    eq_([r['name'] for r in rep if r['kind'] == 'conv' and r['new'].startswith('FrequencyBlock(FLC')], DOWNSAMPLING)
    for name in DOWNSAMPLING:
        block = m.get_submodule(name)
        assert isinstance(block, FrequencyBlock) and isinstance(block.pool, FLCPool) and isinstance(block.niff, NIFFDepthwise)
        assert isinstance(m.get_submodule(name.rsplit('.', 1)[0] + '.1'), nn.Identity)   # its BatchNorm2d is gone
    blocks = [n for n, mod in m.named_modules() if isinstance(mod, FrequencyBlock)]
    eq_(len(blocks), 18)
    assert all(m.get_submodule(n).norm is not None for n in blocks)
    assert not any(isinstance(mod, (NIFFDepthwise, NIFFConv2d)) and not n.endswith('.niff') and '.niff.' not in n
                   for n, mod in m.named_modules())                         # every NIFF layer sits in a block
    assert isinstance(m, FrequencyHeadNet) and isinstance(m.classifier, FrequencyHead)
    eq_(sum(r['kind'] == 'cbn' for r in rep), 18); eq_(sum(r['kind'] == 'head' for r in rep), 1)
    cbn_only = create_model('mobilenet_v2', 'niff_cbn', 10, stem='cifar', device='meta')
    eq_(sum(isinstance(mod, ComplexBatchNorm2d) for mod in cbn_only.modules()), 15)
    eq_(cbn_only.features[0][0].niff.__class__, NIFFConv2d)                  # the stem's spectrum is normalised too


def test_variant_settings():
    spatial = create_model('mobilenet_v2', 'niff_flc', 10, stem='cifar', variant_kw={'flc_conv': 'spatial'}, device='meta')
    eq_(n_params(spatial), PARAMS['niff'])
    seq = spatial.get_submodule(DOWNSAMPLING[0])
    assert isinstance(seq[0], FLCPool) and isinstance(seq[1], nn.Conv2d) and seq[1].stride == (1, 1)
    asap = create_model('mobilenet_v2', 'niff_flc', 10, stem='cifar', variant_kw={'window': 'hamming'}, device='meta')
    eq_(asap.get_submodule(DOWNSAMPLING[1]).pool.window, 'hamming')
    imnet = create_model('mobilenet_v2', 'niff_flc', 100, device='meta')          # ImageNet stem: stem kept, 4 downsamplings
    flc_rows = [r['name'] for r in imnet.niff_report.rows if r['new'] and r['new'].startswith('FrequencyBlock(FLC')]
    eq_(flc_rows, ['features.2.conv.1.0'] + DOWNSAMPLING)
    eq_(imnet.features[0][0].stride, (2, 2))
    with pytest.raises(ArgumentError, match='MobileNet-v2'): create_model('resnet18', 'niff_cbn', 10, stem='cifar')
    with pytest.raises(ArgumentError, match='unknown setting'):
        create_model('mobilenet_v2', 'niff_flc', 10, stem='cifar', variant_kw={'alpha': 1}, device='meta')
    with pytest.raises(ArgumentError, match='window'):
        create_model('mobilenet_v2', 'niff_flc', 10, stem='cifar', variant_kw={'window': 'box'}, device='meta')


def test_freqmodify_errors_and_other_models():
    with pytest.raises(ArgumentError, match='no circular NIFF'):
        freqmodify(create_model('mobilenet_v2', 'baseline', 10, stem='cifar', device='meta'), cbn=True)
    small = create_model('smallcnn', 'niff', 10, in_channels=1)
    small = freqmodify(small, flc=True, cbn=True, head=True)
    eq_(sum(isinstance(mod, FrequencyBlock) for mod in small.modules()), 5)   # 3 NIFF layers + 2 downsamplings
    assert isinstance(small.pool, SpectralAvgPool2d)
    eq_(tuple(small(torch.randn(2, 1, 28, 28)).shape), (2, 10))


def test_fhead_takes_a_niff_checkpoint_and_gives_the_same_logits():
    torch.manual_seed(0)
    ref = create_model('mobilenet_v2', 'niff', 10, stem='cifar').eval()
    fh = create_model('mobilenet_v2', 'niff_fhead', 10, stem='cifar').eval()
    fh.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): close_(fh(x), ref(x), eps=1e-5)


def test_checkpoint_round_trip():
    torch.manual_seed(0)
    m = create_model('mobilenet_v2', 'niff_flc_cbn', 10, stem='cifar')
    x = torch.randn(2, 3, 32, 32)
    m(x)                                                                      # move the running statistics
    m.eval()
    again = create_model(**{k: v for k, v in m.niff_config.items()})
    again.load_state_dict(m.state_dict())
    again.eval()
    with torch.no_grad(): close_(again(x), m(x), eps=1e-6)


@pytest.mark.parametrize('variant', list(PARAMS))
def test_two_optimiser_steps_lower_the_loss(variant):
    torch.manual_seed(0)
    m = create_model('mobilenet_v2', variant, 10, stem='cifar')
    m.classifier[0].p = 0.0                                                   # no dropout noise in a two-step check
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(2):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    with torch.no_grad(): losses.append(nn.functional.cross_entropy(m(x), y).item())
    assert all(math.isfinite(l) for l in losses), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_half_precision_at_odd_sizes():
    "cuFFT half precision needs power-of-two sizes: the modules run their FFTs in float32 and return the input dtype."
    x = torch.randn(2, 6, 7, 9, device='cuda')
    for dtype in (torch.float16, torch.bfloat16):
        eq_(flc_pool(x.to(dtype)).dtype, dtype)
    block = FrequencyBlock(NIFFDepthwise(6, 'cifar'), FLCPool('hamming'), ComplexBatchNorm2d(6)).cuda()
    with torch.autocast('cuda', dtype=torch.float16):
        y = block(x)
    eq_(y.dtype, torch.float32); assert torch.isfinite(y).all()
    m = create_model('mobilenet_v2', 'niff_flc_cbn_fhead', 10, stem='cifar', device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = m(torch.randn(4, 3, 32, 32, device='cuda')).float().logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(loss)

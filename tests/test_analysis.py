"""Kernel analysis: exact kernel-mass cases, effective size, PCA on planted components, kernels at trained sizes."""
import pytest
import torch
import torch.nn as nn

from niff_nb.analysis import (default_window_sizes, effective_kernel_size, eigen_kernels, kernel_mass_ratio,
                              kernel_mass_table, niff_layers, spatial_kernels)
from niff_nb.layers import NIFFConv2d, NIFFDepthwise

SIZES = [(7, 7), (8, 8), (9, 12), (16, 5), (1, 6), (5, 1)]
EPS32 = torch.finfo(torch.float32).eps


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
    # float32 sums of up to h*w equal terms: each sum is off by at most h*w*eps of itself (gamma_n), the ratio by twice that
    assert torch.allclose(r, expected, rtol=0, atol=(2 * h * w + 1) * EPS32)
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
    ref = model[1].depthwise.spatial_kernel(20, 14)
    assert (ks['1'] - ref).abs().max() <= 4 * EPS32 * ref.abs().max()     # the same computation (float32 rounding at most)
    assert model.training                                         # the analysis restored the mode


def test_kernel_mass_table_fields():
    ks = {'a': torch.randn(6, 9, 9), 'b': torch.randn(4, 5, 7)}
    t = kernel_mass_table(ks)
    assert t['a']['windows'] == [1, 3, 5, 7, 9] and len(t['a']['kmr_mean']) == 5 and t['b']['size'] == [5, 7]
    assert all(1 <= row['effective_size_median'] <= 9 for row in t.values())


# --- frequency weights, Gaussian shape, ERF, to_spatial, niff_analyze -------------------------------------------------
import json
import subprocess
import sys

import torch.nn.functional as F

from niff_nb.analysis import (effective_receptive_field, eigen_filters, erf_size, fit_gaussian, frequency_weights,
                              kernel_spectrum, odd_window, shape_table, spatial_layer, to_spatial)
from niff_nb.convert import create_model


def _perturb(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize('h,w', [(7, 7), (8, 10), (9, 12), (16, 5)])
def test_kernel_spectrum_matches_the_layer_filter_and_splits_even_odd(h, w):
    torch.manual_seed(0)
    layer = _perturb(NIFFDepthwise(3, 'small').double())
    spec = torch.fft.ifftshift(kernel_spectrum(layer.spatial_kernel(h, w)), dim=(-2, -1))
    inner = slice(1, (w - 1) // 2 + 1)     # columns irfft2 uses as they are (not the zero / Nyquist column)
    assert torch.allclose(spec[..., inner], layer.filter(h, w)[..., inner], atol=1e-10)
    k = torch.randn(h, w, dtype=torch.float64)
    even = 0.5 * (k + torch.fft.fftshift(torch.roll(torch.flip(torch.fft.ifftshift(k), (0, 1)), (1, 1), (0, 1))))
    assert kernel_spectrum(even).imag.abs().max() < 1e-10
    assert kernel_spectrum(torch.zeros(0, h, w, dtype=torch.float64)).shape == (0, h, w)         # no kernels, no spectra


def test_frequency_weight_pca_recovers_planted_real_and_imaginary_components():
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.arange(12.) - 6, torch.arange(12.) - 6, indexing='ij')
    re = torch.exp(-(xx ** 2 + yy ** 2) / 8); re /= re.norm()
    im = torch.sin(xx / 3) * torch.exp(-(yy ** 2) / 10); im /= im.norm()
    c = torch.randn(200, 2, generator=g) * 3
    w = torch.complex(c[:, :1, None] * re, c[:, 1:, None] * im) + 0.001 * torch.randn(200, 12, 12, dtype=torch.complex64, generator=g)
    pca = eigen_filters(w, 2)
    assert abs((pca['real'][0][0] * re).sum()) > 0.99 and abs((pca['imag'][0][0] * im).sum()) > 0.99
    zero_imag = eigen_filters(torch.complex(torch.randn(5, 4, 4), torch.zeros(5, 4, 4)), 3)['imag']
    assert zero_imag[1].abs().sum() == 0                       # nothing varies: zero variance, no NaNs
    with pytest.raises(ValueError, match='complex'): eigen_filters(torch.randn(5, 4, 4))


def test_frequency_weights_per_layer_at_feature_map_size():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), NIFFConv2d(4, 4, 'cifar'), nn.Conv2d(4, 4, 3, 2, 1), NIFFDepthwise(4, 'small'))
    wts = frequency_weights(model, (12, 9))
    assert {k: tuple(v.shape) for k, v in wts.items()} == {'1': (4, 12, 9), '3': (4, 6, 5)} and all(v.is_complex() for v in wts.values())


@pytest.mark.parametrize('h,w', [(21, 21), (15, 25), (9, 9)])
def test_gaussian_fit_recovers_planted_sigmas_within_5_percent(h, w):
    g = torch.Generator().manual_seed(h * w)
    n = 40
    top = min(h, w) / 5
    sy, sx = 0.7 + (top - 0.7) * torch.rand(n, generator=g), 0.7 + (top - 0.7) * torch.rand(n, generator=g)
    off = torch.rand(n, 2, generator=g) - 0.5
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2., torch.arange(w) - w // 2., indexing='ij')
    k = torch.exp(-0.5 * (((yy - off[:, :1, None]) / sy[:, None, None]) ** 2 + ((xx - off[:, 1:, None]) / sx[:, None, None]) ** 2))
    k = -3.0 * k + 0.005 * torch.randn(n, h, w, generator=g)
    fit = fit_gaussian(k)
    assert ((fit['sigma_y'] / sy - 1).abs().max() < 0.05) and ((fit['sigma_x'] / sx - 1).abs().max() < 0.05)
    table = shape_table({'layer': k})['layer']
    assert table['ratio_mean'] == pytest.approx((fit['sigma_x'] / fit['sigma_y']).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match='kernels must be'): fit_gaussian(torch.randn(5, 5))


def test_erf_of_stacked_convolutions_is_exact():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(3, 1, 3, padding=1, bias=False))
    nn.init.constant_(net[0].weight, 0.1); nn.init.constant_(net[2].weight, 0.2)
    net.double()                                                        # float64 gradients: only the float32 result rounds
    erf = effective_receptive_field(net, torch.ones(4, 2, 11, 13, dtype=torch.float64))   # positive inputs: ReLU passes all
    tri = torch.tensor([1., 2, 3, 2, 1])
    expected = torch.zeros(11, 13); expected[3:8, 4:9] = torch.outer(tri, tri) / 81
    assert erf.dtype == torch.float32
    assert torch.allclose(erf, expected, rtol=0, atol=2 * EPS32 * expected.max())      # both rounded once to float32
    assert erf_size(erf, 0.9) == 5 and erf_size(erf, 0.99) == 5 and erf_size(erf, 0.1) == 1
    with pytest.raises(ValueError, match='layer must name'): effective_receptive_field(net, torch.ones(1, 2, 5, 5), layer='nope')
    assert net.training


def test_erf_of_a_classifier_uses_the_last_feature_map():
    torch.manual_seed(0)
    base = create_model('smallcnn', 'baseline', 10, in_channels=1)
    erf = effective_receptive_field(base, input_size=28, n=4)
    assert erf.shape == (28, 28) and erf.sum().item() == pytest.approx(1.0, abs=erf.numel() * EPS32)   # a float32 sum of 784
    uniform = torch.full((28, 28), 1 / 784.)
    assert erf_size(uniform, 0.9) >= 27


def _niff_toy(boundary='circular', dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), NIFFConv2d(6, 6, 'cifar', boundary=boundary), nn.ReLU(),
                      NIFFConv2d(6, 4, 'cifar', boundary=boundary),                 # 1x1 in frequency (out < in)
                      nn.Conv2d(4, 4, 3, 2, 1), NIFFConv2d(4, 3, full=True, mlp='small', boundary=boundary),
                      NIFFDepthwise(3, 'small', boundary=boundary))
    return _perturb(m.to(dtype)).eval()


@pytest.mark.parametrize('boundary', ['circular', 'linear'])
@pytest.mark.parametrize('hw', [(16, 16), (15, 11), (9, 14)])
def test_to_spatial_full_size_equals_the_niff_model(boundary, hw):
    model = _niff_toy(boundary)
    x = torch.randn(3, 2, *hw, dtype=torch.float64)
    spatial = to_spatial(model, 'full', hw)
    assert not any(isinstance(m, (NIFFConv2d, NIFFDepthwise)) for m in spatial.modules())
    assert torch.allclose(spatial(x), model(x), atol=1e-10, rtol=0)
    h2, w2 = (hw[0] + 1) // 2, (hw[1] + 1) // 2
    full = lambda n: n + 1 - n % 2
    assert spatial.spatial_windows == {'1': (full(hw[0]), full(hw[1])), '3': (full(hw[0]), full(hw[1])),
                                       '5': (full(h2), full(w2)), '6': (full(h2), full(w2))}
    assert spatial[5].padding_mode == ('circular' if boundary == 'circular' else 'zeros')


def test_to_spatial_equality_on_a_created_float32_model():
    model = _perturb(create_model('smallcnn', 'niff', 10, in_channels=1, input_size=28), 0.1).eval()
    x = torch.randn(4, 1, 28, 28)
    spatial = to_spatial(model, 'full')                  # input size from model.niff_config
    with torch.no_grad(): y, y_spatial = model(x), spatial(x)
    # float32: FFTs of 28x28 maps against sums over up to 29x29 taps; both round at a few eps of the output (measured: < 1 eps)
    assert (y_spatial - y).abs().max() <= 2 ** 8 * EPS32 * y.abs().max()
    small = to_spatial(model, 3)
    assert set(small.spatial_windows.values()) == {(3, 3)}
    eff = to_spatial(model, 'effective')
    assert all(s[0] % 2 == 1 for s in eff.spatial_windows.values())
    mixed = to_spatial(model, {'stage1.0': 5})
    assert mixed.spatial_windows['stage1.0'] == (5, 5) and mixed.spatial_windows['stage3.0'] == (7, 7)
    assert model.training is False and isinstance(model.stage1[0], NIFFConv2d)       # the original is untouched


def test_cropping_keeps_the_centre_of_the_kernel():
    k = torch.arange(7 * 8.).reshape(7, 8)
    w = odd_window(k, 3, 5)
    assert torch.equal(w, k[2:5, 2:7])
    big = odd_window(k, 9, 9)
    assert torch.equal(big[1:8, 0:8], k) and big[0].abs().sum() == 0 and big[:, 8].abs().sum() == 0
    layer = _perturb(NIFFDepthwise(2, 'small').double())
    conv = spatial_layer(layer, (8, 8), 3, padding_mode='zeros')
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    ref = F.conv2d(x, odd_window(layer.spatial_kernel(8, 8), 3, 3).flip(-2, -1)[:, None], layer.bias, padding=1, groups=2)
    assert torch.allclose(conv(x), ref)


def test_to_spatial_errors_name_the_argument():
    model = _niff_toy()
    with pytest.raises(ValueError, match='odd'): to_spatial(model, 4, 16)
    with pytest.raises(ValueError, match='unknown NIFF layers'): to_spatial(model, {'nope': 3}, 16)
    with pytest.raises(ValueError, match='input_size'): to_spatial(model, 'full')
    with pytest.raises(ValueError, match='padding_mode'): to_spatial(model, 3, 16, padding_mode='mirror')
    with pytest.raises(ValueError, match="pad='reflect'"): spatial_layer(NIFFDepthwise(2, 'small', pad='reflect'), (8, 8))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    from niff_nb.data import DatasetNotFoundError
    from niff_nb.train import fit, recipe
    out = tmp_path_factory.mktemp('run') / 'niff'
    cfg = recipe('fashion-mnist-quick', out=str(out), epochs=1, subset=512, test_subset=256, progress=False, device='cpu')
    try: fit(cfg)
    except DatasetNotFoundError: pytest.skip('Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')
    return out / 'last.pt'


def test_niff_analyze_writes_figures_and_json(tiny_run, tmp_path):
    r = subprocess.run([sys.executable, '-c', 'from niff_nb.analysis import niff_analyze; niff_analyze()', str(tiny_run),
                        '--out', str(tmp_path / 'an')], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / 'an' / 'analysis.json').read_text())
    assert sorted(summary['figures']) == sorted(p.name for p in (tmp_path / 'an').glob('*.png'))
    assert {'kernel_mass.png', 'eigen_kernels.png', 'eigen_filters.png', 'shape.png', 'erf.png'} <= set(summary['figures'])
    assert list(summary['layers']) == ['stage1.0', 'stage2.0', 'stage3.0']
    row = summary['layers']['stage1.0']
    assert row['size'] == [28, 28] and row['effective_size_median'] % 2 == 1 and row['ratio_mean'] > 0
    c = summary['to_spatial']
    assert c['n_test'] == 256 and c['full_size_max_rel_diff'] <= 2 ** 8 * EPS32 and 0 <= c['acc_effective'] <= 1
    assert summary['erf']['inputs'] == 'images'
    assert 'stage1.0' in r.stdout and 'to_spatial' in r.stdout


def test_niff_analyze_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, '-c', 'from niff_nb.analysis import niff_analyze; niff_analyze()', *a],
                                    capture_output=True, text=True, timeout=300)
    r = run(str(tmp_path / 'missing.pt'))
    assert r.returncode == 1 and 'niff_analyze: error' in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'bad.pt').write_bytes(b'not a checkpoint')
    r = run(str(tmp_path / 'bad.pt'))
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    r = run(str(tmp_path / 'bad.pt'), '--mass', '2')
    assert r.returncode == 2 and '--mass' in r.stderr

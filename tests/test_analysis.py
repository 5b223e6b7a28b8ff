"""Kernel analysis: exact kernel-mass cases, effective size, PCA on planted components, kernels at trained sizes."""
import pytest
import torch
import torch.nn as nn

from niff_nb.analysis import (default_window_sizes, effective_kernel_size, eigen_kernels, kernel_mass_ratio,
                              kernel_mass_table, niff_layers, spatial_kernels)
from niff_nb.layers import NIFFConv2d, NIFFDepthwise
from niff_nb.train import load_checkpoint, save_checkpoint

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
    r = subprocess.run([sys.executable, '-c', 'from niff_nb.analyze import niff_analyze; niff_analyze()', str(tiny_run),
                        '--out', str(tmp_path / 'an')], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / 'an' / 'analysis.json').read_text())
    assert sorted(summary['figures']) == sorted(p.name for p in (tmp_path / 'an').glob('*.png'))
    assert {'kernel_mass.png', 'kernel_mass_official.png', 'eigen_kernels.png', 'eigen_kernels_init.png', 'eigen_filters.png',
            'shape.png', 'erf.png', 'crop_sweep.png'} <= set(summary['figures'])
    assert list(summary['layers']) == ['stage1.0', 'stage2.0', 'stage3.0']
    row = summary['layers']['stage1.0']
    assert row['size'] == [28, 28] and row['effective_size_median'] % 2 == 1 and row['ratio_mean'] > 0
    c = summary['to_spatial']
    assert c['n_test'] == 256 and c['full_size_max_rel_diff'] <= 2 ** 8 * EPS32 and 0 <= c['acc_effective'] <= 1
    assert summary['erf']['inputs'] == 'images'
    init = summary['init']                                          # the control: the same structure, epoch 0
    assert init['epoch'] == 0 and list(init['layers']) == list(summary['layers'])
    assert set(init['layers']['stage1.0']) == set(row) and set(init['official_kmr']) == set(summary['official_kmr'])
    assert [r['window'] for r in summary['crop_sweep']][-1] == 'full' and summary['smallest_crop']['window'] is not None
    full = summary['crop_sweep'][-1]['test_acc']
    assert full == pytest.approx(c['acc_niff'], abs=1 / 256 + 1e-9)
    assert 'stage1.0' in r.stdout and 'to_spatial' in r.stdout and "this project's metric" in r.stdout
    assert 'crop sweep' in r.stdout and '→' in r.stdout


def test_niff_analyze_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, '-c', 'from niff_nb.analyze import niff_analyze; niff_analyze()', *a],
                                    capture_output=True, text=True, timeout=300)
    r = run(str(tmp_path / 'missing.pt'))
    assert r.returncode == 1 and 'niff_analyze: error' in r.stderr and 'Traceback' not in r.stderr
    (tmp_path / 'bad.pt').write_bytes(b'not a checkpoint')
    r = run(str(tmp_path / 'bad.pt'))
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    r = run(str(tmp_path / 'bad.pt'), '--mass', '2')
    assert r.returncode == 2 and '--mass' in r.stderr


def test_niff_analyze_names_a_layer_with_nonfinite_kernels(tiny_run, tmp_path):
    ckpt = load_checkpoint(tiny_run)
    key = next(k for k in ckpt['model'] if k.startswith('stage2.0.') and k.endswith('real.0.weight'))
    ckpt['model'][key] = torch.full_like(ckpt['model'][key], float('nan'))
    save_checkpoint(tmp_path / 'nan.pt', ckpt)                 # a valid checkpoint (digest included) of a broken model
    r = subprocess.run([sys.executable, '-c', 'from niff_nb.analyze import niff_analyze; niff_analyze()', str(tmp_path / 'nan.pt'),
                        '--out', str(tmp_path / 'an'), '--no-crop'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert "'stage2.0'" in r.stderr and 'NaN or inf' in r.stderr and "'stage1.0'" not in r.stderr
    assert not (tmp_path / 'an' / 'analysis.json').exists()


# --- two kernel-mass conventions, undefined kernels, the control at initialisation, the crop sweep ----------------------
import math

from niff_nb.analysis import NonFiniteKernelError, analyse_model, mass_at, stage_groups, stage_kernels
from niff_nb.analyze import crop_sweep, crop_windows, initial_model, smallest_crop


def _official_loop(k):
    "The official notebook's loop, literally: windows [c-i, c+i) for i < N/2, then 1 for the whole kernel."
    c = int(k.size()[1] / 2)
    total = k.abs().sum((1, 2))
    return torch.tensor([(k[:, c - i:c + i, c - i:c + i].abs().sum((1, 2)) / total).mean().item() for i in range(c)] + [1.0])


@pytest.mark.parametrize('n', [56, 28, 14, 8, 7])
def test_official_convention_matches_the_official_notebook(n):
    g = torch.Generator().manual_seed(n)
    k = torch.randn(12, n, n, generator=g) * torch.exp(-torch.arange(n * n, dtype=torch.float32).reshape(n, n) / n)
    ours = kernel_mass_ratio(k, convention='official').mean(0)
    assert default_window_sizes(n, n, 'official') == [2 * i for i in range(n // 2)] + [n]
    assert torch.allclose(ours, _official_loop(k), atol=1e-6)


@pytest.mark.parametrize('h,w', [(28, 28), (14, 14), (7, 7), (9, 12)])
def test_official_windows_sit_between_centred_ones(h, w):
    k = torch.randn(20, h, w, generator=torch.Generator().manual_seed(h * w))
    off, cen = kernel_mass_ratio(k, convention='official'), kernel_mass_ratio(k)
    n = len(default_window_sizes(h, w, 'official')) - 1          # the even windows, without the whole-kernel point
    assert (off[:, :n] <= cen[:, :n] + 1e-6).all()                # side 2i inside side 2i+1
    assert (cen[:, :n - 1] <= off[:, 1:n] + 1e-6).all()           # side 2i+1 inside side 2i+2
    assert off[:, 0].abs().max() == 0 and torch.allclose(off[:, -1], torch.ones(20))
    with pytest.raises(ValueError, match='even'): kernel_mass_ratio(k, [3], convention='official')
    with pytest.raises(ValueError, match='convention'): kernel_mass_ratio(k, convention='paper')


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_nonfinite_kernels_have_no_size(bad):
    k = torch.zeros(3, 9, 9); k[:, 4, 4] = 1.0
    k[1, 0, 0] = bad                       # one corrupted value far from the centre
    k[2] = bad
    eff = effective_kernel_size(k)
    assert eff[0].item() == 1 and eff[1:].isnan().all()
    assert kernel_mass_ratio(k)[1:].isnan().all() and kernel_mass_ratio(k, convention='official')[1:].isnan().all()
    assert effective_kernel_size(torch.zeros(9, 9)).isnan()          # no mass: no size either


def test_kernel_mass_table_reports_nan_for_a_nonfinite_layer():
    good = torch.randn(4, 9, 9)
    bad = good.clone(); bad[2, 1, 1] = float('nan')
    t = kernel_mass_table({'good': good, 'bad': bad})
    assert isinstance(t['good']['effective_size_median'], int) and t['good']['n_nonfinite'] == 0
    assert t['bad']['n_nonfinite'] == 1
    assert math.isnan(t['bad']['effective_size_median']) and math.isnan(t['bad']['effective_size_p90'])
    assert all(math.isnan(v) for v in t['bad']['kmr_mean'])
    zero = good.clone(); zero[0] = 0
    tz = kernel_mass_table({'z': zero})['z']
    assert tz['n_zero'] == 1 and tz['kmr_mean'] == pytest.approx(kernel_mass_table({'z': good[1:]})['z']['kmr_mean'])


def test_analyse_model_names_the_nonfinite_layer():
    model = create_model('smallcnn', 'niff', 10, in_channels=1, input_size=28)
    with torch.no_grad(): model.stage2[0].depthwise.implicit.real[-1].bias[3] = float('nan')
    with pytest.raises(NonFiniteKernelError, match="'stage2.0'"): analyse_model(model, 28, 1)


def test_stage_pooling_as_the_official_notebook():
    ks = {'layer1.0.conv2': torch.randn(3, 8, 8), 'layer1.1.conv2': torch.randn(3, 8, 8), 'layer2.0.conv2': torch.randn(5, 4, 4),
          'layer2.1.conv2': torch.randn(5, 4, 4), 'layer2.2.conv2': torch.randn(5, 4, 4), 'fc': torch.randn(2, 4, 4)}
    assert stage_groups(ks, True) == {'layer1': ['layer1.1.conv2'], 'layer2': ['layer2.1.conv2', 'layer2.2.conv2'], 'fc': ['fc']}
    pooled = stage_kernels(ks, skip_first_block=True)
    assert torch.equal(pooled['layer2'], torch.cat([ks['layer2.1.conv2'], ks['layer2.2.conv2']]))
    assert {k: v.shape[0] for k, v in stage_kernels(ks).items()} == {'layer1': 6, 'layer2': 15, 'fc': 2}
    t = kernel_mass_table(pooled, convention='official')
    assert t['layer1']['windows'] == [0, 2, 4, 6, 8] and t['layer1']['plotted_at'] == [1, 3, 5, 7, 9]
    assert mass_at(t['layer1'], 3) == t['layer1']['kmr_mean'][1] and mass_at(t['layer2'], 7) == 1.0
    with pytest.raises(ValueError, match='different sizes'): stage_kernels({'a.1': torch.randn(1, 4, 4), 'a.2': torch.randn(1, 5, 5)})


def test_initial_model_is_what_fit_started_from(tmp_path, monkeypatch):
    import niff_nb.train as train
    from niff_nb.data import DatasetNotFoundError
    started = {}
    real_build = train.build_model
    def recording_build(cfg):
        m = real_build(cfg)
        started.update({k: v.clone() for k, v in m.state_dict().items()})
        return m
    monkeypatch.setattr(train, 'build_model', recording_build)
    cfg = train.recipe('fashion-mnist-quick', out=str(tmp_path / 'run'), epochs=1, subset=256, test_subset=128, progress=False,
                       device='cpu', seed=7)
    try: train.fit(cfg)
    except DatasetNotFoundError: pytest.skip('Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')
    torch.manual_seed(99); expected = torch.rand(3)
    torch.manual_seed(99)
    model, ckpt = initial_model(tmp_path / 'run' / 'last.pt')
    assert torch.equal(torch.rand(3), expected)                     # the caller's random state is untouched
    sd = model.state_dict()
    assert started and set(sd) == set(started) and all(torch.equal(sd[k], started[k]) for k in sd)
    trained = ckpt['model']
    assert any(not torch.equal(trained[k], started[k]) for k in sd)  # and training did move the weights


def test_crop_sweep_windows_and_smallest_crop():
    torch.manual_seed(0)
    clf = create_model('smallcnn', 'niff', 10, in_channels=1, input_size=28).eval()
    with torch.no_grad():
        clf.fc.bias.zero_()
        batches = [(x, clf(x).argmax(1)) for x in torch.randn(2, 32, 1, 28, 28, generator=torch.Generator().manual_seed(1))]
    assert crop_windows(clf, 28) == [3, 5, 7, 9, 13, 17, 21, 25, 'full']
    sweep = crop_sweep(clf, batches, input_size=28, windows=[3, 9, 'full'])
    assert [r['window'] for r in sweep] == [3, 9, 'full'] and all(set(r) == {'window', 'test_acc'} for r in sweep)
    assert sweep[-1]['test_acc'] == 1.0 and sweep[0]['test_acc'] < 1.0
    fake = [{'window': 3, 'test_acc': 0.5}, {'window': 5, 'test_acc': 0.896}, {'window': 7, 'test_acc': 0.9},
            {'window': 'full', 'test_acc': 0.9}]
    best = smallest_crop(fake, 0.9)
    assert best['window'] == 5 and best['all_larger_within'] and best['reference_acc'] == 0.9
    assert smallest_crop(fake, 0.9, tolerance=0.001)['window'] == 7
    assert smallest_crop([{'window': 3, 'test_acc': 0.1}], 0.9)['window'] is None


@pytest.mark.parametrize('device,match', [('tpu', "device='tpu' is not a device"), ('cuda:0' if not torch.cuda.is_available() else 'cuda:99', 'cuda')])
def test_niff_analyze_checks_the_device_before_reading_the_checkpoint(tmp_path, device, match, capsys):
    from niff_nb.analyze import niff_analyze
    with pytest.raises(SystemExit) as e:
        niff_analyze([str(tmp_path / 'missing.pt'), '--device', device, '--out', str(tmp_path / 'an')])
    assert e.value.code == 2 and match in capsys.readouterr().err and not (tmp_path / 'an').exists()


def test_the_run_analysis_still_imports_from_its_old_home():
    import niff_nb.analysis as old, niff_nb.analyze as new
    for name in old._MOVED: assert getattr(old, name) is getattr(new, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"): old.nope

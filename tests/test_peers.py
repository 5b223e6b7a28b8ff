"""Peers (OctaveConv, FFC, GFNet global filter): shapes at odd sizes, float64 gradients, exact special cases, filter
interpolation, the cost table, create_model variants (train a step, rebuild from a checkpoint, CLI) and bad arguments."""
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastcore.test import test_close as close_
from fastcore.test import test_eq as eq_

from niff_nb.convert import PLUGIN_VARIANTS, VARIANTS, all_variants, create_model, n_params, variant_settings
from niff_nb.peers import (FFC, FFC2d, OCTAVE_ALPHAS, OCTAVE_TABLE1, PEER_VARIANTS, FourierUnit, GlobalFilter,
                           GlobalFilterConv, OctaveConv, OctaveConv2d, interpolate_filter, low_size, octave_cost_table,
                           octave_pool, octave_upsample, peerify)

SIZES = [(7, 7), (8, 8), (9, 9), (15, 15), (1, 5), (6, 1), (1, 1), (9, 4), (28, 28)]
FMNIST = Path('/usr/share/datasets/fashion-mnist')
needs_fmnist = pytest.mark.skipif(not (FMNIST / 'train-images-idx3-ubyte.gz').exists(),
                                  reason='needs Debian dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)')


def layers(cin=6, cout=5):
    return {'octave': OctaveConv2d(cin, cout, 3, alpha=0.5), 'octave_low': OctaveConv2d(cin, cout, 3, alpha=1.0),
            'ffc': FFC2d(cin, cout, 3, ratio=0.5), 'ffc_global': FFC2d(cin, cout, 3, ratio=1.0),
            'gfnet': GlobalFilterConv(cin, cout, (8, 8))}


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize('size', SIZES)
def test_single_tensor_layers_keep_shape_at_any_size(size):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *size)
    for name, m in layers().items():
        y = m(x)
        eq_((name, tuple(y.shape)), (name, (2, 5, *size)))
        assert torch.isfinite(y).all(), name


@pytest.mark.parametrize('size', [(7, 7), (15, 9), (1, 3), (8, 6)])
@pytest.mark.parametrize('alpha_in,alpha_out', [(0.5, 0.5), (0.25, 0.75), (0.0, 0.5), (1.0, 0.0), (0.5, 1.0)])
def test_octave_pair_interface_shapes(size, alpha_in, alpha_out):
    oc = OctaveConv(8, 8, 3, alpha_in, alpha_out)
    x_h = torch.randn(1, oc.in_h, *size) if oc.in_h else None
    x_l = torch.randn(1, oc.in_l, *low_size(size)) if oc.in_l else None
    y_h, y_l = oc(x_h, x_l, size=size)
    eq_(None if y_h is None else tuple(y_h.shape), (1, oc.out_h, *size) if oc.out_h else None)
    eq_(None if y_l is None else tuple(y_l.shape), (1, oc.out_l, *low_size(size)) if oc.out_l else None)


def test_octave_pair_interface_errors():
    oc = OctaveConv(8, 8, 3, 0.5)
    with pytest.raises(ValueError, match='x_l must be'): oc(torch.randn(1, 4, 7, 7), torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match='expects x_h'): oc(torch.randn(1, 4, 7, 7), None)
    with pytest.raises(ValueError, match='size='): OctaveConv(8, 8, 3, 1.0)(None, torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize('n', [1, 2, 5, 7, 8, 15, 16])
def test_pool_and_upsample_tile_exactly(n):
    x = torch.randn(1, 1, n, n + 2, dtype=torch.float64)
    p = octave_pool(x)
    eq_(tuple(p.shape[-2:]), low_size((n, n + 2)))
    up = octave_upsample(p, (n, n + 2))
    # each pixel gets the mean of its own 2x2 (or partial) window
    rows, cols = torch.arange(n) // 2, torch.arange(n + 2) // 2
    eq_(torch.equal(up[0, 0], p[0, 0][rows][:, cols]), True)
    close_(p[0, 0, -1, -1], x[0, 0, 2 * ((n - 1) // 2):, 2 * ((n + 1) // 2):].mean(), eps=1e-12)


# ---------------------------------------------------------------- exact special cases
def test_octave_alpha0_is_a_plain_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=True).double()
    oc = OctaveConv2d(6, 5, 3, alpha=0.0, bias=True).double()
    eq_([oc.octave.l2l, oc.octave.h2l, oc.octave.l2h], [None, None, None])
    with torch.no_grad(): oc.octave.h2h.weight.copy_(conv.weight); oc.octave.bias_h.copy_(conv.bias)
    for size in [(7, 7), (9, 4), (1, 1)]:
        x = torch.randn(2, 6, *size, dtype=torch.float64)
        close_(oc(x), conv(x), eps=1e-12)


def test_octave_alpha1_is_all_low():
    torch.manual_seed(0)
    oc = OctaveConv2d(6, 5, 3, alpha=1.0).double()
    eq_([oc.octave.h2h, oc.octave.h2l, oc.octave.l2h, oc.octave.in_h, oc.octave.out_h], [None, None, None, 0, 0])
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    y = oc(x)
    close_(y, octave_upsample(oc.octave.l2l(octave_pool(x)), (9, 7)), eps=1e-12)
    eq_(torch.equal(y[..., 0:2, 0:2], y[..., 0:1, 0:1].expand(-1, -1, 2, 2)), True)      # constant over each 2x2 tile


def test_octave_four_paths_match_the_definition():
    torch.manual_seed(0)
    oc = OctaveConv(8, 6, 3, 0.5).double()
    x_h, x_l = torch.randn(1, 4, 9, 9, dtype=torch.float64), torch.randn(1, 4, 5, 5, dtype=torch.float64)
    y_h, y_l = oc(x_h, x_l)
    o = oc
    close_(y_h, o.h2h(x_h) + F.interpolate(o.l2h(x_l), size=(9, 9), mode='nearest'), eps=1e-12)
    close_(y_l, o.l2l(x_l) + o.h2l(F.avg_pool2d(x_h, 2, 2, ceil_mode=True)), eps=1e-12)


@pytest.mark.parametrize('alpha', [0, 0.125, 0.5, 0.9, 1])
def test_octave_keeps_the_parameter_count(alpha):
    eq_(n_params(OctaveConv2d(16, 24, 3, alpha)), 16 * 24 * 9)


def test_ffc_ratio0_is_the_local_conv():
    torch.manual_seed(0)
    f = FFC2d(6, 5, 3, ratio=0.0).double()
    eq_([f.ffc.l2g, f.ffc.g2l, f.ffc.g2g], [None, None, None])
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64)
    close_(f(x), F.conv2d(x, f.ffc.l2l.weight, padding=1), eps=1e-12)


def test_ffc_global_path_reaches_across_the_image_and_local_path_does_not():
    torch.manual_seed(0)
    f = FFC2d(8, 8, 3, ratio=0.5).eval()
    v = torch.randn(8)
    d = []
    for sign in (1, -1):            # one of the two signs passes the ReLU after the 1x1 reduction
        x0 = torch.zeros(1, 8, 15, 15); x1 = x0.clone(); x1[0, :, 7, 0] = sign * v
        with torch.no_grad(): d.append((f(x1) - f(x0))[0, :, 7, 7].abs())     # 7 pixels away: the farthest on a 15-circle
    d = torch.stack(d).amax(0)
    assert d[f.ffc.out_l:].max() > 1e-4, d             # global outputs see it
    eq_(d[:f.ffc.out_l].max().item(), 0)               # local outputs (3x3 convs of both groups) cannot


def test_fourier_unit_is_real_and_sized():
    fu = FourierUnit(3, 4)
    for size in [(7, 7), (8, 5), (1, 4)]:
        y = fu(torch.randn(2, 3, *size))
        eq_(tuple(y.shape), (2, 4, *size)); eq_(y.dtype, torch.float32)


# ---------------------------------------------------------------- gradients
def test_gradcheck_octave():
    torch.manual_seed(0)
    m = OctaveConv2d(2, 2, 3, alpha=0.5, bias=True).double()
    x = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    names = [n for n, _ in m.named_parameters()]                # and with respect to all four paths' weights and biases
    ps = tuple(p.detach().clone().requires_grad_(True) for _, p in m.named_parameters())
    f = lambda *ps: torch.func.functional_call(m, dict(zip(names, ps)), (x.detach(),))
    assert torch.autograd.gradcheck(f, ps)


def test_gradcheck_ffc():
    torch.manual_seed(0)
    m = FFC2d(2, 2, 3, ratio=0.5).double().eval()          # eval: batch norm with running statistics, a fixed function
    x = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_gradcheck_global_filter_with_interpolation():
    torch.manual_seed(0)
    m = GlobalFilter(2, (5, 4), std=0.3).double()
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)      # a size it was not built for
    assert torch.autograd.gradcheck(m, (x,))
    w = m.weight.detach().clone().requires_grad_(True)
    def f(w):
        filt = interpolate_filter(torch.view_as_complex(w), (5, 4), (7, 6))
        return torch.fft.irfft2(torch.fft.rfft2(x.detach()) * filt, s=(7, 6))
    assert torch.autograd.gradcheck(f, (w,))


@pytest.mark.parametrize('name', ['octave', 'octave_low', 'ffc', 'ffc_global', 'gfnet'])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    m = layers()[name]
    m(torch.randn(2, 6, 9, 7)).square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    eq_(missing, [])


# ---------------------------------------------------------------- GFNet filter interpolation
def _gauss(size, sigma=0.12):
    fy, fx = torch.fft.fftfreq(size[0], dtype=torch.float64), torch.fft.rfftfreq(size[1], dtype=torch.float64)
    return torch.exp(-(fy[:, None] ** 2 + fx[None, :] ** 2) / (2 * sigma ** 2)).to(torch.complex128)


@pytest.mark.parametrize('src', [(8, 8), (9, 7), (12, 5), (1, 6)])
def test_interpolation_is_identity_at_the_trained_size(src):
    torch.manual_seed(0)
    f = torch.randn(3, src[0], src[1] // 2 + 1, dtype=torch.complex128)
    g = GlobalFilter(3, src).double()
    with torch.no_grad(): g.weight.copy_(torch.view_as_real(f))
    eq_(torch.equal(g.filter(src), f), True)
    # the arithmetic itself is exact at coinciding bins: doubling the size keeps every source bin
    big = interpolate_filter(f, src, (2 * src[0], 2 * src[1]))
    close_(big[:, ::2, ::2], f, eps=1e-12)
    close_(interpolate_filter(big, (2 * src[0], 2 * src[1]), src), f, eps=1e-12)


@pytest.mark.parametrize('dst', [(24, 20), (20, 24), (11, 13), (32, 32), (9, 9)])
def test_interpolation_preserves_a_smooth_response(dst):
    g = interpolate_filter(_gauss((16, 16)), (16, 16), dst)
    err = (g - _gauss(dst)).abs().max().item()
    assert err < (1 / 16) ** 2 / (4 * 0.12 ** 2), err


def test_interpolation_uses_the_hermitian_mirror_beyond_the_last_column():
    # odd source width 9: rfft2 stores columns 0..4; a target column at 4.5 source bins lies between column 4 and the
    # mirror column 5, which the full FFT of the same real kernel holds
    torch.manual_seed(0)
    k = torch.randn(7, 9, dtype=torch.float64)
    f, full = torch.fft.rfft2(k), torch.fft.fft2(k)
    g = interpolate_filter(f, (7, 9), (7, 18))
    close_(g[:, ::2], f, eps=1e-12)
    close_(g[:, 9], (full[:, 4] + full[:, 5]) / 2, eps=1e-12)
    # and rows wrap periodically: a target row between the last and the first source row
    g = interpolate_filter(f, (7, 9), (14, 9))
    close_(g[7], (f[3] + f[4]) / 2, eps=1e-12)                  # target bin -7/14 = -0.5 cycles: between +3/7 and -3/7
    close_(g[13], (f[6] + f[0]) / 2, eps=1e-12)                 # target bin -1/14: between -1/7 and 0


def test_global_filter_runs_at_new_sizes_and_starts_as_identity():
    g = GlobalFilter(4, (12, 9), std=0.0)
    eq_(g(torch.randn(2, 4, 12, 9)).dtype, torch.float32)
    g.double()                                                # float64: the identity up to ~1e-16 (float32 rounds at ~1e-7)
    for size in [(12, 9), (28, 28), (45, 17), (1, 5), (7, 1)]:
        x = torch.randn(2, 4, *size, dtype=torch.float64)
        close_(g(x), x, eps=1e-12)


def test_global_filter_conv_parameters():
    m = GlobalFilterConv(6, 5, (8, 7))
    eq_(n_params(m), 6 * 8 * 4 * 2 + 6 * 5)


def test_global_filter_autocast_returns_input_dtype():
    g = GlobalFilter(4, 8)
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        eq_(g(x).dtype, torch.bfloat16)


# ---------------------------------------------------------------- empty batches
def test_frequency_peers_accept_an_empty_batch():
    "A batch of no images gives no outputs of the right shape (the FFT backends differ on empty batches)."
    x = torch.zeros(0, 8, 12, 9)
    for m in (GlobalFilter(8, (12, 9)), FFC2d(8, 6, 3, ratio=0.5).eval(), FourierUnit(8, 8).eval()):
        with torch.no_grad(): y = m(x)
        eq_((y.shape, y.dtype), ((0, 6 if isinstance(m, FFC2d) else 8, 12, 9), torch.float32))


# ---------------------------------------------------------------- cost table
def test_octave_cost_table_reproduces_the_note():
    rows = octave_cost_table()
    eq_([r['alpha'] for r in rows], list(OCTAVE_ALPHAS))
    for r in rows:
        flops, memory = OCTAVE_TABLE1[r['alpha']]
        assert abs(r['flops_pct'] - flops) <= 1 and abs(r['memory_pct'] - memory) <= 1, r


# ---------------------------------------------------------------- create_model variants
def test_plugin_variants_are_registered_and_listed():
    for v in PEER_VARIANTS:
        eq_(PLUGIN_VARIANTS[v], 'niff_nb.peers'); assert v in all_variants()
        eq_(variant_settings(v), {'plugin': v, 'module': 'niff_nb.peers'})
    eq_(all_variants()[:len(VARIANTS)], VARIANTS)
    with pytest.raises(ValueError, match="'octave'") as e: create_model('smallcnn', 'octave2')
    assert 'variant' in str(e.value) and "'niff'" in str(e.value)


def test_lazy_import_in_a_fresh_process():
    code = ("import sys; from niff_nb.convert import create_model; assert 'niff_nb.peers' not in sys.modules; "
            "m = create_model('smallcnn', 'ffc', 10, in_channels=1); assert 'niff_nb.peers' in sys.modules; print(len(m.niff_report))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    eq_((r.returncode, r.stdout.strip()), (0, '3'))


@pytest.mark.parametrize('variant', PEER_VARIANTS)
def test_smallcnn_variants_finite_and_train_one_step(variant):
    torch.manual_seed(0)
    m = create_model('smallcnn', variant, 10, in_channels=1, input_size=28)
    eq_(len(m.niff_report), 3); eq_(m.niff_config['variant'], variant)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in m.parameters()]
    loss = F.cross_entropy(m(x), y); loss.backward(); opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert sum(not torch.equal(a, b) for a, b in zip(before, m.parameters())) >= len(before) // 2
    m.eval()
    with torch.no_grad():
        for size in [(28, 28), (15, 15), (17, 9)]: assert torch.isfinite(m(torch.randn(2, 1, *size))).all()


@pytest.mark.parametrize('variant', PEER_VARIANTS)
def test_resnet18_variants(variant):
    torch.manual_seed(0)
    m = create_model('resnet18', variant, 10, stem='cifar', input_size=14)     # feature maps 14, 7, 4, 2: odd and tiny
    eq_(len(m.niff_report), 14)                   # the 13 stride-1 3x3s and the CIFAR stem (converted, as for NIFF)
    loss = F.cross_entropy(m(torch.randn(2, 3, 14, 14)), torch.tensor([1, 2])); loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    with torch.no_grad(): assert torch.isfinite(m(torch.randn(1, 3, 11, 9))).all()


def test_resnet18_meta_counts():
    base = n_params(create_model('resnet18', 'baseline', device='meta'))
    eq_(n_params(create_model('resnet18', 'octave', device='meta')), base)
    eq_(n_params(create_model('resnet18', 'octave', variant_kw={'alpha': 0.25}, device='meta')), base)
    assert n_params(create_model('resnet18', 'ffc', device='meta')) < base
    g = create_model('resnet18', 'gfnet', device='meta')
    eq_(g.layer1[0].conv1.filter.size, (56, 56)); eq_(g.layer4[1].conv2.filter.size, (7, 7))


def test_variant_kw_reaches_the_layers_and_the_config():
    m = create_model('smallcnn', 'octave', 10, in_channels=1, variant_kw={'alpha': 0.25})
    eq_(m.stage1[0].alpha, 0.25); eq_(m.niff_config['variant_kw'], {'alpha': 0.25})
    m2 = create_model(**m.niff_config)
    eq_(list(m.state_dict()), list(m2.state_dict()))
    f = create_model('smallcnn', 'ffc', 10, in_channels=1, variant_kw={'ratio': 0.25})
    eq_(f.stage3[0].ffc.in_g, 16)
    g = create_model('smallcnn', 'gfnet', 10, in_channels=1, input_size=32, variant_kw={'init': 'gfnet'})
    eq_(g.stage1[0].filter.size, (32, 32)); eq_(g.stage1[0].filter.init, 'gfnet')


@needs_fmnist
@pytest.mark.parametrize('variant', ['octave', 'gfnet'])
def test_checkpoint_rebuilds_the_model(tmp_path, variant):
    from niff_nb.train import TrainConfig, model_from_checkpoint, save_checkpoint
    cfg = TrainConfig(arch='smallcnn', variant=variant, dataset='fashion-mnist',
                      model_kwargs={'variant_kw': {'alpha': 0.25}} if variant == 'octave' else {})
    from niff_nb.train import build_model
    m = build_model(cfg)
    save_checkpoint(tmp_path / 'last.pt', {'model': m.state_dict(), 'epoch': 1, 'config': asdict(cfg)})
    m2, _ = model_from_checkpoint(tmp_path / 'last.pt')
    x = torch.randn(2, 1, 28, 28)
    m.eval()
    with torch.no_grad(): y, y2 = m(x), m2(x)
    close_(y2, y, eps=4 * torch.finfo(torch.float32).eps * y.abs().max())   # the same weights and operations: at most rounding


@needs_fmnist
def test_niff_train_cli_accepts_a_peer_variant(tmp_path):
    exe = shutil.which('niff_train') or str(Path(sys.executable).parent / 'niff_train')
    args = [exe, '--recipe', 'fashion-mnist-quick', '--dataset', 'fashion-mnist', '--arch', 'smallcnn', '--variant', 'gfnet',
            '--subset', '128', '--test-subset', '64', '--batch-size', '64', '--epochs', '1', '--no-progress',
            '--device', 'cpu', '--out', str(tmp_path / 'run')]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'run' / 'last.pt').exists()


@needs_fmnist
def test_niff_train_rejects_an_unknown_variant_listing_the_peers(tmp_path, capsys):
    from niff_nb.train import niff_train
    with pytest.raises(SystemExit) as e:
        niff_train(['--recipe', 'fashion-mnist-quick', '--variant', 'octave3', '--device', 'cpu', '--out', str(tmp_path / 'bad')])
    err = capsys.readouterr().err
    assert e.value.code != 0 and 'octave3' in err and "'gfnet'" in err and "'baseline'" in err, err


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize('make,match', [
    (lambda: OctaveConv2d(4, 4, 3, alpha=1.5), r'alpha must be a number in \[0, 1\]'),
    (lambda: OctaveConv2d(4, 4, 3, alpha=-0.1), 'alpha'),
    (lambda: OctaveConv(4, 4, 3, 0.5, alpha_out=2), 'alpha_out'),
    (lambda: OctaveConv2d(4, 4, 3, alpha=float('nan')), 'alpha'),
    (lambda: OctaveConv2d(4, 4, 3, alpha=True), 'alpha'),
    (lambda: OctaveConv2d(4, 4, 4), 'kernel_size must be odd'),
    (lambda: OctaveConv2d(0, 4, 3), 'in_channels'),
    (lambda: FFC2d(4, 4, 3, ratio=1.01), r'ratio must be a number in \[0, 1\]'),
    (lambda: FFC(4, 4, 3, ratio_in=0.5, ratio_out=-1), 'ratio_out'),
    (lambda: GlobalFilter(4, (8, 0)), 'size'),
    (lambda: GlobalFilter(4, 8, init='zeros'), "'identity', 'gfnet'"),
    (lambda: peerify(nn.Conv2d(3, 3, 3), 'fno'), "'octave', 'ffc', 'gfnet'"),
    (lambda: peerify(nn.Conv2d(3, 3, 3), 'octave', ratio=0.5), 'accepted: alpha'),
    (lambda: create_model('smallcnn', 'octave', variant_kw={'alpha': 2}), 'alpha'),
    (lambda: create_model('smallcnn', 'ffc', variant_kw={'ratio': -1}), 'ratio'),
    (lambda: create_model('smallcnn', 'gfnet', variant_kw={'init': 'x'}), 'init'),
    (lambda: create_model('smallcnn', 'niff', variant_kw={'alpha': 0.5}), 'variant_kw only applies'),
    (lambda: create_model('smallcnn', 'octave', variant_kw=0.5), 'variant_kw must be a dict'),
    (lambda: interpolate_filter(torch.zeros(2, 8, 4, dtype=torch.complex64), (8, 8), (9, 9)), r'\(h, w//2\+1\)'),
])
def test_bad_arguments_name_the_argument_and_accepted_values(make, match):
    with pytest.raises(ValueError, match=match): make()


def test_bad_inputs():
    oc, g = OctaveConv2d(4, 4, 3), GlobalFilter(4, 8)
    with pytest.raises(ValueError, match='4 input channels'): oc(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'): g(torch.randn(4, 8, 8))
    with pytest.raises(TypeError, match='floating-point'): FFC2d(4, 4)(torch.zeros(1, 4, 8, 8, dtype=torch.long))


def test_cost_tools_see_the_variants():
    from niff_nb.bench import model_benchmark
    from niff_nb.convert import all_variants
    from niff_nb.cost import count_flops
    for v in PEER_VARIANTS: assert v in all_variants()
    base = count_flops(create_model('smallcnn', 'baseline', 10, in_channels=1, device='meta'), torch.empty(1, 1, 28, 28, device='meta'))
    f = {v: count_flops(create_model('smallcnn', v, 10, in_channels=1, input_size=28, device='meta'),
                        torch.empty(1, 1, 28, 28, device='meta')) for v in PEER_VARIANTS}
    assert f['octave'] < base and f['ffc'] < base and f['gfnet'].fft > 0 and f['ffc'].fft > 0
    res = model_benchmark('smallcnn', ('baseline', 'gfnet'), batch=2, size=16, repeats=1, warmup=0, threads=1)
    assert res.ratio('gfnet', 'train') > 0 and res.extra['gfnet']['gflops'] > 0

"""Property tests for niff_nb.layers: every layer against an explicit spatial convolution (no FFT)."""
import itertools

import pytest
import torch
import torch.nn as nn

from niff_nb.layers import (ImplicitFilter, FreqPointwise, NIFFConv2d, NIFFDepthwise, freq_grid, MLP_PRESETS,
                            niff_demo_cli)
from niff_nb.padding import PAD_MODES, circular_conv2d, crop2d, feature_map_pads, linear_conv2d, pad2d

SIZES = [(7, 7), (8, 8), (9, 12), (16, 5), (1, 6), (6, 1), (2, 3), (13, 13)]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make(kind, cin=3, cout=3, **kw):
    torch.manual_seed(hash((kind, cin, cout)) % 1000)
    if kind == 'depthwise': m = NIFFDepthwise(cin, mlp='small', bias=False, **kw)
    elif kind == 'separated': m = NIFFConv2d(cin, cout, mlp='small', bias=False, **kw)
    elif kind == 'full': m = NIFFConv2d(cin, cout, full=True, bias=False, **kw)
    else: raise ValueError(kind)
    return m.double()


def reference(kind, m, x, conv):
    h, w = x.shape[-2:]
    k = m.spatial_kernel(h, w)
    return conv(x, k, groups=x.shape[1] if kind == 'depthwise' else 1)


@pytest.mark.parametrize('kind,size,cout', [(k, s, c) for k, s, c in itertools.product(
    ['depthwise', 'separated', 'full'], SIZES, [2, 3, 5])])
def test_circular_equals_explicit_convolution(kind, size, cout):
    cout = 3 if kind == 'depthwise' else cout
    m = make(kind, 3, cout)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(m(x), reference(kind, m, x, circular_conv2d)) < 1e-6


@pytest.mark.parametrize('kind,size', list(itertools.product(['depthwise', 'separated', 'full'], SIZES)))
def test_linear_boundary_equals_zero_padded_convolution(kind, size):
    m = make(kind, 3, 2 if kind != 'depthwise' else 3, boundary='linear')
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(m(x), reference(kind, m, x, linear_conv2d)) < 1e-6


@pytest.mark.parametrize('kind,mode,size', list(itertools.product(['depthwise', 'separated', 'full'], PAD_MODES,
                                                                   [(7, 7), (8, 6), (1, 5), (2, 2)])))
def test_padded_input_equals_pad_conv_crop(kind, mode, size):
    m = make(kind, 3, 4 if kind != 'depthwise' else 3, pad=mode)
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    pads = feature_map_pads(*size, mode)
    xp = pad2d(x, pads, mode)
    with torch.no_grad():
        ref = crop2d(reference(kind, m, xp, circular_conv2d), pads)
        assert rel_err(m(x), ref) < 1e-6


def test_bias_is_added_after_convolution():
    for m in (NIFFDepthwise(3, 'small').double(), NIFFConv2d(3, 4, 'small').double(), NIFFConv2d(3, 2, full=True).double()):
        with torch.no_grad(): m.bias.uniform_(-1, 1)
        x = torch.randn(1, 3, 5, 6, dtype=torch.float64)
        groups = 3 if isinstance(m, NIFFDepthwise) else 1
        with torch.no_grad():
            ref = circular_conv2d(x, m.spatial_kernel(5, 6), groups=groups) + m.bias[:, None, None]
            assert rel_err(m(x), ref) < 1e-6


@pytest.mark.parametrize('cin,cout', [(4, 2), (2, 4), (3, 3)])
def test_freq_pointwise_equals_spatial_1x1(cin, cout):
    fp = FreqPointwise(cin, cout).double()
    conv = nn.Conv2d(cin, cout, 1).double()
    with torch.no_grad():
        conv.weight.copy_(fp.weight[:, :, None, None]); conv.bias.copy_(fp.bias)
    for size in SIZES:
        x = torch.randn(2, cin, *size, dtype=torch.float64)
        assert rel_err(fp(x), conv(x)) < 1e-10


def test_separated_pointwise_side_does_not_change_result():
    torch.manual_seed(0)
    m = NIFFConv2d(6, 4, 'small', bias=False).double()
    assert m.pointwise_in_frequency
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64)
    spatial_side = m.depthwise(x)
    spatial_side = nn.functional.conv2d(spatial_side, m.pointwise.weight)
    assert rel_err(m(x), spatial_side) < 1e-10


def test_spatial_kernel_shapes_and_centre():
    assert NIFFDepthwise(5).spatial_kernel(9, 12).shape == (5, 9, 12)
    assert NIFFConv2d(5, 7).spatial_kernel(9, 12).shape == (7, 5, 9, 12)
    assert NIFFConv2d(5, 7, full=True).spatial_kernel(8, 3).shape == (7, 5, 8, 3)
    assert NIFFDepthwise(5).filter(9, 12).shape == (5, 9, 7)
    assert NIFFConv2d(5, 7, full=True).filter(9, 12).shape == (7, 5, 9, 7)
    # a flat unit response is a delta at the centre (h//2, w//2)
    m = NIFFDepthwise(1, 'cifar', bias=False)
    with torch.no_grad():
        for p in m.parameters(): p.zero_()
        m.implicit.real[-1].bias.fill_(1.0)
    for h, w in SIZES:
        k = m.spatial_kernel(h, w)[0]
        assert k.argmax().item() == (h // 2) * w + w // 2
        assert abs(k.sum().item() - 1) < 1e-5


def test_real_kernels_for_every_size():
    m = NIFFDepthwise(2, 'big')
    for h, w in SIZES:
        k = m.spatial_kernel(h, w)
        assert k.dtype == torch.float32 and torch.isfinite(k).all()


@pytest.mark.parametrize('kind', ['depthwise', 'separated', 'full'])
@pytest.mark.parametrize('boundary,pad', [('circular', None), ('linear', None), ('circular', 'reflect')])
def test_gradcheck_float64(kind, boundary, pad):
    torch.manual_seed(0)
    if kind == 'depthwise': m = NIFFDepthwise(2, mlp=(3,), boundary=boundary, pad=pad)
    elif kind == 'separated': m = NIFFConv2d(2, 3, mlp=(3,), boundary=boundary, pad=pad)
    else: m = NIFFConv2d(2, 2, mlp=(3,), full=True, boundary=boundary, pad=pad)
    m = m.double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(m.parameters())
    f = lambda x, *ps: torch.func.functional_call(m, {n: p for (n, _), p in zip(m.named_parameters(), ps)}, (x,))
    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-5)


DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_runs_fft_in_float32(device, dtype):
    "The FFT part returns the input's dtype; the separated block's spatial 1x1 follows autocast like nn.Conv2d."
    torch.manual_seed(0)
    dw, sep = NIFFDepthwise(4).to(device), NIFFConv2d(4, 6).to(device)
    x = torch.randn(2, 4, 14, 9, device=device)     # 14x9: not a power of two, which cuFFT half precision cannot do
    amp = torch.bfloat16 if device == 'cpu' else dtype
    with torch.autocast(device, dtype=amp):
        yd, yd32 = dw(x.to(dtype)), dw(x)
        ys = sep(x.to(dtype).to(memory_format=torch.channels_last))
        f = sep.filter(14, 9)
    assert yd.dtype == dtype and yd32.dtype == torch.float32 and ys.dtype == amp
    assert f.dtype == torch.complex64
    # half precision rounds inputs and 1x1 weights to 8 (bf16) or 11 (fp16) bits: a few 2^-8 relative at most
    assert rel_err(yd.float(), dw(x)) < 2e-2 and rel_err(ys.float(), sep(x)) < 2e-2
    assert rel_err(yd32, dw(x)) < 1e-6


def test_half_input_without_autocast():
    m = NIFFDepthwise(3, 'small')
    x = torch.randn(1, 3, 6, 6)
    assert m(x.half()).dtype == torch.float16
    assert rel_err(m(x.half()).float(), m(x)) < 1e-2


def test_channels_last_and_batch_one():
    m = NIFFConv2d(8, 8)
    x = torch.randn(1, 8, 11, 14)
    assert rel_err(m(x.to(memory_format=torch.channels_last)), m(x)) < 1e-6
    y = m(torch.randn(3, 8, 11, 14))
    assert y.shape == (3, 8, 11, 14)


def test_same_weights_any_size_and_no_state_from_first_input():
    m = NIFFConv2d(3, 3).eval()
    with torch.no_grad():
        a = m(torch.ones(1, 3, 8, 8))
        m(torch.randn(1, 3, 17, 5))
        b = m(torch.ones(1, 3, 8, 8))
    assert torch.equal(a, b)


def test_index_coordinates_are_the_default():
    g = freq_grid(5, 6)
    assert g[1, :, 0].tolist() == [0, 1, 2, -2, -1] and g[0, 0].tolist() == [0, 1, 2, -3]   # Nyquist column at -N/2
    m = NIFFDepthwise(2, bias=False).double()
    assert m.implicit.coords == 'index' and m.implicit.spectrum == 'hermitian'
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(m(x), circular_conv2d(x, m.spatial_kernel(6, 6), groups=2)) < 1e-10


def test_cached_grid_survives_inference_mode():
    m = NIFFDepthwise(2, 'small')
    with torch.inference_mode():
        m(torch.randn(1, 2, 3, 31))
        freq_grid(3, 31)
    m(torch.randn(1, 2, 3, 31)).sum().backward()   # would fail if the cached grid were an inference tensor


class TestFilterCache:
    def test_reused_in_eval_no_grad(self):
        m = NIFFDepthwise(4, 'small').eval()
        with torch.no_grad():
            assert m._filter(8, 8) is m._filter(8, 8)
            assert m._filter(8, 8) is not m._filter(8, 9)
            a, b = m.filter(8, 8), m.filter(8, 8)       # the public getter hands out copies
            assert a is not b and torch.equal(a, b)

    def test_not_cached_in_training_or_with_grad(self):
        m = NIFFDepthwise(4, 'small')
        assert m.filter(8, 8) is not m.filter(8, 8)
        m.eval()
        assert m.filter(8, 8).requires_grad  # grad enabled: the MLP stays in the graph

    def test_invalidated_by_optimizer_step(self):
        m = NIFFConv2d(3, 3, 'small')
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        x = torch.randn(2, 3, 8, 8)
        m.eval()
        with torch.no_grad(): before = m(x)
        m.train()
        m(x).square().mean().backward(); opt.step()
        m.eval()
        with torch.no_grad():
            after = m(x)
            fresh = NIFFConv2d(3, 3, 'small'); fresh.load_state_dict(m.state_dict()); fresh.eval()
            assert not torch.allclose(before, after)
            assert torch.allclose(after, fresh(x), atol=1e-6)

    def test_invalidated_by_load_state_dict(self):
        a, b = NIFFDepthwise(4, 'small').eval(), NIFFDepthwise(4, 'small').eval()
        with torch.no_grad():
            fa = a.filter(7, 7).clone()
            a.load_state_dict(b.state_dict())
            assert torch.allclose(a.filter(7, 7), b.filter(7, 7))
            assert not torch.allclose(a.filter(7, 7), fa)

    def test_invalidated_by_optimizer_step_for_separated_block_pointwise(self):
        m = NIFFConv2d(3, 3, 'small').eval()
        with torch.no_grad():
            f = m.filter(6, 6).clone()
            m.pointwise.weight.mul_(2)
            assert torch.allclose(m.filter(6, 6), 2 * f)

    def test_inference_mode_then_grad(self):
        m = NIFFDepthwise(2, 'small').eval()
        for p in m.parameters(): p.requires_grad_(False)
        with torch.inference_mode(): m(torch.randn(1, 2, 5, 5))
        x = torch.randn(1, 2, 5, 5, requires_grad=True)
        m(x).sum().backward()          # input gradients through a frozen eval-mode layer
        assert x.grad is not None


@pytest.mark.parametrize('preset', list(MLP_PRESETS))
def test_presets_parameter_counts(preset):
    hidden = MLP_PRESETS[preset][0]
    widths = (2,) + hidden + (10,)
    per_mlp = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    assert sum(p.numel() for p in ImplicitFilter(10, preset).parameters()) == 2 * per_mlp


def test_paper_block_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(NIFFConv2d(64, 64, bias=False)) == 2 * (6352 + 33 * 64) + 64 * 64
    assert count(NIFFConv2d(128, 256, full=True, bias=False)) == 2 * (24 + 9 * 128 * 256)
    assert count(NIFFDepthwise(32, 'small', bias=False)) == 2 * (24 + 36 + 5 * 32)


@pytest.mark.parametrize('call,exc,match', [
    (lambda: NIFFDepthwise(3)(torch.randn(3, 8, 8)), ValueError, r'x\[None\]'),
    (lambda: NIFFDepthwise(3)(torch.randn(1, 1, 3, 8, 8)), ValueError, '4-D'),
    (lambda: NIFFDepthwise(3)(torch.randn(1, 4, 8, 8)), ValueError, 'in_channels=3'),
    (lambda: NIFFConv2d(3, 2)(torch.randn(1, 2, 8, 8)), ValueError, 'in_channels=3'),
    (lambda: NIFFDepthwise(3)(torch.ones(1, 3, 8, 8, dtype=torch.int64)), TypeError, 'floating-point'),
    (lambda: NIFFDepthwise(3)(torch.ones(1, 3, 8, 8, dtype=torch.complex64)), TypeError, 'floating-point'),
    (lambda: NIFFDepthwise(3)([[1.0]]), TypeError, 'torch.Tensor'),
    (lambda: NIFFDepthwise(3, mlp='huge'), ValueError, "'big', 'small', 'cifar', 'full'"),
    (lambda: NIFFDepthwise(3, mlp=(4, 0)), ValueError, 'hidden widths'),
    (lambda: NIFFConv2d(3, 3, boundary='periodic'), ValueError, "boundary='periodic'.*'circular', 'linear'"),
    (lambda: NIFFConv2d(3, 3, pad='edge'), ValueError, "'zeros', 'reflect', 'circular'"),
    (lambda: NIFFConv2d(3, 3, boundary='linear', pad='zeros'), ValueError, 'boundary'),
    (lambda: NIFFDepthwise(3, coords='pixels'), ValueError, "'index', 'cycles', 'official'"),
    (lambda: NIFFDepthwise(3, spectrum='full'), ValueError, "'hermitian', 'half'"),
    (lambda: NIFFDepthwise(3, act=nn.ReLU()), TypeError, 'not an instance'),
    (lambda: NIFFDepthwise(3, act='swish'), ValueError, "'silu', 'relu'"),
    (lambda: NIFFDepthwise(0), ValueError, 'in_channels must be a positive int'),
    (lambda: NIFFConv2d(3, -1), ValueError, 'out_channels must be a positive int'),
    (lambda: NIFFDepthwise(3).filter(0, 4), ValueError, 'h must be a positive int'),
    (lambda: freq_grid(4, 4.5), ValueError, 'w must be a positive int'),
    (lambda: freq_grid(4, 4, dtype=torch.int32), TypeError, 'floating-point'),
])
def test_bad_input_names_argument_and_accepted_values(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_niff_demo_cli(capsys):
    niff_demo_cli(['--channels', '4'])
    out = capsys.readouterr().out
    assert 'NIFFDepthwise' in out and '56x56' in out
    rows = [line for line in out.splitlines() if line.startswith(('NIFFDepthwise', 'NIFFConv2d'))]
    errors = [float(t) for line in rows for t in line.split()[-18:] if t != '|']
    assert len(rows) == 3 and len(errors) == 36 and max(errors) < 1e-10
    with pytest.raises(SystemExit):
        niff_demo_cli(['--channels', '0'])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
def test_cuda_matches_cpu_and_caches_per_device():
    torch.manual_seed(0)
    m = NIFFDepthwise(4, 'small').eval()
    x = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        y_cpu = m(x)
        m.cuda()
        y_gpu = m(x.cuda())
        assert m.filter(10, 10).is_cuda
    assert rel_err(y_gpu.cpu(), y_cpu) < 1e-5


# --- the fused fft_filter path and the eval filter cache ---------------------------------------------------------
from niff_nb.layers import fft_filter


def _reference_copy(m):
    import copy
    r = copy.deepcopy(m)
    for mod in r.modules():
        if hasattr(mod, 'fused'): mod.fused = False
    return r


@pytest.mark.parametrize('kind', ['depthwise', 'depthwise_nobias', 'separated', 'separated_bias'])
@pytest.mark.parametrize('size', [(7, 7), (8, 8), (9, 12), (16, 5), (1, 6), (5, 1)])
@pytest.mark.parametrize('pad', [None, 'reflect', 'zeros'])
def test_fused_path_equals_reference(kind, size, pad):
    torch.manual_seed(0)
    if kind.startswith('depthwise'): m = NIFFDepthwise(3, 'small', bias=kind == 'depthwise', pad=pad)
    else: m = NIFFConv2d(3, 4, 'small', bias=kind == 'separated_bias', pad=pad)
    m = m.double()
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.1 * torch.randn_like(p))   # non-zero biases
    ref = _reference_copy(m)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = m(x), ref(xr)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g); yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    for (n, p), (_, pr) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize('size', [(6, 8), (7, 5), (4, 1), (1, 1)])
def test_fft_filter_matches_autograd_of_plain_formula(size):
    torch.manual_seed(1)
    h, w = size
    x = torch.randn(3, 2, h, w, dtype=torch.float64, requires_grad=True)
    filt = torch.randn(2, h, w // 2 + 1, dtype=torch.complex128, requires_grad=True)   # not Hermitian on purpose
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    y = fft_filter(x, filt, b)
    x2, f2, b2 = (t.detach().clone().requires_grad_() for t in (x, filt, b))
    y2 = torch.fft.irfft2(torch.fft.rfft2(x2) * f2, s=size) + b2[:, None, None]
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    y.backward(g); y2.backward(g)
    for a, c in ((x, x2), (filt, f2), (b, b2)): torch.testing.assert_close(a.grad, c.grad)
    assert torch.autograd.gradcheck(fft_filter, (x, filt, b))


def test_fft_filter_without_grad_and_broadcast_filter():
    x = torch.randn(2, 3, 8, 6)
    f = torch.randn(1, 8, 4, dtype=torch.complex64)
    torch.testing.assert_close(fft_filter(x, f), torch.fft.irfft2(torch.fft.rfft2(x) * f, s=(8, 6)))
    xd = x.double()
    assert fft_filter(xd, f).dtype == torch.float64                   # the filter follows the input's precision
    fg = f.clone().requires_grad_()
    fft_filter(x, fg).sum().backward()
    assert fg.grad.shape == f.shape


@pytest.mark.parametrize('make_layer,fused', [(lambda: NIFFDepthwise(4, 'small'), True),
                                               (lambda: NIFFConv2d(4, 4, 'small'), True),
                                               (lambda: NIFFConv2d(4, 2, 'small'), False),
                                               (lambda: NIFFConv2d(4, 4, full=True), False)])
def test_fused_path_is_used_where_it_applies_and_channels_last(monkeypatch, make_layer, fused):
    import niff_nb.layers as L
    calls, real = [], L.fft_filter
    monkeypatch.setattr(L, 'fft_filter', lambda *a, **k: calls.append(1) or real(*a, **k))
    m, x = make_layer(), torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x), rtol=1e-5, atol=1e-6)
    assert bool(calls) == fused


class TestCacheNeverStale:
    def _eval_out(self, m, x):
        with torch.no_grad(): return m(x)

    def test_optimizer_step_in_eval_mode(self):
        torch.manual_seed(0)
        m = NIFFDepthwise(3, 'small').eval()          # e.g. fine-tuning with frozen batch statistics
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        x = torch.randn(2, 3, 8, 8)
        before = self._eval_out(m, x)
        m(x).square().mean().backward(); opt.step()    # grad enabled: not cached; the step mutates in place
        after = self._eval_out(m, x)
        ref = _reference_copy(m).train()                # recomputes its filter
        torch.testing.assert_close(after, ref(x).detach())
        assert not torch.allclose(before, after)

    def test_load_state_dict_and_param_replacement(self):
        torch.manual_seed(0)
        m, other = NIFFConv2d(3, 3, 'small').eval(), NIFFConv2d(3, 3, 'small')
        x = torch.randn(2, 3, 8, 8)
        self._eval_out(m, x)
        m.load_state_dict(other.state_dict())
        torch.testing.assert_close(self._eval_out(m, x), other.eval()(x).detach())
        last = m.depthwise.implicit.real[-1]
        last.bias = nn.Parameter(last.bias.detach() + 1.0)                       # replaced, not mutated
        y1 = self._eval_out(m, x)
        torch.testing.assert_close(y1, _reference_copy(m).train()(x).detach())
        m.depthwise.implicit.imag[0] = nn.Conv2d(2, 8, 1)                        # a replaced submodule
        torch.testing.assert_close(self._eval_out(m, x), _reference_copy(m).train()(x).detach())

    def test_data_assignment_and_dtype_move(self):
        m = NIFFDepthwise(2, 'small').eval()
        x = torch.randn(1, 2, 6, 6)
        self._eval_out(m, x)
        w = m.implicit.real[0].weight
        w.data = w.data * 3
        torch.testing.assert_close(self._eval_out(m, x), _reference_copy(m).train()(x).detach())
        m.double()
        y = self._eval_out(m, x.double())
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, _reference_copy(m).train()(x.double()).detach())

    def test_inference_mode_cache_is_separate(self):
        m = NIFFDepthwise(2, 'small').eval()
        with torch.inference_mode(): f_inf = m.filter(5, 5)
        with torch.no_grad(): f = m.filter(5, 5)
        assert f_inf.is_inference() and not f.is_inference()
        m(torch.randn(1, 2, 5, 5)).sum().backward()     # grad mode after inference: still fine


def test_reference_path_under_torch_compile(monkeypatch):
    "While torch.compile traces, the layers use plain ops (Inductor cannot trace fft_filter's in-place DC update)."
    import niff_nb.layers as L
    calls = []
    real = L.fft_filter
    monkeypatch.setattr(L, 'fft_filter', lambda *a, **k: calls.append(1) or real(*a, **k))
    m, x = NIFFDepthwise(2, 'small'), torch.randn(1, 2, 6, 6)
    y = m(x)
    assert calls == [1]
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    torch.testing.assert_close(m(x), y)
    assert calls == [1]


def test_cache_sees_functional_call_swaps():
    m, x = NIFFDepthwise(2, 'small').eval(), torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        y = m(x)
        swapped = {n: p.detach() * 2 for n, p in m.named_parameters()}
        y2 = torch.func.functional_call(m, swapped, (x,))
        ref = _reference_copy(m)
        ref.load_state_dict(swapped)
        torch.testing.assert_close(y2, ref.train()(x))
        torch.testing.assert_close(m(x), y)                 # the original parameters are back


def test_fft_filter_unbatched_gradients():
    torch.manual_seed(2)
    x = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, 6, 3, dtype=torch.complex128, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fft_filter, (x, f, b))
    assert torch.autograd.gradcheck(lambda f, b: fft_filter(x.detach(), f, b), (f, b))   # the in-place branch


# --- the paper's operator, written independently of niff_nb.layers ---------------------------------------------------
def _labels(n, official=False):
    "Integer frequency labels of n bins in FFT order, the Nyquist bin at -n/2 (the paper's code: k - 0.5 for odd n)."
    k = torch.cat([torch.arange(0, (n + 1) // 2), torch.arange(-(n // 2), 0)]).double()
    return k - 0.5 if official and n % 2 else k


def _mlp_response(implicit, h, w, official=False):
    "W = MLP_re + i MLP_im on the full grid, channel 0 horizontal, evaluated with the nn.Sequential 1x1 convolutions."
    gy, gx = torch.meshgrid(_labels(h, official), _labels(w, official), indexing='ij')
    grid = torch.stack([gx, gy])[None].to(implicit.real[0].weight.dtype)
    return torch.complex(implicit.real(grid)[0], implicit.imag(grid)[0])


def _paper_operator(layer, x, official=False):
    "Re ifft2(W ⊙ fft2 x) on the full grid, for the depthwise, separated and full layers."
    h, w = x.shape[-2:]
    X = torch.fft.fft2(x)
    if isinstance(layer, NIFFDepthwise):
        Z = X * _mlp_response(layer.implicit, h, w, official)
    elif layer.full:
        W = _mlp_response(layer.implicit, h, w, official).reshape(layer.out_channels, layer.in_channels, h, w)
        Z = (X[:, None] * W[None]).sum(2)
    else:
        Z = X * _mlp_response(layer.depthwise.implicit, h, w, official)
        Z = (layer.pointwise.weight[None, :, :, 0, 0, None, None] * Z[:, None]).sum(2)
    y = torch.fft.ifft2(Z).real
    return y if layer.bias is None else y + layer.bias[:, None, None]


PAPER_SIZES = [(7, 7), (8, 8), (9, 12), (12, 9), (16, 5), (1, 6), (5, 1), (2, 2), (28, 28)]


@pytest.mark.parametrize('kind', ['depthwise', 'separated_up', 'separated_down', 'full'])
@pytest.mark.parametrize('size', PAPER_SIZES)
def test_default_layers_equal_the_papers_operator(kind, size):
    torch.manual_seed(sum(size))
    m = {'depthwise': lambda: NIFFDepthwise(3, 'big'), 'separated_up': lambda: NIFFConv2d(3, 5),
         'separated_down': lambda: NIFFConv2d(3, 2, 'small'), 'full': lambda: NIFFConv2d(3, 4, full=True)}[kind]().double()
    with torch.no_grad():
        for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))      # non-zero biases everywhere
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        for mode in ('train', 'eval'):
            getattr(m, mode)()
            assert rel_err(m(x), _paper_operator(m, x)) < 1e-10


@pytest.mark.parametrize('size', [(7, 7), (8, 8), (14, 14), (9, 9)])
def test_official_coordinates_reproduce_the_papers_grid(size):
    torch.manual_seed(0)
    m = NIFFDepthwise(4, 'small', bias=False, coords='official').double()
    x = torch.randn(1, 4, *size, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(m(x), _paper_operator(m, x, official=True)) < 1e-10
        if size[0] % 2:                                                    # odd sizes: half-integer labels differ
            ref = NIFFDepthwise(4, 'small', bias=False).double(); ref.load_state_dict(m.state_dict())
            assert rel_err(ref(x), m(x)) > 1e-3


@pytest.mark.parametrize('coords', ['index', 'cycles', 'official'])
@pytest.mark.parametrize('size', [(7, 7), (8, 6), (9, 12), (1, 4)])
def test_filter_is_hermitian_so_kernels_are_real(coords, size):
    h, w = size
    m = NIFFDepthwise(3, 'small', coords=coords).double()
    with torch.no_grad():
        H = m.filter(h, w)
        full = torch.fft.fft2(torch.fft.ifftshift(m.spatial_kernel(h, w), dim=(-2, -1)))   # the spectrum of the real kernel
        assert rel_err(full[..., : w // 2 + 1], H) < 1e-10            # irfft2 dropped nothing: H is exactly Hermitian


@pytest.mark.parametrize('size', [(8, 8), (9, 12), (7, 5)])
def test_half_spectrum_ablation(size):
    "spectrum='half' is another operator (F = H + sgn(kx)·A), and equals its own spatial kernel."
    h, w = size
    torch.manual_seed(1)
    herm = NIFFDepthwise(3, 'small', bias=False).double()
    half = NIFFDepthwise(3, 'small', bias=False, spectrum='half').double(); half.load_state_dict(herm.state_dict())
    x = torch.randn(1, 3, h, w, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(half(x), circular_conv2d(x, half.spatial_kernel(h, w), groups=3)) < 1e-10
        assert rel_err(half(x), herm(x)) > 1e-3
        W = _mlp_response(herm.implicit, h, w)
        Wm = torch.roll(W.flip(-2, -1), (1, 1), (-2, -1))
        H, A = (W + Wm.conj()) / 2, (W - Wm.conj()) / 2
        sgn = torch.sign(torch.fft.fftfreq(w, dtype=torch.float64))
        if w % 2 == 0: sgn[w // 2] = 0
        F_half = torch.fft.fft2(torch.fft.ifftshift(half.spatial_kernel(h, w), dim=(-2, -1)))
        assert rel_err(F_half, H + sgn * A) < 1e-10


# --- the filter cache: never stale, bounded, no global state -----------------------------------------------------------
def test_cache_sees_edits_through_data():
    m, x = NIFFConv2d(3, 3, 'small').eval(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        m(x)
        m.depthwise.implicit.real[-1].weight.data.mul_(0.5)    # legacy EMA code edits .data: no version bump
        m.pointwise.weight.data.add_(1.0)
        torch.testing.assert_close(m(x), _reference_copy(m).train()(x))
        for p in m.parameters(): p.data.copy_(torch.randn_like(p))
        torch.testing.assert_close(m(x), _reference_copy(m).train()(x))


def test_cache_is_bounded_least_recently_used():
    m = NIFFDepthwise(2, 'small').eval()
    with torch.no_grad():
        for n in range(4, 4 + 3 * m.cache_size): m(torch.randn(1, 2, n, n))
        assert len(m._cache.entries) == m.cache_size
        keys = [k[:2] for k in m._cache.entries]
        last = 4 + 3 * m.cache_size - 1
        assert keys == [(n, n) for n in range(last - m.cache_size + 1, last + 1)]


def test_public_tensors_are_the_callers_own():
    g = freq_grid(6, 6); g.fill_(7)
    assert freq_grid(6, 6)[0, 0, 1].item() == 1.0
    m = NIFFDepthwise(2, 'small').eval()
    with torch.no_grad():
        f = m.filter(6, 6); ref = f.clone(); f.zero_()
        assert torch.equal(m.filter(6, 6), ref)
        y = m(torch.ones(1, 2, 6, 6))
        k = m.spatial_kernel(6, 6); k.zero_()
        assert torch.equal(m(torch.ones(1, 2, 6, 6)), y)


def test_import_installs_no_global_hooks():
    import subprocess, sys
    code = ("import torch.nn.modules.module as M; before = (len(M._global_module_registration_hooks), "
            "len(M._global_parameter_registration_hooks), len(M._global_forward_hooks)); import niff_nb.layers, niff_nb.convert; "
            "after = (len(M._global_module_registration_hooks), len(M._global_parameter_registration_hooks), "
            "len(M._global_forward_hooks)); print(before == after)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'True'


# --- precision, empty batches, second derivatives, tracing ------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('make_layer', [lambda: NIFFDepthwise(4), lambda: NIFFConv2d(4, 6), lambda: NIFFConv2d(4, 2),
                                        lambda: NIFFConv2d(4, 3, full=True)])
def test_half_precision_models_run(dtype, make_layer):
    torch.manual_seed(0)
    m = make_layer()
    ref = copy_of = __import__('copy').deepcopy(m)
    m = m.to(dtype)
    x = torch.randn(2, 4, 10, 7)
    y = m(x.to(dtype))
    assert y.dtype == dtype and m.filter(10, 7).dtype == torch.complex64
    assert rel_err(y.float(), ref(x)) < 3e-2          # weights and inputs rounded to half precision
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in m.parameters())


@pytest.mark.parametrize('make_layer,cout', [(lambda: NIFFDepthwise(4), 4), (lambda: NIFFConv2d(4, 6), 6),
                                             (lambda: NIFFConv2d(4, 2, boundary='linear'), 2),
                                             (lambda: NIFFConv2d(4, 3, full=True, pad='reflect'), 3),
                                             (lambda: FreqPointwise(4, 5), 5)])
def test_empty_batch_gives_empty_output(make_layer, cout):
    m = make_layer()
    x = torch.randn(0, 4, 9, 8, requires_grad=True)
    y = m(x)
    assert y.shape == (0, cout, 9, 8)
    conv = nn.Conv2d(4, cout, 3, padding=1)
    assert conv(x).shape == y.shape
    assert fft_filter(torch.randn(0, 4, 9, 8), torch.ones(4, 9, 5, dtype=torch.complex64)).shape == (0, 4, 9, 8)


def test_double_backward_says_how():
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    m = NIFFDepthwise(3, 'small')
    with pytest.raises(RuntimeError, match=r'fused = False'):
        torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    m.fused = False
    g, = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    hv, = torch.autograd.grad(g.sum(), x)
    assert hv.shape == x.shape and torch.isfinite(hv).all()


@pytest.mark.parametrize('make_layer', [lambda: NIFFDepthwise(3, 'small'), lambda: NIFFConv2d(3, 4),
                                        lambda: NIFFConv2d(3, 2, full=True, boundary='linear')])
def test_jit_trace_follows_parameter_changes(make_layer):
    import warnings
    m = make_layer().eval()
    x = torch.randn(2, 3, 9, 7)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(m, x, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), m(x))
        for p in m.parameters(): p.add_(0.1)
        torch.testing.assert_close(traced(x), m(x))


@pytest.mark.parametrize('act', ['relu', 'GELU', nn.Tanh])
def test_activation_by_name_or_class(act):
    m = NIFFDepthwise(3, (6,), act=act)
    assert isinstance(m.implicit.real[1], (nn.ReLU, nn.GELU, nn.Tanh))
    assert m(torch.randn(1, 3, 5, 5)).shape == (1, 3, 5, 5)


def test_parametrised_activation_runs_per_mlp():
    m = NIFFDepthwise(3, (6,), act=nn.PReLU).double()
    with torch.no_grad(): m.implicit.imag[1].weight.fill_(-2.0)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(m(x), _paper_operator(m.eval(), x)) < 1e-10

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


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_runs_fft_in_float32_and_returns_input_dtype(dtype):
    torch.manual_seed(0)
    m = NIFFConv2d(4, 6)
    x = torch.randn(2, 4, 9, 7)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = m(x.to(dtype))
        y32 = m(x)
    assert y.dtype == dtype and y32.dtype == torch.float32
    assert rel_err(y.float(), m(x)) < 2e-2
    assert rel_err(y32, m(x)) < 1e-6
    with torch.autocast('cpu', dtype=torch.bfloat16):
        f = m.filter(9, 7)
    assert f.dtype == torch.complex64


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


def test_index_coordinates_option():
    g = freq_grid(5, 6, coords='index')
    assert g[0, :, 0].tolist() == [0, 1, 2, -2, -1] and g[1, 0].tolist() == [0, 1, 2, 3]
    m = NIFFDepthwise(2, coords='index', bias=False).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(m(x), circular_conv2d(x, m.spatial_kernel(6, 6), groups=2)) < 1e-6


def test_grid_is_not_an_inference_tensor():
    with torch.inference_mode():
        g = freq_grid(3, 31)
    assert not g.is_inference()
    m = NIFFDepthwise(2, 'small')
    m(torch.randn(1, 2, 3, 31)).sum().backward()   # would fail if the cached grid were an inference tensor


class TestFilterCache:
    def test_reused_in_eval_no_grad(self):
        m = NIFFDepthwise(4, 'small').eval()
        with torch.no_grad():
            assert m.filter(8, 8) is m.filter(8, 8)
            assert m.filter(8, 8) is not m.filter(8, 9)

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
    (lambda: NIFFDepthwise(3, coords='pixels'), ValueError, "'cycles', 'index'"),
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
    errors = [float(t) for line in out.splitlines() if line.startswith(('NIFFDepthwise', 'NIFFConv2d')) for t in line.split()[-6:]]
    assert len(errors) == 18 and max(errors) < 1e-6
    with pytest.raises(SystemExit):
        niff_demo_cli(['--channels', '0'])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@cuda
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_autocast_and_channels_last(dtype):
    torch.manual_seed(0)
    m = NIFFConv2d(8, 12).cuda()
    x = torch.randn(2, 8, 14, 9, device='cuda')          # 14x9: not a power of two, which cuFFT half cannot do
    with torch.autocast('cuda', dtype=dtype):
        y = m(x.to(dtype).to(memory_format=torch.channels_last))
    assert y.dtype == dtype and y.is_cuda
    assert rel_err(y.float(), m(x)) < 2e-2


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


# --- issue 6: the fused fft_filter path and the eval filter cache ------------------------------------------------
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


def test_fused_path_is_used_and_channels_last():
    m = NIFFDepthwise(4, 'small')
    x = torch.randn(2, 4, 9, 9)
    assert m.fused and m._fusable()
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x), rtol=1e-5, atol=1e-6)
    assert not NIFFConv2d(4, 4, full=True)._fusable() and not NIFFConv2d(4, 2)._fusable()


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

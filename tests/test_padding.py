"""Property tests for `niff_nb.padding`: references vs naive loops vs FFT routes, layouts, pad/crop, bad input.

The notebook `nbs/01_padding.ipynb` teaches; this file sweeps shapes and faults.
"""
import math

import pytest
import torch
from fastcore.test import test_close as close, test_eq as eq

from niff_nb.fourier import circular_conv2d_direct
from niff_nb.padding import (PAD_MODES, centre_kernel, circular_conv2d, crop2d, dirichlet_kernel, embed_kernel,
                             feature_map_pads, fft_circular_conv2d, fft_linear_conv2d, fft_padded_conv2d, linear_conv2d,
                             pad2d, uncentre_kernel)

F64 = torch.float64
# odd, even, non-square, 1xN, Nx1, tiny
SIZES = [(1, 1), (1, 6), (5, 1), (2, 2), (3, 3), (4, 4), (5, 7), (6, 4), (8, 9)]


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def naive_conv2d(x, k, groups=1, circular=True):
    """The reference: chapter 00's direct circular sum (`circular_conv2d_direct`, index 0 at the origin, no F.conv2d, no FFT)
    with the centred kernel moved to the origin of the frame; a linear convolution is the circular one on a frame zero-padded
    to N + K - 1 (the point of chapter 01), cropped back."""
    B, C, H, W = x.shape
    if k.dim() == 3: k, groups = k[:, None], C
    O, Cg, kh, kw = k.shape
    Hf, Wf = (H, W) if circular else (H + kh - 1, W + kw - 1)
    xf = torch.zeros(B, C, Hf, Wf, dtype=x.dtype)
    xf[..., :H, :W] = x
    k0 = uncentre_kernel(embed_kernel(k, Hf, Wf))
    og = O // groups
    ys = [circular_conv2d_direct(xf[:, None, g * Cg:(g + 1) * Cg].expand(B, og, Cg, Hf, Wf), k0[g * og:(g + 1) * og]).sum(2)
          for g in range(groups)]
    return torch.cat(ys, 1)[..., :H, :W]


def scalar_conv2d(x, k, circular):
    "The definition y[n] = sum_m k[m] x[n - (m - c)], one scalar at a time (single image, single channel)."
    H, W = x.shape
    kh, kw = k.shape
    y = torch.zeros(H, W, dtype=x.dtype)
    for i in range(H):
        for j in range(W):
            for mi in range(kh):
                for mj in range(kw):
                    r, c = i - (mi - kh // 2), j - (mj - kw // 2)
                    if circular: y[i, j] += k[mi, mj] * x[r % H, c % W]
                    elif 0 <= r < H and 0 <= c < W: y[i, j] += k[mi, mj] * x[r, c]
    return y


# ---------------------------------------------------------------- the naive references themselves
@pytest.mark.parametrize('hw,khw', [((3, 4), (2, 3)), ((5, 5), (5, 5)), ((1, 6), (1, 4)), ((4, 2), (3, 1))])
@pytest.mark.parametrize('circular', [True, False])
def test_naive_matches_scalar_definition(hw, khw, circular):
    x, k = rand(*hw), rand(*khw, seed=1)
    close(naive_conv2d(x[None, None], k[None], circular=circular)[0, 0], scalar_conv2d(x, k, circular), eps=1e-12)


# ---------------------------------------------------------------- depthwise: every kernel size 1..N
@pytest.mark.parametrize('hw', SIZES)
def test_depthwise_all_kernel_sizes(hw):
    H, W = hw
    x = rand(2, 3, H, W)
    for kh in range(1, H + 1):
        for kw in range(1, W + 1):
            k = rand(3, kh, kw, seed=kh * 31 + kw)
            circ, lin = naive_conv2d(x, k, circular=True), naive_conv2d(x, k, circular=False)
            close(circular_conv2d(x, k), circ, eps=1e-10)
            close(circular_conv2d(x, k, groups=3), circ, eps=1e-10)
            close(linear_conv2d(x, k), lin, eps=1e-10)
            close(fft_circular_conv2d(x, embed_kernel(k, H, W)), circ, eps=1e-10)
            close(fft_linear_conv2d(x, k), lin, eps=1e-10)
            close(fft_padded_conv2d(x, k, 'circular'), circ, eps=1e-10)
            close(fft_padded_conv2d(x, k, 'zeros'), lin, eps=1e-10)


@pytest.mark.parametrize('hw,khw', [((3, 4), (7, 9)), ((1, 5), (3, 11)), ((4, 4), (8, 8)), ((2, 3), (5, 2))])
def test_linear_kernels_larger_than_input(hw, khw):
    x, k = rand(1, 2, *hw), rand(2, *khw, seed=3)
    lin = naive_conv2d(x, k, circular=False)
    close(linear_conv2d(x, k), lin, eps=1e-10)
    close(fft_linear_conv2d(x, k), lin, eps=1e-10)


# ---------------------------------------------------------------- full and grouped kernels
@pytest.mark.parametrize('hw', [(5, 7), (6, 4), (1, 5), (3, 3)])
@pytest.mark.parametrize('groups,out', [(1, 3), (1, 4), (2, 2), (2, 6), (4, 4), (4, 8)])
@pytest.mark.parametrize('khw', [(1, 1), (2, 3), (3, 3), 'full'])
def test_full_and_grouped(hw, groups, out, khw):
    H, W = hw
    kh, kw = hw if khw == 'full' else (min(khw[0], H), min(khw[1], W))
    x = rand(2, 4, H, W)
    k = rand(out, 4 // groups, kh, kw, seed=5)
    close(circular_conv2d(x, k, groups=groups), naive_conv2d(x, k, groups, circular=True), eps=1e-10)
    close(linear_conv2d(x, k, groups=groups), naive_conv2d(x, k, groups, circular=False), eps=1e-10)


def test_depthwise_equals_grouped_4d_kernel():
    x, k = rand(2, 3, 6, 5), rand(3, 3, 4, seed=2)
    close(circular_conv2d(x, k), circular_conv2d(x, k[:, None], groups=3), eps=1e-12)
    close(linear_conv2d(x, k), linear_conv2d(x, k[:, None], groups=3), eps=1e-12)


def test_float32_and_mixed_dtypes():
    x, k = rand(1, 2, 6, 7).float(), rand(2, 3, 3, seed=1)
    ref = naive_conv2d(x.double(), k, circular=True)
    # float32 rounds k once and sums 9 products per output: |error| <= (gamma_9 + eps/2) * sum |k||x| < 10 eps * sum |k||x|
    bound = 10 * torch.finfo(torch.float32).eps * naive_conv2d(x.double().abs(), k.abs(), circular=True)
    assert ((circular_conv2d(x, k).double() - ref).abs() <= bound).all()
    eq(circular_conv2d(x, k).dtype, torch.float32)


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize('shape', [(1, 1), (1, 6), (5, 1), (2, 2), (3, 4), (4, 3), (7, 8), (2, 3, 5, 6)])
def test_centre_uncentre_round_trip(shape):
    k = rand(*shape)
    eq(uncentre_kernel(centre_kernel(k)), k)
    eq(centre_kernel(uncentre_kernel(k)), k)
    h, w = shape[-2:]
    d = torch.zeros(h, w); d[0, 0] = 1
    eq(centre_kernel(d).nonzero().tolist(), [[h // 2, w // 2]])


@pytest.mark.parametrize('khw,hw', [((1, 1), (1, 1)), ((1, 1), (4, 5)), ((2, 3), (5, 6)), ((3, 2), (3, 2)), ((4, 4), (9, 8)), ((1, 5), (1, 9))])
def test_embed_kernel_keeps_centre(khw, hw):
    k = rand(2, *khw)
    e = embed_kernel(k, *hw)
    eq(e.shape, (2, *hw))
    eq(e[..., hw[0] // 2, hw[1] // 2], k[..., khw[0] // 2, khw[1] // 2])
    close(e.sum(), k.sum(), eps=1e-12)
    top, left = hw[0] // 2 - khw[0] // 2, hw[1] // 2 - khw[1] // 2
    eq(e[..., top:top + khw[0], left:left + khw[1]], k)


# ---------------------------------------------------------------- padding and cropping
PAD_SIDES = [1, 2, 3, 4, 7, 8]


@pytest.mark.parametrize('mode', PAD_MODES)
@pytest.mark.parametrize('h', PAD_SIDES)
@pytest.mark.parametrize('w', PAD_SIDES)
def test_feature_map_pad_crop_round_trip(mode, h, w):
    x = rand(2, 3, h, w)
    p = feature_map_pads(h, w, mode)
    xp = pad2d(x, p, mode)
    eq(xp.shape, (2, 3, h + p[2] + p[3], w + p[0] + p[1]))
    eq(crop2d(xp, p), x)
    if mode != 'reflect' or min(h, w) > 1:
        eq(xp.shape[-2:], (2 * h, 2 * w))


@pytest.mark.parametrize('mode', PAD_MODES)
@pytest.mark.parametrize('lead', [(), (3,), (2, 3), (2, 1, 3)])
def test_pad2d_any_leading_dims(mode, lead):
    x = rand(*lead, 4, 5)
    p = (1, 2, 3, 0)
    xp = pad2d(x, p, mode)
    eq(xp.shape, (*lead, 7, 8))
    eq(crop2d(xp, p), x)
    ref = pad2d(x.reshape(1, -1, 4, 5), p, mode).reshape(*lead, 7, 8)
    eq(xp, ref)


def _reflect(i, n): return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


@pytest.mark.parametrize('hw', [(1, 1), (1, 4), (2, 2), (3, 5), (6, 4)])
@pytest.mark.parametrize('mode', PAD_MODES)
def test_pad2d_values(hw, mode):
    h, w = hw
    x = rand(h, w)
    p = feature_map_pads(h, w, mode)
    left, right, top, bottom = p
    xp = pad2d(x, p, mode)
    for i in range(h + top + bottom):
        for j in range(w + left + right):
            r, c = i - top, j - left
            if mode == 'zeros': want = x[r, c] if 0 <= r < h and 0 <= c < w else 0.
            elif mode == 'circular': want = x[r % h, c % w]
            else: want = x[_reflect(r, h), _reflect(c, w)]
            eq(xp[i, j], want)


@pytest.mark.parametrize('h', [1, 2, 3, 4, 5, 10])
@pytest.mark.parametrize('w', [1, 2, 3, 9])
def test_reflect_clamping(h, w):
    p = feature_map_pads(h, w, 'reflect')
    z = feature_map_pads(h, w, 'zeros')
    eq(p, tuple(min(a, s - 1) for a, s in zip(z, (w, w, h, h))))
    assert max(p[:2]) <= w - 1 and max(p[2:]) <= h - 1
    pad2d(rand(1, 1, h, w), p, 'reflect')                       # always accepted by pad2d
    if h > 1 and w > 1: eq(p, z)                                # clamping only bites on a side of length 1
    eq(feature_map_pads(h, w, 'circular'), z)
    eq((z[0] + z[1], z[2] + z[3]), (w, h))


@pytest.mark.parametrize('pads', [(0, 0, 0, 0), (1, 0, 2, 0), (0, 3, 0, 1), (2, 2, 1, 1)])
@pytest.mark.parametrize('mode', PAD_MODES)
def test_pad_crop_round_trip_explicit_pads(pads, mode):
    x = rand(1, 2, 4, 5)
    eq(crop2d(pad2d(x, pads, mode), pads), x)
    eq(crop2d(pad2d(x, list(pads), mode), list(pads)), x)      # lists work as well as tuples


@pytest.mark.parametrize('hw', [(5, 7), (8, 6), (9, 9)])
@pytest.mark.parametrize('khw', [(1, 1), (3, 3), (2, 4), (5, 3)])
def test_padded_modes_interior_agrees(hw, khw):
    H, W = hw
    x, k = rand(1, 2, H, W), rand(2, *khw, seed=7)
    ref = circular_conv2d(x, k)
    kh, kw = khw
    inner = (slice(None), slice(None), slice(kh - 1, H - (kh - 1)), slice(kw - 1, W - (kw - 1)))
    for mode in PAD_MODES:
        close(fft_padded_conv2d(x, k, mode)[inner], ref[inner], eps=1e-10)


# ---------------------------------------------------------------- empty batches
@pytest.mark.parametrize('lead', [(0, 3), (0, 1)])
def test_an_empty_batch_gives_an_empty_result(lead):
    "No maps in, no maps out: the shape and dtype a non-empty batch gives, for every route (some FFT backends raise)."
    x = torch.zeros(*lead, 6, 5, dtype=F64)
    kc = rand(lead[1], 3, 2)                                   # depthwise: one kernel per channel
    for y in (circular_conv2d(x, kc), linear_conv2d(x, kc), fft_circular_conv2d(x, embed_kernel(kc, 6, 5)),
              fft_linear_conv2d(x, kc), *(fft_padded_conv2d(x, kc, mode) for mode in PAD_MODES)):
        eq((y.shape, y.dtype), (x.shape, F64))
    for mode in PAD_MODES:
        pads = feature_map_pads(6, 5, mode)
        eq(pad2d(x, pads, mode).shape, (*lead, 6 + pads[2] + pads[3], 5 + pads[0] + pads[1]))


# ---------------------------------------------------------------- Dirichlet kernel
@pytest.mark.parametrize('n,m', [(1, 1), (1, 8), (3, 8), (8, 8), (8, 64), (7, 13), (32, 64)])
def test_dirichlet_is_box_spectrum(n, m):
    box = torch.zeros(m, dtype=F64); box[:n] = 1
    k = torch.arange(m, dtype=F64)
    phase = torch.exp(-1j * math.pi * k * (n - 1) / m)
    close(torch.fft.fft(box), phase * dirichlet_kernel(n, m), eps=1e-9)
    close(dirichlet_kernel(n, m, k + m).abs(), dirichlet_kernel(n, m).abs(), eps=1e-9)   # |D| has period m
    eq(dirichlet_kernel(n, m)[0].item(), n)


# ---------------------------------------------------------------- bad input
X = rand(2, 3, 6, 5)
K = rand(3, 3, 3)


@pytest.mark.parametrize('fn', [circular_conv2d, linear_conv2d])
def test_bad_conv_args(fn):
    with pytest.raises(ValueError, match='x must be a 4-D tensor'): fn(X[0], K)
    with pytest.raises(ValueError, match='x must be a 4-D tensor'): fn(X.tolist(), K)
    with pytest.raises(ValueError, match='k must be'): fn(X, K[0])
    with pytest.raises(TypeError, match='x must be a floating-point'): fn(X.long(), K)
    with pytest.raises(TypeError, match='k must be a floating-point'): fn(X, K.int())
    with pytest.raises(ValueError, match='groups must be a positive int'): fn(X, K, groups=0)
    with pytest.raises(ValueError, match='groups must be a positive int'): fn(X, K, groups=1.5)
    with pytest.raises(ValueError, match=r'channels = x.shape\[1\] = 3'): fn(X, K[:2])
    with pytest.raises(ValueError, match='groups must be 1 or 3'): fn(X, K, groups=2)
    with pytest.raises(ValueError, match='groups=3'): fn(X, rand(4, 1, 3, 3), groups=3)
    with pytest.raises(ValueError, match='groups=1'): fn(X, rand(4, 2, 3, 3))
    with pytest.raises(ValueError, match='non-empty height and width'): fn(X, rand(3, 0, 3))


def test_bad_circular_kernel_size():
    with pytest.raises(ValueError, match='cannot be larger than the input'): circular_conv2d(X, rand(3, 7, 3))


def test_bad_fft_args():
    with pytest.raises(ValueError, match=r'k must have shape \(C, H, W\) = \(3, 6, 5\)'): fft_circular_conv2d(X, K)
    with pytest.raises(ValueError, match=r'k must have shape \(C, H, W\)'): fft_circular_conv2d(X, rand(1, 3, 6, 5))
    with pytest.raises(ValueError, match=r'k must have shape \(C, kh, kw\) with C = 3'): fft_linear_conv2d(X, rand(2, 3, 3))
    with pytest.raises(ValueError, match=r'k must have shape \(C, kh, kw\) with C = 3'): fft_linear_conv2d(X, rand(3, 1, 3, 3))
    with pytest.raises(ValueError, match='x must be a 4-D tensor'): fft_linear_conv2d(X[0], K)
    with pytest.raises(TypeError, match='x must be a real floating-point'): fft_linear_conv2d(X.to(torch.complex128), K)
    with pytest.raises(TypeError, match='x must be a floating-point'): fft_circular_conv2d(X.long(), rand(3, 6, 5))
    with pytest.raises(ValueError, match='a depthwise kernel'): fft_padded_conv2d(X, rand(3, 1, 3, 3))
    with pytest.raises(TypeError, match='x must be a real floating-point'): fft_padded_conv2d(X.to(torch.complex128), K)
    with pytest.raises(ValueError, match='mode must be one of'): fft_padded_conv2d(X, K, 'edge')
    with pytest.raises(ValueError, match='must fit in the padded map'): fft_padded_conv2d(X, rand(3, 13, 3))
    with pytest.raises(ValueError, match='pads must be 4 non-negative ints'): fft_padded_conv2d(X, K, pads=(1, 1))


def test_bad_pad_args():
    with pytest.raises(ValueError, match="mode must be one of 'zeros', 'reflect', 'circular'; got 'edge'"): pad2d(X, (1, 1, 1, 1), 'edge')
    with pytest.raises(ValueError, match='mode must be one of'): feature_map_pads(3, 3, 'replicate')
    with pytest.raises(ValueError, match='h must be a positive int'): feature_map_pads(0, 3)
    with pytest.raises(ValueError, match='w must be a positive int'): feature_map_pads(3, 2.0)
    with pytest.raises(ValueError, match='h must be a positive int'): feature_map_pads(True, 3)
    for bad in [(1, 1, 1), (1, 1, 1, 1, 1), (1, -1, 0, 0), (1.0, 0, 0, 0), 3, None, 'abcd']:
        with pytest.raises(ValueError, match='pads must be 4 non-negative ints'): pad2d(X, bad)
        with pytest.raises(ValueError, match='pads must be 4 non-negative ints'): crop2d(X, bad)
    with pytest.raises(ValueError, match='reflect pads must be smaller'): pad2d(X, (5, 0, 0, 0), 'reflect')
    with pytest.raises(ValueError, match='reflect pads must be smaller'): pad2d(X, (0, 0, 0, 6), 'reflect')
    with pytest.raises(ValueError, match='circular pads cannot exceed'): pad2d(X, (6, 0, 0, 0), 'circular')
    pad2d(X, (5, 5, 6, 6), 'circular')                                        # a full period is fine
    with pytest.raises(ValueError, match='x must be a tensor with at least 2 dims'): pad2d(rand(5), (1, 1, 0, 0))
    with pytest.raises(ValueError, match='would remove all'): crop2d(X, (0, 0, 3, 3))
    with pytest.raises(ValueError, match='would remove all'): crop2d(X, (5, 0, 0, 0))


def test_bad_kernel_helpers():
    with pytest.raises(ValueError, match='k must be a tensor with at least 2 dims'): centre_kernel(rand(5))
    with pytest.raises(ValueError, match='k must be a tensor with at least 2 dims'): uncentre_kernel([[1.0]])
    with pytest.raises(ValueError, match=r'k \(3x4\) must fit in the frame h x w = 3x3'): embed_kernel(rand(3, 4), 3, 3)
    with pytest.raises(ValueError, match='h must be a positive int'): embed_kernel(rand(3, 3), 0, 3)
    with pytest.raises(ValueError, match='w must be a positive int'): embed_kernel(rand(3, 3), 3, 3.5)
    for n, m in [(0, 4), (5, 4), (2.0, 4), (2, None)]:
        with pytest.raises(ValueError, match='n and m must be ints with 1 <= n <= m'): dirichlet_kernel(n, m)

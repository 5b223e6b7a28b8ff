"""Tests for niff_nb.official: models saved by the paper's own code load into niff_nb and compute the same logits.

The paper's code cannot be vendored, so this file carries an independent implementation of its operator, written from
its description: full `fft2`, `fftshift`/`ifftshift` over *all* dimensions (batch and channels included), the
coordinate mask `arange(-N/2, N/2)` (half-integer labels for odd N), the product with `MLP_re + i·MLP_im`, then
`ifft2(...).real`; the 1x1 as a bias-free `nn.Linear` over channels applied to real and imaginary parts; the full
convolution as an einsum over an (in, out, H, W) reshape of the MLP output. The modules keep the official
state_dict names (`mlp_real.layer_mpl1.weight`, `mlp.weight`, ...) and are put into torchvision models where the
official files put them.
"""
import argparse
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from fastcore.test import test_eq as eq, test_fail as fails

from niff_nb.core import ArgumentError
from niff_nb.layers import ImplicitFilter
from niff_nb.official import (OFFICIAL_ARCHS, OfficialLoadError, from_official, inspect_official, official_full_index,
                              official_name, official_roll, read_official)

BIG, SMALL, TINY = (16, 128, 32), (8, 4), (8,)
DT = torch.float64


# ---------------------------------------------------------------- the official operator, written from its description

def mask(n, dtype):
    "Channel 0: labels -n/2 … n/2-1 along the last (horizontal) axis; channel 1 the same along the vertical axis."
    lab = torch.arange(n, dtype=dtype) - n / 2
    return torch.cat([lab.repeat(n, 1)[None], lab[:, None].repeat(1, n)[None]])


class RefMLP(nn.Module):
    def __init__(self, out, hidden):
        super().__init__()
        widths = (2, *hidden, out)
        self.n = len(widths) - 1
        for i in range(self.n): setattr(self, f'layer_mpl{i + 1}', nn.Conv2d(widths[i], widths[i + 1], 1))

    def forward(self, m):
        x = m.unsqueeze(0)
        for i in range(self.n):
            x = getattr(self, f'layer_mpl{i + 1}')(x)
            if i < self.n - 1: x = F.silu(x)
        return x


class RefDW(nn.Module):
    "FreqConv_DW_fftifft (back=True) or FreqConv_DW_fft (back=False: the shifted product is returned)."
    def __init__(self, channels, hidden, back=True):
        super().__init__()
        self.back = back
        self.mlp_imag, self.mlp_real = RefMLP(channels, hidden), RefMLP(channels, hidden)

    def forward(self, x):
        assert x.shape[-1] == x.shape[-2], 'the official layers take square inputs'
        m = mask(x.shape[-1], x.dtype)
        y = torch.complex(self.mlp_real(m), self.mlp_imag(m)) * torch.fft.fftshift(torch.fft.fft2(x))
        return torch.fft.ifft2(torch.fft.ifftshift(y)).real if self.back else y


class Ref1x1(nn.Module):
    "FreqConv_1x1_fftifft ('fftifft'), FreqConv_1x1_ifft ('ifft', after a DW_fft) or the channels-last ConvNeXt form."
    def __init__(self, cin, cout, mode='fftifft'):
        super().__init__()
        self.mode, self.mlp = mode, nn.Linear(cin, cout, bias=False)

    def _mix(self, z):               # z: (..., C) complex, channels last
        return torch.complex(self.mlp(z.real), self.mlp(z.imag))

    def forward(self, x):
        if self.mode == 'convnext':  # x: (B, H, W, C)
            z = torch.fft.fft2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return torch.fft.ifft2(self._mix(z).permute(0, 3, 1, 2)).real.permute(0, 2, 3, 1)
        if self.mode == 'fftifft':
            return torch.fft.ifft2(self._mix(torch.fft.fft2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)).real
        return torch.fft.ifft2(torch.fft.ifftshift(self._mix(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))).real


class RefFull(nn.Module):
    "FreqConv_full_fftifft: MLP_tiny with Cin·Cout outputs reshaped (Cin, Cout, H, W), einsum over the shifted spectrum."
    def __init__(self, cin, cout, hidden=TINY):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.mlp_imag, self.mlp_real = RefMLP(cin * cout, hidden), RefMLP(cin * cout, hidden)

    def forward(self, x):
        n = x.shape[-1]
        m = mask(n, x.dtype)
        w = torch.complex(self.mlp_real(m), self.mlp_imag(m)).reshape(self.cin, self.cout, n, n)
        y = torch.einsum('bihw,iohw->bohw', torch.fft.fftshift(torch.fft.fft2(x)), w)
        return torch.fft.ifft2(torch.fft.ifftshift(y)).real


def officialise(model, form='split', hidden=SMALL):
    """Replace the convolutions of a torchvision model the way the official files do: stride-2 convolutions and the stem
    stay, stride-1 1x1 → FreqConv_1x1_fftifft, depthwise → FreqConv_DW_fftifft, other stride-1 convs →
    Sequential(FreqConv_DW_fft, FreqConv_1x1_ifft) ('split') or FreqConv_full_fftifft ('full')."""
    for name, conv in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]:
        if conv.stride != (1, 1): continue
        cin, cout = conv.in_channels, conv.out_channels
        if conv.kernel_size == (1, 1): new = Ref1x1(cin, cout)
        elif conv.groups == cin == cout: new = RefDW(cin, hidden)
        elif form == 'full': new = RefFull(cin, cout)
        else: new = nn.Sequential(RefDW(cin, hidden, back=False), Ref1x1(cin, cout, 'ifft'))
        parent, _, child = name.rpartition('.')
        setattr(model.get_submodule(parent), child, new)
    return model


class RefLayerNorm(nn.Module):
    "ConvNeXt's LayerNorm: F.layer_norm channels-last, or mean/variance over dim 1 channels-first."
    def __init__(self, dim, channels_first=False):
        super().__init__()
        self.weight, self.bias, self.cf = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), channels_first

    def forward(self, x):
        if not self.cf: return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-6)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + 1e-6)) + self.bias[:, None, None]


class RefBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv, self.norm = RefDW(dim, BIG), RefLayerNorm(dim)
        self.pwconv1, self.act, self.pwconv2 = Ref1x1(dim, 4 * dim, 'convnext'), nn.GELU(), Ref1x1(4 * dim, dim, 'convnext')
        self.gamma = nn.Parameter(torch.rand(dim))

    def forward(self, x):
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class RefConvNeXt(nn.Module):
    "The facebookresearch ConvNeXt layout of the official convnext_niff.py (tiny: depths 3, 3, 9, 3)."
    def __init__(self, num_classes=1000, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), RefLayerNorm(dims[0], True))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(RefLayerNorm(dims[i], True), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.stages = nn.ModuleList([nn.Sequential(*[RefBlock(d) for _ in range(n)]) for d, n in zip(dims, depths)])
        self.norm, self.head = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages): x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


def randomise(model, seed=0, calibrate=48):
    """Random BatchNorm statistics and affine parameters (and LayerNorm affines), so that no layer is the identity.

    The statistics are first measured on a noise batch at `calibrate` pixels and then perturbed at random, so that
    activations stay O(1) and the residual and downsampling paths weigh as much as the NIFF layers in the logits."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns and calibrate:
        for m in bns: m.reset_running_stats(); m.momentum = None
        model.train()
        with torch.no_grad(): model(torch.randn(2, 3, calibrate, calibrate, dtype=DT, generator=g))
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            m.running_mean.add_(0.2 * torch.randn(c, generator=g, dtype=DT) * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(c, generator=g, dtype=DT) * 1.5 + 0.5)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, RefLayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def official(arch, form='split', num_classes=1000, seed=0):
    torch.manual_seed(seed)
    if arch == 'convnext_tiny': model = RefConvNeXt(num_classes)
    else:
        model = officialise(getattr(torchvision.models, arch)(weights=None, num_classes=num_classes), form,
                            BIG if arch in ('resnet34', 'resnet101') else SMALL)
    return randomise(model.to(DT), seed)


def rel_err(ref_model, model, size, batch=1, seed=0):
    x = torch.randn(batch, 3, size, size, dtype=DT, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(): ref, ours = ref_model(x), model(x)
    assert ref.abs().max() > 1e-3 and torch.isfinite(ref).all()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------- logits: niff_nb vs the official operator

# (arch, form, [(size, batch)], MLP preset the keys must reveal). ResNet-34 uses the big MLP of the code's earlier
# revision (fft_big), so that both widths are read from keys; the current files give every ResNet the small one.
CASES = [
    ('resnet18', 'split', [(224, 1), (112, 2)], 'small'),
    ('resnet50', 'split', [(224, 1), (112, 1)], 'small'),
    ('resnet18', 'full', [(112, 1)], 'tiny'),
    ('resnet34', 'split', [(96, 1)], 'big'),
    ('densenet121', 'split', [(56, 2)], 'small'),
    ('densenet121', 'full', [(56, 1)], 'tiny'),
    ('mobilenet_v2', 'split', [(96, 1)], 'small'),
    ('convnext_tiny', 'split', [(112, 1)], 'big'),
]
SLOW_CASES = [
    ('resnet18', 'full', [(224, 1)], 'tiny'),
    ('resnet50', 'full', [(96, 1)], 'tiny'),
    ('resnet101', 'split', [(96, 1)], 'big'),
    ('convnext_tiny', 'split', [(224, 1)], 'big'),
]
slow = pytest.mark.skipif(os.environ.get('NIFF_SLOW') != '1', reason='heavy float64 case: run with NIFF_SLOW=1')
ERRORS = {}   # (arch, form, size) -> relative error, printed at the end with -s


def check_logits(arch, form, sizes, mlp):
    t0 = time.time()
    ref = official(arch, form)
    info = inspect_official(ref.state_dict(), arch)
    eq((info['form'], info['mlp']), ('niff_full' if form == 'full' else 'niff', mlp))
    model = from_official(ref.state_dict(), arch).eval()
    eq(next(model.parameters()).dtype, DT)
    for size, batch in sizes:
        err = ERRORS[arch, form, size] = rel_err(ref, model, size, batch)
        assert err <= 1e-8, f"{arch} {form} at {size} px: relative error {err:.2e}"
    print(f"{arch} {form}: " + ', '.join(f"{s} px {ERRORS[arch, form, s]:.1e}" for s, _ in sizes) + f" ({time.time() - t0:.0f} s)")


@pytest.mark.parametrize('arch,form,sizes,mlp', CASES, ids=[f"{a}-{f}" for a, f, *_ in CASES])
def test_logits_match_the_official_operator(arch, form, sizes, mlp):
    check_logits(arch, form, sizes, mlp)


@slow
@pytest.mark.parametrize('arch,form,sizes,mlp', SLOW_CASES, ids=[f"{a}-{f}-{s[0][0]}" for a, f, s, _ in SLOW_CASES])
def test_logits_match_the_official_operator_heavy(arch, form, sizes, mlp):
    check_logits(arch, form, sizes, mlp)


def test_every_official_arch_is_exercised():
    eq(sorted({a for a, *_ in CASES + SLOW_CASES}), sorted(OFFICIAL_ARCHS))


# ---------------------------------------------------------------- the conventions matter (controls)

@pytest.fixture(scope='module')
def r18():
    "A split-conv ResNet-18 of the official layout (10 classes), its state dict and a 112 px input (7x7 maps in layer4)."
    ref = official('resnet18', num_classes=10, seed=1)
    return ref, ref.state_dict()


def test_without_the_channel_roll_the_logits_differ(r18, monkeypatch):
    ref, sd = r18
    import niff_nb.official as off
    monkeypatch.setattr(off, 'official_roll', lambda n: torch.arange(n))
    assert rel_err(ref, from_official(sd, 'resnet18').eval(), 64) > 1e-3


def test_integer_labels_differ_only_at_odd_sizes(r18):
    ref, sd = r18
    errs = {}
    for size in (128, 112):                       # maps 32, 16, 8, 4 (all even) / 28, 14, 7, 4
        model = from_official(sd, 'resnet18').eval()
        for m in model.modules():
            if isinstance(m, ImplicitFilter): m.coords = 'index'
        errs[size] = rel_err(ref, model, size)
    assert errs[128] < 1e-12 and errs[112] > 1e-5, errs


def test_the_loaded_model_runs_at_other_and_non_square_sizes(r18):
    _, sd = r18
    model = from_official(sd, 'resnet18').eval()
    with torch.no_grad():
        for h, w in ((64, 80), (33, 47), (224, 224)): eq(tuple(model(torch.randn(1, 3, h, w, dtype=DT)).shape), (1, 10))


# ---------------------------------------------------------------- checkpoints on disk, wrappers, dtypes

def test_checkpoint_files_and_wrappers(r18, tmp_path):
    ref, sd = r18
    ckpt = {'model': {f'module.{k}': v for k, v in sd.items()}, 'epoch': 7, 'args': argparse.Namespace(lr=4e-3, model='resnet18')}
    torch.save(ckpt, tmp_path / 'checkpoint-best.pth')
    model = from_official(tmp_path / 'checkpoint-best.pth', 'resnet18').eval()
    assert rel_err(ref, model, 64) < 1e-12
    torch.save({'state_dict': sd}, tmp_path / 'plain.pt')
    assert rel_err(ref, from_official(str(tmp_path / 'plain.pt'), 'resnet18').eval(), 64) < 1e-12
    eq(model.official['num_classes'], 10); eq(model.official['missing'], []); eq(model.official['unplaced'], [])
    eq(list(read_official({'net': {'_orig_mod.a': torch.ones(1)}})), ['a'])


class Opaque:
    "An arbitrary pickled object, which torch.load(weights_only=True) must refuse."


def test_refuses_pickled_objects_and_bad_sources(tmp_path):
    torch.save({'model': {'a': torch.ones(1)}, 'obj': Opaque()}, tmp_path / 'unsafe.pth')
    fails(lambda: read_official(tmp_path / 'unsafe.pth'), contains='weights_only=True')
    fails(lambda: read_official(tmp_path / 'missing.pth'), contains='is not a file')
    fails(lambda: read_official({'epoch': 1}), contains="a checkpoint dict holding one under 'state_dict'")
    fails(lambda: read_official(42), contains='got int')


def test_dtype_follows_the_checkpoint_or_the_argument(r18):
    _, sd = r18
    sd32 = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    eq(next(from_official(sd32, 'resnet18').parameters()).dtype, torch.float32)
    eq(next(from_official(sd, 'resnet18', dtype=torch.float32).parameters()).dtype, torch.float32)
    sd16 = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    eq(next(from_official(sd16, 'resnet18').parameters()).dtype, torch.float32)


# ---------------------------------------------------------------- error cases

def test_unknown_key(r18):
    _, sd = r18
    with pytest.raises(OfficialLoadError) as e: from_official(dict(sd, **{'layer9.0.bn1.weight': torch.ones(4)}), 'resnet18')
    assert "cannot place official key 'layer9.0.bn1.weight' in a niff_nb resnet18" in str(e.value)
    assert "has no parameter or buffer 'layer9.0.bn1.weight'" in str(e.value)
    eq([k for k, _ in e.value.unplaced], ['layer9.0.bn1.weight']); eq(e.value.missing, [])
    fails(lambda: from_official(dict(sd, **{'layer1.0.bn1.mlp.weight': torch.ones(64, 64)}), 'resnet18'),
          contains="has BatchNorm2d at 'layer1.0.bn1', not a 1x1 convolution or Linear")


def test_shape_mismatch(r18):
    _, sd = r18
    bad = dict(sd, **{f'layer2.1.conv1.0.mlp_{p}.layer_mpl3.weight': torch.ones(64, 4, 1, 1, dtype=DT) for p in ('real', 'imag')})
    fails(lambda: from_official(bad, 'resnet18'),
          contains="'layer2.1.conv1.0.mlp_imag.layer_mpl3.weight' in a niff_nb resnet18: its shape (64, 4, 1, 1) does not fit "
                   "'layer2.1.conv1.depthwise.implicit.imag.4.weight' of shape (128, 4, 1, 1)")
    fails(lambda: from_official(sd, 'resnet18', num_classes=100), contains="its shape (10, 512) does not fit 'fc.weight'")


def test_missing_keys_are_named(r18):
    _, sd = r18
    drop = ('bn1.running_var', 'layer4.1.conv2.0.mlp_real.layer_mpl1.bias')
    with pytest.raises(ValueError) as e: from_official({k: v for k, v in sd.items() if k not in drop}, 'resnet18')
    assert ("2 key(s) of the niff_nb model received nothing: 'bn1.running_var', "
            "'layer4.1.conv2.depthwise.implicit.real.0.bias'") in str(e.value)
    eq(e.value.unplaced, [])


def test_wrong_arch(r18):
    _, sd = r18
    fails(lambda: from_official(sd, 'resnet152'), contains="arch='resnet152' is not supported; use one of 'resnet18', 'resnet34'")
    fails(lambda: from_official(sd, 'vgg16'), contains="'convnext_tiny'")
    with pytest.raises(ArgumentError): from_official(sd, 'resnet152')
    with pytest.raises(OfficialLoadError) as e: from_official(sd, 'resnet50')
    assert "cannot place official key 'layer1.0.conv1.0.mlp_imag.layer_mpl1.weight'" in str(e.value)
    assert "Is arch='resnet50' the architecture the checkpoint was saved from?" in str(e.value)
    fails(lambda: from_official(sd, 'densenet121'), contains="cannot infer num_classes: the classifier weight 'classifier.weight'")


def test_state_dicts_no_official_model_could_have_written(r18):
    _, sd = r18
    fails(lambda: from_official(torchvision.models.resnet18().state_dict(), 'resnet18'), contains='has no NIFF layer')
    no_imag = {k: v for k, v in sd.items() if 'layer1.0.conv1.0.mlp_imag' not in k}
    fails(lambda: from_official(no_imag, 'resnet18'), contains="'layer1.0.conv1.0' has an incomplete mlp_imag")
    mixed = dict(sd, **{k.replace('layer1.0.conv1.0.', 'layer1.0.conv2.'): v for k, v in sd.items() if k.startswith('layer1.0.conv1.0.')})
    fails(lambda: from_official(mixed, 'resnet18'), contains='mixes separated')
    wide = dict(sd, **{'layer1.0.conv1.0.mlp_real.layer_mpl2.weight': torch.ones(5, 8, 1, 1, dtype=DT)})
    fails(lambda: from_official(wide, 'resnet18'), contains="mlp_real widths (2, 8, 5, 64) but mlp_imag (2, 8, 4, 64)")


def test_strict_false_loads_what_fits(r18):
    ref, sd = r18
    model = from_official(sd, 'resnet18', num_classes=100, strict=False)
    eq([k for k, _ in model.official['unplaced']], ['fc.weight', 'fc.bias'])
    eq(model.official['missing'], ['fc.weight', 'fc.bias'])
    torch.testing.assert_close(model.layer1[0].conv1.pointwise.weight[:, :, 0, 0],
                               sd['layer1.0.conv1.1.mlp.weight'][official_roll(64)][:, official_roll(64)])


# ---------------------------------------------------------------- small pieces

def test_index_maps():
    eq(official_roll(5).tolist(), [2, 3, 4, 0, 1])
    eq(sorted(official_full_index(6, 4).tolist()), list(range(24)))
    eq(official_full_index(3, 2).tolist(), [3, 5, 1, 2, 4, 0])    # j = o·3 + c → ((c+1)%3)·2 + (o+1)%2
    fails(lambda: official_roll(0), contains='n must be a positive int')


def test_convnext_names():
    eq(official_name('stages.3.2.pwconv2.mlp.weight', 'convnext_tiny'), 'features.7.2.block.5.mlp.weight')
    eq(official_name('downsample_layers.0.1.weight', 'convnext_tiny'), 'features.0.1.weight')
    eq(official_name('stages.0.0.gamma', 'convnext_tiny'), 'features.1.0.layer_scale')
    eq(official_name('features.0.0.weight', 'mobilenet_v2'), 'features.0.0.weight')


def test_print_summary():
    if ERRORS:
        print('\nworst relative error per architecture:')
        worst = {}
        for (a, f, s), e in ERRORS.items():
            if e >= worst.get((a, f), (0, 0))[0]: worst[a, f] = (e, s)
        for (a, f), (e, s) in worst.items(): print(f"  {a:14s} {f:5s} {e:.1e} (at {s} px)")

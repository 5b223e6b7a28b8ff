"""Tests for `niff_nb.data`: IDX reader, dataset search and errors, fake CIFAR-10 and ImageFolder trees, transforms, loaders.

The notebook `nbs/04_data.ipynb` teaches; this file covers the faults and the layouts that are not on this machine.
"""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastcore.test import test_close as close, test_eq as eq
from PIL import Image

import niff_nb.data as data
from niff_nb.data import (CIFAR10_CLASSES, DATASETS, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                          BatchTransform, DatasetInfo, DatasetNotFoundError, TensorImageDataset, dataset_info,
                          eval_transform, get_dataloaders, get_dataset, make_loader, random_crop_flip, read_idx,
                          set_epoch, subset_dataset, train_transform)

DEBIAN = data.FASHION_MNIST_DIR
HAVE_FMNIST = all((DEBIAN / f'{s}.gz').is_file() for s in
                  ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'))
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason='apt-get install -y dataset-fashion-mnist')


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    "Every test gets its own empty data_dir(), so nothing reads or writes the user's cache."
    monkeypatch.setenv('NIFF_NB_DATA', str(tmp_path / 'cache'))


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    "A machine without the dataset-fashion-mnist package."
    monkeypatch.setattr(data, 'FASHION_MNIST_DIR', tmp_path / 'not-installed')


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f'>{arr.ndim}I', *arr.shape) + arr.tobytes()


# --------------------------------------------------------------------------------------------- IDX reader
@pytest.mark.parametrize('compress', [False, True])
@pytest.mark.parametrize('code,dtype', [(0x08, np.uint8), (0x09, np.int8), (0x0B, '>i2'), (0x0C, '>i4'), (0x0D, '>f4'), (0x0E, '>f8')])
def test_read_idx_roundtrip(tmp_path, compress, code, dtype):
    a = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    raw = idx_bytes(a, code)
    f = tmp_path / 'x.idx'                        # the name says nothing: gzip is detected by its magic bytes
    f.write_bytes(gzip.compress(raw) if compress else raw)
    t = read_idx(f)
    eq(tuple(t.shape), (2, 3, 5))
    eq(t, torch.from_numpy(a.astype(np.dtype(dtype).newbyteorder('='))))


def test_read_idx_labels_like_mnist(tmp_path):
    y = np.array([9, 0, 0, 3], np.uint8)
    (tmp_path / 'labels-idx1-ubyte.gz').write_bytes(gzip.compress(idx_bytes(y, 0x08)))
    eq(read_idx(tmp_path / 'labels-idx1-ubyte.gz').tolist(), [9, 0, 0, 3])


@pytest.mark.parametrize('mangle,msg', [
    (lambda r: r[:-1], 'truncated IDX file'),
    (lambda r: r + b'\0', 'trailing bytes'),
    (lambda r: r[:10], 'truncated IDX header'),
    (lambda r: b'\x01' + r[1:], 'not an IDX file'),
    (lambda r: r[:2] + b'\x07' + r[3:], 'not an IDX file'),
    (lambda r: r[:3] + b'\x00' + r[4:], 'not an IDX file'),
    (lambda r: b'', 'not an IDX file'),
    (lambda r: gzip.compress(r)[:-10], 'corrupt or truncated gzip'),
    (lambda r: gzip.compress(r)[:12] + b'garbage' * 5, 'corrupt or truncated gzip'),
])
def test_read_idx_rejects_corrupt_files(tmp_path, mangle, msg):
    raw = idx_bytes(np.zeros((4, 3, 3), np.uint8), 0x08)
    f = tmp_path / 'bad-idx3-ubyte'
    f.write_bytes(mangle(raw))
    with pytest.raises(ValueError, match=msg) as e:
        read_idx(f)
    assert str(f) in str(e.value)


def test_read_idx_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / 'nope.gz')


# ----------------------------------------------------------------------------------- Fashion-MNIST (Debian)
@pytest.fixture(scope='module')
def fmnist():
    return get_dataset(split='train', transform=None), get_dataset(split='test', transform=None)


@needs_fmnist
def test_fashion_mnist_from_debian(fmnist):
    tr, te = fmnist
    eq((len(tr), len(te)), (60000, 10000))
    eq((tr.data.shape, tr.data.dtype, tr.targets.dtype), ((60000, 1, 28, 28), torch.uint8, torch.int64))
    eq(te.data.shape, (10000, 1, 28, 28))
    eq((int(tr.targets.min()), int(tr.targets.max())), (0, 9))
    eq(torch.bincount(te.targets).tolist(), [1000] * 10)
    eq(tr.classes, FASHION_MNIST_CLASSES)
    x, y = tr[0]
    eq((x.shape, x.dtype, type(y)), ((1, 28, 28), torch.uint8, int))


@needs_fmnist
def test_fashion_mnist_statistics_match_the_data(fmnist):
    counts = torch.bincount(fmnist[0].data.flatten(), minlength=256).double()     # exact, and fast: 256 pixel values
    v = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * v).sum() / counts.sum()
    std = ((counts * (v - mean) ** 2).sum() / counts.sum()).sqrt()
    close(mean.item(), FASHION_MNIST_MEAN[0], eps=1e-3)
    close(std.item(), FASHION_MNIST_STD[0], eps=1e-3)


@needs_fmnist
def test_fashion_mnist_default_transform_normalises(fmnist):
    ds = get_dataset(split='test')
    xb = torch.stack([ds[i][0] for i in range(2000)])
    eq((xb.dtype, xb.shape[1:]), (torch.float32, (1, 28, 28)))
    close(xb.mean().item(), 0., eps=0.05)
    close(xb.std().item(), 1., eps=0.05)


@needs_fmnist
@pytest.mark.parametrize('layout', ['flat-raw', 'flat-gz', 'torchvision'])
def test_fashion_mnist_root_is_searched_first(tmp_path, fmnist, layout):
    "A copy under `root` (flat, raw or gz, or torchvision's FashionMNIST/raw) is used; nothing else is searched."
    d = tmp_path / 'fm' / ('FashionMNIST/raw' if layout == 'torchvision' else '')
    d.mkdir(parents=True)
    x = np.full((3, 28, 28), 7, np.uint8)
    y = np.array([1, 2, 3], np.uint8)
    for stem, arr in [('t10k-images-idx3-ubyte', x), ('t10k-labels-idx1-ubyte', y)]:
        raw = idx_bytes(arr, 0x08)
        (d / (stem + ('.gz' if layout == 'flat-gz' else ''))).write_bytes(gzip.compress(raw) if layout == 'flat-gz' else raw)
    ds = get_dataset(split='test', root=tmp_path / 'fm', transform=None)
    eq(len(ds), 3)
    eq(ds.targets.tolist(), [1, 2, 3])
    with pytest.raises(DatasetNotFoundError, match='only that directory is searched') as e:
        get_dataset(split='train', root=tmp_path / 'fm', transform=None)   # not under root: an error, not the Debian copy
    assert str(tmp_path / 'fm') in str(e.value) and str(DEBIAN) + ':' not in str(e.value)


def test_fashion_mnist_missing(tmp_path, no_debian):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset('fashion-mnist')
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for place in (tmp_path / 'not-installed', tmp_path / 'cache', tmp_path / 'cache' / 'FashionMNIST' / 'raw'):
        assert f'{place}:' in msg, (place, msg)
    assert 'apt-get install -y dataset-fashion-mnist' in msg
    assert 'download=True' in msg
    eq(len(e.value.searched), 3)
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset('fashion-mnist', root=tmp_path / 'mine')
    eq([p.split(': ')[0] for p in e.value.searched], [str(tmp_path / 'mine'), str(tmp_path / 'mine' / 'FashionMNIST' / 'raw')])
    assert 'download=True' in str(e.value) and f"root={str(tmp_path / 'mine')!r} was given" in str(e.value)


def test_fashion_mnist_partial_directory_names_missing_files(tmp_path, no_debian):
    (tmp_path / 'fm').mkdir()
    (tmp_path / 'fm' / 't10k-images-idx3-ubyte.gz').write_bytes(b'')
    with pytest.raises(DatasetNotFoundError, match=r'missing t10k-labels-idx1-ubyte\[\.gz\]'):
        get_dataset(split='test', root=tmp_path / 'fm')


def test_fashion_mnist_download_failure_is_clear(tmp_path, no_debian, monkeypatch):
    import torchvision
    def offline(root, train, download):
        raise RuntimeError('Error downloading train-images-idx3-ubyte.gz')
    monkeypatch.setattr(torchvision.datasets, 'FashionMNIST', offline)
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset(root=tmp_path / 'dl', download=True)
    assert f"download of fashion-mnist into {tmp_path / 'dl'} failed: RuntimeError: Error downloading" in str(e.value)
    assert 'apt-get install -y dataset-fashion-mnist' in str(e.value)


def test_fashion_mnist_download_goes_to_the_user_cache(tmp_path, no_debian, monkeypatch):
    "Without root, torchvision's downloader gets data_dir() (never a system directory), and the files are read from there."
    import torchvision
    calls = []
    def fake_download(root, train, download):
        calls.append((root, train, download))
        raw = root / 'FashionMNIST' / 'raw'
        raw.mkdir(parents=True)
        (raw / 'train-images-idx3-ubyte').write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8), 0x08))
        (raw / 'train-labels-idx1-ubyte').write_bytes(idx_bytes(np.array([4, 5], np.uint8), 0x08))
    monkeypatch.setattr(torchvision.datasets, 'FashionMNIST', fake_download)
    ds = get_dataset(download=True, transform=None)
    eq(calls, [(tmp_path / 'cache', True, True)])
    eq(ds.targets.tolist(), [4, 5])
    eq(get_dataset(transform=None).targets.tolist(), [4, 5])   # found in the cache next time, without download


def test_never_downloads_into_system_directories(no_debian, monkeypatch):
    import torchvision
    def boom(*a, **k): raise AssertionError('must not be called')
    monkeypatch.setattr(torchvision.datasets, 'FashionMNIST', boom)
    target = data.Path('/usr/share/datasets/niff-nb-test-never-created')
    with pytest.raises(DatasetNotFoundError, match='is a system directory'):
        get_dataset(root=target, download=True)
    assert not target.exists()


def test_imagefolder_cannot_download(tmp_path):
    with pytest.raises(ValueError, match='download must be False for imagefolder'):
        get_dataset('imagefolder', root=tmp_path, download=True)


def test_no_download_without_asking(tmp_path, no_debian, monkeypatch):
    import torchvision
    def boom(*a, **k): raise AssertionError('must not download')
    monkeypatch.setattr(torchvision.datasets, 'FashionMNIST', boom)
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', boom)
    with pytest.raises(DatasetNotFoundError): get_dataset()
    with pytest.raises(DatasetNotFoundError): get_dataset('cifar10', root=tmp_path)


# ------------------------------------------------------------------------------------------- fake CIFAR-10
def write_cifar(root, n=4, protocol=2, bytes_keys=False):
    "A CIFAR-10 stand-in in the real format: cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta."
    d = root / 'cifar-10-batches-py'
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for k, f in enumerate([f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = [(k + j) % 10 for j in range(n)]
        batch = {'batch_label': f, 'labels': y, 'data': x.reshape(n, -1), 'filenames': [f'{f}_{j}.png' for j in range(n)]}
        if bytes_keys: batch = {key.encode(): v for key, v in batch.items()}
        (d / f).write_bytes(pickle.dumps(batch, protocol=protocol))
        out[f] = (x, y)
    (d / 'batches.meta').write_bytes(pickle.dumps({'label_names': list(CIFAR10_CLASSES)}, protocol=protocol))
    return out


@pytest.mark.parametrize('protocol,bytes_keys', [(2, False), (pickle.DEFAULT_PROTOCOL, False), (5, True)])
def test_cifar10_fake(tmp_path, protocol, bytes_keys):
    ref = write_cifar(tmp_path, protocol=protocol, bytes_keys=bytes_keys)
    tr = get_dataset('cifar10', 'train', root=tmp_path, transform=None)
    te = get_dataset('cifar10', 'test', root=tmp_path, transform=None)
    eq((len(tr), len(te)), (20, 4))
    eq(tr.data[:4], torch.from_numpy(ref['data_batch_1'][0]))
    eq(tr.targets.tolist(), sum((ref[f'data_batch_{i}'][1] for i in range(1, 6)), []))
    eq(te.classes, CIFAR10_CLASSES)
    x, y = get_dataset('cifar10', 'train', root=tmp_path)[0]
    eq((x.shape, x.dtype, y), ((3, 32, 32), torch.float32, ref['data_batch_1'][1][0]))


def test_cifar10_root_may_be_the_batches_directory(tmp_path):
    write_cifar(tmp_path)
    eq(len(get_dataset('cifar10', 'test', root=tmp_path / 'cifar-10-batches-py')), 4)


def test_cifar10_loaders(tmp_path):
    write_cifar(tmp_path, n=8)
    tr, te = get_dataloaders('cifar10', root=tmp_path, batch_size=16, subset=(30, 6))
    xb, yb = next(iter(tr))
    eq((xb.shape, xb.dtype, yb.shape), ((16, 3, 32, 32), torch.float32, (16,)))
    eq((len(tr.dataset), len(te.dataset), len(tr)), (30, 6, 1))
    eq(sum(len(y) for _, y in te), 6)


def test_cifar10_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset('cifar10', root=tmp_path / 'c')
    msg = str(e.value)
    for place in (tmp_path / 'c' / 'cifar-10-batches-py', tmp_path / 'c'):
        assert f'{place}:' in msg
    assert "get_dataset('cifar10', root=DIR, download=True)" in msg
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset('cifar10')
    assert f"{tmp_path / 'cache' / 'cifar-10-batches-py'}:" in str(e.value)


def test_cifar10_partial_directory(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_3').unlink()
    with pytest.raises(DatasetNotFoundError, match='missing data_batch_3'):
        get_dataset('cifar10', root=tmp_path)
    eq(len(get_dataset('cifar10', 'test', root=tmp_path)), 4)   # the test split is complete


def test_cifar10_download_failure_is_clear(tmp_path, monkeypatch):
    import torchvision
    def offline(root, train, download): raise OSError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline)
    with pytest.raises(DatasetNotFoundError, match=r'download of cifar10 into .* failed: OSError: \[Errno -3\]'):
        get_dataset('cifar10', root=tmp_path, download=True)


@pytest.mark.parametrize('content,msg', [
    (b'not a pickle at all', 'not a readable CIFAR-10 batch'),
    (pickle.dumps({'data': np.zeros((2, 100), np.uint8), 'labels': [0, 1]}), r"expected 'data' uint8 \(n, 3072\)"),
    (pickle.dumps({'data': np.zeros((2, 3072), np.uint8), 'labels': [0]}), 'not a CIFAR-10 batch'),
    (pickle.dumps({'data': np.zeros((2, 3072), np.uint8), 'labels': [0, 10]}), r'labels must lie in \[0, 10\)'),
    (pickle.dumps([1, 2, 3]), 'not a CIFAR-10 batch'),
])
def test_cifar10_corrupt_batch(tmp_path, content, msg):
    write_cifar(tmp_path)
    (tmp_path / 'cifar-10-batches-py' / 'test_batch').write_bytes(content)
    with pytest.raises(ValueError, match=msg):
        get_dataset('cifar10', 'test', root=tmp_path)


class Evil:
    def __reduce__(self): return (exec, ("raise SystemExit('pickle code ran')",))


def test_cifar10_reader_runs_no_code(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / 'cifar-10-batches-py' / 'test_batch').write_bytes(pickle.dumps({'data': Evil(), 'labels': []}))
    with pytest.raises(ValueError, match='refusing to unpickle builtins.exec'):
        get_dataset('cifar10', 'test', root=tmp_path)


# ------------------------------------------------------------------------------------------ fake ImageFolder
COLOURS = {'apple': (255, 0, 0), 'leaf': (0, 255, 0), 'sky': (0, 0, 255)}


def write_tree(root, val_classes=('apple', 'sky'), n=3, size=(60, 40)):
    for split, classes in [('train', COLOURS), ('val', val_classes)]:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                Image.new('RGB', size, COLOURS[c]).save(root / split / c / f'{j}.png')
    return root


def test_imagefolder_fake(tmp_path):
    root = write_tree(tmp_path / 'tree')
    info = dataset_info('imagefolder', root=root)
    eq((info.num_classes, info.classes, info.in_channels, info.image_size), (3, ('apple', 'leaf', 'sky'), 3, 224))
    tr = get_dataset('imagefolder', 'train', root=root)
    te = get_dataset('imagefolder', 'test', root=root)
    eq((len(tr), len(te)), (9, 6))
    x, y = tr[0]
    eq((x.shape, x.dtype, y), ((3, 224, 224), torch.float32, 0))
    # val has no 'leaf': 'sky' keeps index 2, as in training (plain ImageFolder would call it 1)
    eq(sorted(set(te.targets)), [0, 2])
    x, y = te[len(te) - 1]
    eq(y, 2)
    colour = x * torch.tensor(data.IMAGENET_STD)[:, None, None] + torch.tensor(data.IMAGENET_MEAN)[:, None, None]
    close(colour.mean((1, 2)), torch.tensor([0., 0., 1.]), eps=1e-3)   # a blue image, labelled sky


def test_imagefolder_loaders_and_raw_images(tmp_path):
    root = write_tree(tmp_path / 'tree')
    tr, te = get_dataloaders('imagefolder', root=root, batch_size=4, image_size=64)
    xb, yb = next(iter(tr))
    eq((xb.shape, len(tr)), ((4, 3, 64, 64), 2))
    eq(torch.cat([y for _, y in te]).tolist(), [0, 0, 0, 2, 2, 2])
    x, _ = get_dataset('imagefolder', root=root, transform=None)[0]
    eq((x.shape, x.dtype), ((3, 40, 60), torch.uint8))
    sub = subset_dataset(tr.dataset, 4, seed=0)
    eq(len(sub), 4)
    eq(sub.indices, subset_dataset(tr.dataset, 4, seed=0).indices)


def test_imagefolder_val_class_unknown_to_training(tmp_path):
    root = write_tree(tmp_path / 'tree')
    (root / 'val' / 'stone').mkdir()
    with pytest.raises(ValueError, match=r"has classes that .*train does not: \['stone'\]"):
        get_dataset('imagefolder', 'test', root=root)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r'DIR/train/<class>/<image>') as e:
        get_dataset('imagefolder', root=tmp_path / 'nothing')
    assert f"{tmp_path / 'nothing'}: no such directory" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match='root was not given'):
        get_dataset('imagenet100')
    (tmp_path / 'flat').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'flat' / 'a.png')
    with pytest.raises(DatasetNotFoundError, match=r'no train/, val/ or test/ inside'):
        get_dataset('imagefolder', root=tmp_path / 'flat')
    root = write_tree(tmp_path / 'tree')
    for p in (root / 'val').rglob('*.png'): p.unlink()
    with pytest.raises(DatasetNotFoundError, match='no images in any class directory'):
        get_dataset('imagefolder', 'test', root=root)
    (tmp_path / 'onlytrain' / 'train' / 'a').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'onlytrain' / 'train' / 'a' / '0.png')
    with pytest.raises(DatasetNotFoundError, match=r'val: no such directory'):
        get_dataset('imagefolder', 'test', root=tmp_path / 'onlytrain')


def test_imagenet100_wants_100_classes(tmp_path):
    root = write_tree(tmp_path / 'tree')
    with pytest.raises(ValueError, match="imagenet100 needs 100 classes, found 3.*name='imagefolder'"):
        get_dataset('imagenet100', root=root)
    eq(dataset_info('imagenet100').num_classes, 100)


def test_imagefolder_test_dir_instead_of_val(tmp_path):
    root = write_tree(tmp_path / 'tree')
    (root / 'val').rename(root / 'test')
    eq(len(get_dataset('imagefolder', 'val', root=root)), 6)


# ------------------------------------------------------------------------------------------------ info, names
def test_dataset_info_table():
    eq(DATASETS, ('fashion-mnist', 'cifar10', 'imagenet100', 'imagefolder'))
    fm, c10 = dataset_info(), dataset_info('cifar10')
    assert isinstance(fm, DatasetInfo)
    eq((fm.name, fm.num_classes, fm.in_channels, fm.image_size, len(fm.mean), len(fm.classes)), ('fashion-mnist', 10, 1, 28, 1, 10))
    eq((c10.num_classes, c10.in_channels, c10.image_size, len(c10.mean), len(c10.std)), (10, 3, 32, 3, 3))
    eq(dataset_info('imagefolder').num_classes, None)
    eq(dataset_info('FashionMNIST').name, 'fashion-mnist')


@pytest.mark.parametrize('call,msg', [
    (lambda: get_dataset('mnist'), "name must be one of ('fashion-mnist', 'cifar10', 'imagenet100', 'imagefolder'); got 'mnist'"),
    (lambda: dataset_info(None), 'name must be one of'),
    (lambda: train_transform('svhn'), 'name must be one of'),
    (lambda: get_dataset(split='training'), "split must be one of ('train', 'test')"),
    (lambda: get_dataset(transform='augment'), "transform must be 'default', None or a callable"),
    (lambda: get_dataset(transform=3), "transform must be 'default', None or a callable"),
    (lambda: eval_transform(image_size=-1), 'image_size must be a positive int'),
    (lambda: train_transform(image_size=True), 'image_size must be a positive int'),
    (lambda: train_transform(padding=-1), 'padding must be an int >= 0 or None (default 0 for fashion-mnist)'),
    (lambda: BatchTransform('cifar10', padding=1.5), 'padding must be an int >= 0 or None (default 4 for cifar10)'),
    (lambda: train_transform('imagefolder', padding=4), "padding applies to ('fashion-mnist', 'cifar10')"),
    (lambda: train_transform(flip='yes'), 'flip must be True, False or None'),
    (lambda: BatchTransform('imagenet100'), "name must be one of ('fashion-mnist', 'cifar10') for BatchTransform"),
    (lambda: get_dataloaders(batch_size=0), 'batch_size must be a positive int; got 0'),
    (lambda: get_dataloaders(batch_size=32.0), 'batch_size must be a positive int'),
    (lambda: get_dataloaders(eval_batch_size=0), 'eval_batch_size must be a positive int'),
    (lambda: get_dataloaders(subset=[10, 10]), 'subset must be None, an int or a pair'),
    (lambda: get_dataloaders(subset=0), 'subset must be a positive int'),
    (lambda: get_dataloaders(transform=(None,)), "transform must be 'default', None or a pair"),
])
def test_bad_input_names_the_argument(call, msg):
    with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')):
        call()


# ---------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize('name,shape', [('fashion-mnist', (1, 28, 28)), ('cifar10', (3, 32, 32))])
def test_transforms_on_fixed_size_data(name, shape):
    info = dataset_info(name)
    img = torch.full(shape, 0, dtype=torch.uint8)
    img[..., 4:-4, 4:-4] = 200
    for tf in (train_transform(name), train_transform(name, augment=False), eval_transform(name)):
        x = tf(img)
        eq((x.shape, x.dtype), (shape, torch.float32))
    mean_img = torch.stack([torch.full(shape[1:], round(m * 255), dtype=torch.uint8) for m in info.mean])
    close(eval_transform(name)(mean_img), torch.zeros(shape), eps=0.02)           # the mean maps to 0
    eq(train_transform(name, augment=False)(img), eval_transform(name)(img))
    eq(train_transform(name, image_size=48)(img).shape, (shape[0], 48, 48))
    eq(eval_transform(name, image_size=16)(img).shape, (shape[0], 16, 16))


def test_transforms_on_photos():
    img = Image.new('RGB', (300, 200), (124, 116, 104))                      # about the ImageNet mean
    for tf in (train_transform('imagenet100'), eval_transform('imagefolder'), train_transform('imagefolder', augment=False)):
        x = tf(img)
        eq((x.shape, x.dtype), ((3, 224, 224), torch.float32))
        close(x.mean().item(), 0., eps=0.05)
    eq(train_transform('imagefolder', image_size=96)(img).shape, (3, 96, 96))
    eq(eval_transform('imagefolder', image_size=96)(img).shape, (3, 96, 96))


def test_fashion_mnist_augmentation_defaults_and_overrides():
    steps = lambda **kw: [type(t).__name__ for t in train_transform(**kw).transforms]
    eq(steps(), ['ToImage', 'RandomHorizontalFlip', 'ToDtype', 'Normalize'])        # flip only, see the notebook
    eq(steps(padding=2), ['ToImage', 'RandomCrop', 'RandomHorizontalFlip', 'ToDtype', 'Normalize'])
    eq(steps(flip=False), ['ToImage', 'ToDtype', 'Normalize'])
    eq(steps(augment=False, padding=2), ['ToImage', 'ToDtype', 'Normalize'])
    eq(train_transform(padding=2).transforms[1].padding, [2, 2, 2, 2])
    eq([type(t).__name__ for t in train_transform('cifar10', flip=False).transforms][1:3], ['RandomCrop', 'ToDtype'])
    eq([type(t).__name__ for t in train_transform('imagefolder', flip=False).transforms][1:3], ['RandomResizedCrop', 'ToDtype'])
    x = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    eq(BatchTransform(flip=False)(x), BatchTransform(train=False)(x))


def test_cifar_augmentation_is_the_papers():
    "CIFAR-10: zero-pad 4, random 32x32 crop, horizontal flip, then normalise."
    steps = [type(t).__name__ for t in train_transform('cifar10').transforms]
    eq(steps, ['ToImage', 'RandomCrop', 'RandomHorizontalFlip', 'ToDtype', 'Normalize'])
    crop = train_transform('cifar10').transforms[1]
    eq((crop.size, crop.padding, crop.fill, crop.padding_mode), ((32, 32), [4, 4, 4, 4], 0, 'constant'))


def shifted_copies(img, p):
    H, W = img.shape[-2:]
    pad = F.pad(img, (p,) * 4)
    s = [pad[:, i:i + H, j:j + W] for i in range(2 * p + 1) for j in range(2 * p + 1)]
    return torch.stack(s + [t.flip(-1) for t in s])


@pytest.mark.parametrize('name,c,h,padding,p', [('fashion-mnist', 1, 28, None, 0), ('fashion-mnist', 1, 28, 2, 2),
                                                ('cifar10', 3, 32, None, 4)])
def test_batch_transform(name, c, h, padding, p):
    x = torch.randint(0, 256, (64, c, h, h), dtype=torch.uint8)
    ev = eval_transform(name)
    info = dataset_info(name)
    # (x/255 - mean)/std in float32, two implementations: a few roundings at the scale of values <= 1, magnified by 1/std
    tol = 16 * torch.finfo(torch.float32).eps / min(info.std)
    close(BatchTransform(name, train=False)(x), torch.stack([ev(i) for i in x]), eps=tol)
    close(BatchTransform(name, augment=False)(x), torch.stack([ev(i) for i in x]), eps=tol)
    g = torch.Generator().manual_seed(0)
    bt = BatchTransform(name, padding=padding)
    eq((bt.padding, bt.flip), (p, True))
    out = bt(x, g)
    raw = out * torch.tensor(info.std).view(1, -1, 1, 1) + torch.tensor(info.mean).view(1, -1, 1, 1)
    raw = (raw * 255).round().to(torch.uint8)
    hits = [((shifted_copies(a, p) == b).flatten(1).all(1)).nonzero()[:, 0].tolist() for a, b in zip(x, raw)]
    assert all(hits), 'every output is a shifted (and maybe mirrored) copy of its input'
    assert sum(max(h) >= (2 * p + 1) ** 2 for h in hits) > 10, 'some outputs are mirrored'
    eq(bt(x, torch.Generator().manual_seed(0)), out)                        # same generator seed, same batch
    eq(BatchTransform(name, image_size=20)(x).shape, (64, c, 20, 20))
    with pytest.raises(ValueError, match=rf'x must be a uint8 batch \(B, {c}, {h}, {h}\)'):
        BatchTransform(name)(x[0])


def test_random_crop_flip_draws_everything():
    x = torch.arange(25, dtype=torch.uint8).view(1, 1, 5, 5).expand(4000, 1, 5, 5).contiguous()
    out = random_crop_flip(x, 1, 0.5, torch.Generator().manual_seed(0))
    cands = shifted_copies(x[0], 1)
    ks = torch.tensor([int((cands == o).flatten(1).all(1).nonzero()[0, 0]) for o in out])
    counts = torch.bincount(ks, minlength=18)
    assert (counts > 4000 / 18 * 0.7).all(), counts                         # all 9 shifts x 2 flips, roughly uniform
    eq(random_crop_flip(x[:3], 0, 0.0), x[:3])


# ------------------------------------------------------------------------------------------------- loaders
def toy(n=50, transform=None):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorImageDataset(x, torch.arange(n) % 10, tuple('abcdefghij'), transform)


def labels(dl): return [torch.cat([x[:, 0, 0, 0].long() for x, _ in dl]).tolist()]


def test_make_loader_shuffles_reproducibly():
    ds = toy()
    a, b, c = (make_loader(ds, 10, train=True, seed=s) for s in (0, 0, 1))
    ea = [labels(a), labels(a), labels(a)]
    eq(ea, [labels(b), labels(b), labels(b)])
    assert ea[0] != ea[1] != ea[2]
    assert labels(c) != ea[0]
    eq(sorted(ea[0][0]), list(range(50)))                           # a permutation, nothing repeated
    d = make_loader(ds, 10, train=True, seed=0)
    set_epoch(d, 2)
    eq(labels(d), ea[2])                                             # resume at epoch 2


def test_make_loader_with_workers_reproduces_random_transforms():
    "Worker seeds come from the loader's seeded generator: random per-sample augmentation repeats too."
    ds = toy(40, transform=lambda x: x + torch.randint(0, 100, (1,), dtype=torch.uint8))
    run = lambda: [x.clone() for x, _ in make_loader(ds, 8, train=True, seed=5, num_workers=2)]
    r1, r2 = run(), run()
    eq(torch.cat(r1), torch.cat(r2))


def test_make_loader_eval_and_drop_last():
    ds = toy(50)
    ev = make_loader(ds, 16, train=False)
    eq([len(y) for _, y in ev], [16, 16, 16, 2])
    eq(labels(ev), [list(range(50))])
    eq(len(make_loader(ds, 16, train=True)), 3)                      # training drops the last partial batch
    eq(len(make_loader(ds, 16, train=True, drop_last=False)), 4)
    eq(len(make_loader(ds, 64, train=True)), 1)                      # less than a batch: keep it rather than nothing
    with pytest.raises(ValueError, match='gives no batch at all'):
        make_loader(ds, 64, train=True, drop_last=True)
    with pytest.raises(ValueError, match='num_workers must be an int >= 0'):
        make_loader(ds, 8, train=True, num_workers=-1)
    with pytest.raises(ValueError, match='train must be True or False'):
        make_loader(ds, 8, train=1)
    with pytest.raises(ValueError, match='init_process_group'):
        make_loader(ds, 8, train=True, distributed=True)


def test_make_loader_distributed_single_process(tmp_path):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ds = toy(30)
        dl = make_loader(ds, 10, train=True, seed=3)
        assert isinstance(dl.sampler, torch.utils.data.DistributedSampler)
        e0 = labels(dl)
        eq(labels(dl), e0)                                           # DistributedSampler does not advance by itself...
        set_epoch(dl, 1)
        assert labels(dl) != e0                                      # ...set_epoch does
        assert isinstance(make_loader(ds, 10, train=True, distributed=False).sampler, data.SeededRandomSampler)
        ev = make_loader(ds, 7, train=False)
        eq(labels(ev), [list(range(30))])
    finally:
        dist.destroy_process_group()


def test_subset_is_deterministic():
    ds = toy(100)
    a, b, c = subset_dataset(ds, 20, seed=0), subset_dataset(ds, 20, seed=0), subset_dataset(ds, 20, seed=1)
    eq(a.data, b.data)
    assert not torch.equal(a.data, c.data)
    eq(a.data[:, 0, 0, 0].tolist(), sorted(a.data[:, 0, 0, 0].tolist()))   # original order kept
    assert subset_dataset(ds, None) is ds and subset_dataset(ds, 1000) is ds
    eq(a.classes, ds.classes)


@needs_fmnist
def test_get_dataloaders_fashion_mnist_subset():
    tr1, te1 = get_dataloaders(batch_size=32, subset=300, seed=7)
    tr2, _ = get_dataloaders(batch_size=32, subset=300, seed=7)
    eq((len(tr1.dataset), len(te1.dataset), len(tr1), len(te1)), (300, 300, 9, 10))
    eq(tr1.dataset.data, tr2.dataset.data)
    xb, yb = next(iter(tr1))
    eq((xb.shape, xb.dtype, yb.dtype), ((32, 1, 28, 28), torch.float32, torch.int64))
    raw_tr, raw_te = get_dataloaders(batch_size=32, subset=(64, 32), transform=None)
    xb, _ = next(iter(raw_tr))
    eq((xb.dtype, len(raw_te.dataset)), (torch.uint8, 32))
    eq(BatchTransform()(xb).shape, (32, 1, 28, 28))


# ------------------------------------------------------------------------------ explicit roots, bad files, stand-ins
from niff_nb.data import load_fashion_mnist


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    "A system copy of (stand-in) Fashion-MNIST that an explicit root must never fall back to."
    d = data.fake_fashion_mnist(tmp_path / 'system-copy', n_train=30, n_test=20)
    monkeypatch.setattr(data, 'FASHION_MNIST_DIR', d)
    return d


@pytest.mark.parametrize('split', ['train', 'test'])
def test_explicit_root_is_the_only_place_searched(tmp_path, fake_debian, split):
    root = data.fake_fashion_mnist(tmp_path / 'mine', n_train=10, n_test=10)
    other = 'test' if split == 'train' else 'train'
    for f in data._FMNIST_FILES[split]: (root / f'{f}.gz').unlink()
    eq(len(get_dataset(split=other, root=root, transform=None)), 10)
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset(split=split, root=root, transform=None)
    msg = str(e.value)
    assert str(root) in msg and 'only that directory is searched' in msg
    assert str(fake_debian) not in msg and len(e.value.searched) == 2
    eq(len(get_dataset(split=split, transform=None)), 30 if split == 'train' else 20)   # without root: the system copy


def test_cifar10_explicit_root_never_falls_back_to_the_cache(tmp_path):
    write_cifar(tmp_path / 'cache')                                       # data_dir() holds a complete copy
    with pytest.raises(DatasetNotFoundError, match='only that directory is searched') as e:
        get_dataset('cifar10', 'test', root=tmp_path / 'elsewhere')
    assert str(tmp_path / 'cache') not in str(e.value)
    eq(len(get_dataset('cifar10', 'test')), 4)


@pytest.mark.parametrize('labels,code', [([0, -1, 2], np.int8), ([0, 10, 2], np.uint8), ([0, 255, 1], np.uint8)])
def test_labels_outside_the_classes_are_caught_when_the_dataset_loads(tmp_path, labels, code):
    root = data.fake_fashion_mnist(tmp_path / 'fm', n_train=3, n_test=3)
    data.write_idx(root / 't10k-labels-idx1-ubyte.gz', np.array(labels, code))
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 10\)') as e:
        get_dataset(split='test', root=root)
    assert 't10k-labels-idx1-ubyte' in str(e.value)
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
        TensorImageDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.tensor(labels), ('a', 'b', 'c'))
    with pytest.raises(ValueError, match='labels must be integers'):
        data.check_labels(torch.tensor([0.5]), 3, 'x')


def test_idx_file_with_zero_items(tmp_path):
    root = data.fake_fashion_mnist(tmp_path / 'fm', n_train=3, n_test=3)
    data.write_idx(root / 'train-images-idx3-ubyte.gz', np.zeros((0, 28, 28), np.uint8))
    data.write_idx(root / 'train-labels-idx1-ubyte.gz', np.zeros((0,), np.uint8))
    with pytest.raises(ValueError, match='holds no images') as e:
        get_dataset(split='train', root=root)
    assert 'train-images-idx3-ubyte' in str(e.value)


def test_fake_fashion_mnist_is_the_real_format_and_learnable(tmp_path):
    root = data.fake_fashion_mnist(tmp_path / 'fm', n_train=100, n_test=50, seed=3)
    eq(sorted(p.name for p in root.iterdir()), sorted(f'{f}.gz' for s in ('train', 'test') for f in data._FMNIST_FILES[s]))
    x, y = load_fashion_mnist('train', root=root)
    eq((x.shape, x.dtype, torch.bincount(y).tolist()), ((100, 1, 28, 28), torch.uint8, [10] * 10))
    x2, _ = load_fashion_mnist('train', root=data.fake_fashion_mnist(tmp_path / 'again', n_train=100, n_test=50, seed=3))
    eq(x, x2)
    means = torch.stack([x[y == c].float().mean(0) for c in range(10)]).flatten(1)   # the classes differ
    assert torch.cdist(means, means).topk(2, largest=False).values[:, 1].min() > 100
    for arr in (np.arange(6, dtype=np.int16).reshape(2, 3), np.array([1.5], np.float64)):
        eq(read_idx(data.write_idx(tmp_path / 'a.idx', arr)).numpy(), arr)
    with pytest.raises(ValueError, match='x must be an array'):
        data.write_idx(tmp_path / 'b.idx', np.array([True]))


def write_broken_tree(root):
    for cls in ('a', 'b'):
        (root / 'train' / cls).mkdir(parents=True)
        Image.new('RGB', (12, 10), COLOURS['apple' if cls == 'a' else 'sky']).save(root / 'train' / cls / '0.png')
    (root / 'train' / 'b' / '1.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'cut off')
    return root


def test_corrupt_image_in_an_imagefolder_tree_is_named(tmp_path):
    root = write_broken_tree(tmp_path / 'tree')
    ds = get_dataset('imagefolder', root=root, image_size=8)
    with pytest.raises(data.BadImageError) as e:
        ds[2]
    assert str(root / 'train' / 'b' / '1.png') in str(e.value) and "bad_images='skip'" in str(e.value)
    with pytest.raises(data.BadImageError, match='1.png'):                     # through a DataLoader too
        list(make_loader(ds, 3, train=False))
    skip = get_dataset('imagefolder', root=root, image_size=8, bad_images='skip')
    with pytest.warns(UserWarning, match='skipping unreadable image .*1.png'):
        batches = list(make_loader(skip, 3, train=False))
    eq(batches[0][1].tolist(), [0, 1, 0])
    with pytest.raises(ValueError, match="bad_images must be one of"):
        get_dataset('imagefolder', root=root, bad_images='ignore')


def test_batch_transform_copies_its_statistics_once(monkeypatch):
    calls, real = [], torch.tensor
    monkeypatch.setattr(torch, 'tensor', lambda *a, **k: calls.append(1) or real(*a, **k))
    bt, x = BatchTransform('cifar10', train=False), torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    first = bt(x)
    for _ in range(5): eq(bt(x), first)
    assert len(calls) <= 2, len(calls)


def test_every_rank_gets_its_own_augmentation_and_worker_seeds(monkeypatch):
    import torch.distributed as dist
    ds = toy(40)
    def loader_for(rank):
        monkeypatch.setattr(data, '_dist_ready', lambda: True)
        monkeypatch.setattr(dist, 'get_world_size', lambda group=None: 2)
        monkeypatch.setattr(dist, 'get_rank', lambda group=None: rank)
        return make_loader(ds, 4, train=True, seed=7, distributed=True)
    s0, s1 = (loader_for(r).generator.initial_seed() for r in (0, 1))
    assert s0 != s1
    dl = loader_for(1)
    set_epoch(dl, 3)
    eq(dl.generator.initial_seed(), data.seed_for(7, 3, 1))
    assert len({data.seed_for(7, e, r) for e in range(3) for r in range(3)}) == 9


def test_dataloaders_decide_the_batch_transform_policy(tmp_path):
    root = data.fake_fashion_mnist(tmp_path / 'fm', n_train=64, n_test=32)
    tr, te = get_dataloaders(root=root, batch_size=16, transform='batch', eval_batch_size=32)
    xb, _ = next(iter(tr))
    eq((xb.dtype, tr.batch_transform.train, te.batch_transform.train), (torch.uint8, True, False))
    eq(data.BATCHED, ('fashion-mnist', 'cifar10'))
    tree = write_tree(tmp_path / 'tree')
    tr, te = get_dataloaders('imagefolder', root=tree, batch_size=3, image_size=16, transform='batch')
    eq((tr.batch_transform, next(iter(tr))[0].dtype), (None, torch.float32))
    tr, _ = get_dataloaders(root=root, batch_size=16)
    eq(tr.batch_transform, None)


def test_check_dataset_reads_no_images(tmp_path):
    root = data.fake_fashion_mnist(tmp_path / 'fm', n_train=4, n_test=4)
    data.check_dataset('fashion-mnist', root)
    (root / 't10k-images-idx3-ubyte.gz').unlink()
    with pytest.raises(DatasetNotFoundError, match='t10k-images'):
        data.check_dataset('fashion-mnist', root)
    write_cifar(tmp_path / 'c')
    data.check_dataset('cifar10', tmp_path / 'c')
    data.check_dataset('imagefolder', write_tree(tmp_path / 'tree'))

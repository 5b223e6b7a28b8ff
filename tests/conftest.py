"""Fixtures shared by the trainer's test files."""
import pytest
import torch

import niff_nb.data as data


@pytest.fixture
def one_thread():
    "Two shared cores: one thread per test process is faster than two fighting ones."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
    "A tiny Fashion-MNIST stand-in in the dataset's own IDX format (96 training, 48 test images)."
    return data.fake_fashion_mnist(tmp_path_factory.mktemp('data') / 'fm', n_train=96, n_test=48)

"""niff_reproduce: the paper's tables, their rows and recipes, and the command end to end on tiny generated data."""
import json
import os
import re
import subprocess
import sys

import pytest

from niff_nb.data import fake_cifar10, fake_imagefolder
from niff_nb.reproduce import (PAPER_ACCURACY, compress_schedule, format_report, report_rows, row_config, select_rows,
                               table_rows)
from niff_nb.tables import PAPER_PARAMS
from niff_nb.train import read_metrics

CLI = [sys.executable, '-c', 'from niff_nb.reproduce import niff_reproduce; niff_reproduce()']
slow = pytest.mark.skipif(os.environ.get('NIFF_SLOW') != '1', reason='every row of Table A2 on CPU: run with NIFF_SLOW=1')


def reproduce_cli(*argv, timeout=900):
    return subprocess.run(CLI + [str(a) for a in argv], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def tiny_cifar(tmp_path_factory):
    return fake_cifar10(tmp_path_factory.mktemp('data') / 'cifar', n_train=60, n_test=30)


def table_lines(report: str) -> list[str]:
    "The data rows of the report's side-by-side table."
    section = report.split('## Kernel mass')[0]
    return [l for l in section.splitlines() if l.startswith('| ') and not l.startswith('| model')]


def test_rows_and_accuracies_cover_every_table_in_the_papers_order():
    assert {t: len(table_rows(t)) for t in ('2', 'A1', 'A2')} == {'2': 19, 'A1': 22, 'A2': 18}
    for t in PAPER_PARAMS:
        assert [(a, v) for a in PAPER_ACCURACY[t] for v in PAPER_ACCURACY[t][a]] == table_rows(t)
    assert PAPER_ACCURACY['A2']['resnet18']['niff'] == (90.63, None)


@pytest.mark.parametrize('patterns,expected', [(None, 18), ('resnet18/*', 4), (['*/niff', 'resnet50/baseline'], 7)])
def test_select_rows(patterns, expected):
    assert len(select_rows('A2', patterns)) == expected


@pytest.mark.parametrize('call,match', [
    (lambda: select_rows('A2', 'resnet101/*'), "'resnet101/\\*' matches no row of Table A2"),
    (lambda: table_rows('3'), "table='3' is not supported"),
    (lambda: row_config('A2', 'resnet18', 'niff', epochs=0), 'epochs must be a positive int')])
def test_bad_arguments_name_what_is_accepted(call, match):
    with pytest.raises(ValueError, match=match): call()


def test_compressed_schedules_keep_the_learning_rate_curve():
    full = row_config('2', 'resnet50', 'niff')
    assert (full.schedule, full.epochs, full.lr_milestones) == ('step', 90, (30, 60))
    short = compress_schedule(full, 9)
    assert (short.epochs, short.lr_milestones, short.lr_gamma) == (9, (3, 6), 0.1)
    mb = row_config('A1', 'mobilenet_v2', 'niff', epochs=30)
    assert mb.lr_gamma ** 30 == pytest.approx(0.98 ** 300, rel=1e-12)
    a2 = row_config('A2', 'resnet18', 'niff', 'DATA', 'OUT')
    assert (a2.optimizer, a2.lr, a2.epochs, a2.model_kwargs, a2.dataset) == ('sgd', 0.02, 150, {'stem': 'cifar'}, 'cifar10')


def test_report_of_an_empty_reproduction_lists_every_row_with_the_papers_numbers(tmp_path):
    rows = report_rows('A2', tmp_path)
    assert len(rows) == 18 and all(r['status'] == 'not run' and r['top1'] is None for r in rows)
    assert [r['tag'] for r in rows if r['params'] != r['paper_params']] == ['convnext_tiny-baseline', 'convnext_tiny-niff',
                                                                           'mobilenet_v3_small-niff']
    report = format_report('A2', rows)
    assert len(table_lines(report)) == 18 and '**A short run**' not in report
    assert '| ResNet-50 | NIFF | 15,491,600 | 15,491,600 | = | 93.11 | — | — |' in report


def test_niff_reproduce_A2_end_to_end_and_resumed_row_by_row(tiny_cifar, tmp_path):
    out = tmp_path / 'a2'
    r = reproduce_cli('A2', '--data', tiny_cifar, '--out', out, '--epochs', 1, '--device', 'cpu', '--no-progress',
                      '--rows', 'resnet18/niff')
    assert r.returncode == 0, r.stderr
    report = (out / 'report.md').read_text()
    assert report.startswith('# Table A2 (CIFAR-10)') and '**A short run**' in report
    lines = table_lines(report)
    assert len(lines) == 18                                      # every row of the paper's table, trained or not
    row = next(l for l in lines if l.startswith('| ResNet-18 | NIFF |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[2:6] == ['1,932,432', '1,932,432', '=', '90.63'] and re.fullmatch(r'\d+\.\d\d', cells[6]) and cells[-2] == '1/1 (recipe 150)'
    summary = json.loads((out / 'summary.json').read_text())
    assert {r['tag']: r['status'] for r in summary['rows']}['resnet18-niff'] == 'finished'
    km = summary['kernel_mass']['resnet18-niff']
    assert (out / km['figure']).stat().st_size > 0 and km['layers']['conv1']['size'] == [32, 32]
    assert all(v['median_init'] % 2 == 1 and v['median_trained'] % 2 == 1 for v in km['layers'].values())

    again = reproduce_cli('A2', '--data', tiny_cifar, '--out', out, '--epochs', 1, '--device', 'cpu', '--no-progress',
                          '--rows', 'resnet18/niff')
    assert again.returncode == 1 and '--resume' in again.stderr and 'Traceback' not in again.stderr
    more = reproduce_cli('A2', '--data', tiny_cifar, '--out', out, '--epochs', 1, '--device', 'cpu', '--no-progress', '--resume',
                         '--rows', 'resnet18/niff', 'resnet18/baseline')
    assert more.returncode == 0, more.stderr
    assert len(read_metrics(out / 'resnet18-niff' / 'metrics.jsonl')) == 1          # finished: skipped, not trained again
    status = {r['tag']: r['status'] for r in json.loads((out / 'summary.json').read_text())['rows']}
    assert [t for t, s in status.items() if s == 'finished'] == ['resnet18-baseline', 'resnet18-niff']


def test_niff_reproduce_checks_before_it_writes(tiny_cifar, tmp_path):
    r = reproduce_cli('A2', '--out', tmp_path / 'x')
    assert r.returncode == 2 and '--data is required' in r.stderr
    r = reproduce_cli('A2', '--data', tiny_cifar, '--out', tmp_path / 'x', '--rows', 'vgg16/*')
    assert r.returncode == 2 and "matches no row of Table A2" in r.stderr
    r = reproduce_cli('A2', '--data', tmp_path / 'nothing', '--out', tmp_path / 'x', '--epochs', 1)
    assert r.returncode == 1 and 'Traceback' not in r.stderr and str(tmp_path / 'nothing') in r.stderr
    in100 = fake_imagefolder(tmp_path / 'in100', num_classes=100, n_train=1, n_val=1, size=8)
    r = reproduce_cli('2', '--data', in100, '--out', tmp_path / 'x', '--epochs', 1)
    assert r.returncode == 2 and 'not 1000' in r.stderr
    assert not (tmp_path / 'x').exists()
    listing = reproduce_cli('A1', '--list')
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 22 and 'convnext_tiny/niff' in listing.stdout


@slow
def test_niff_reproduce_every_row_of_A2(tiny_cifar, tmp_path):
    out = tmp_path / 'a2'
    r = reproduce_cli('A2', '--data', tiny_cifar, '--out', out, '--epochs', 1, '--device', 'cpu', '--no-progress', timeout=3600)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / 'summary.json').read_text())
    assert all(row['status'] == 'finished' for row in summary['rows'])
    assert len(summary['kernel_mass']) == 9        # the NIFF rows; baselines and separated convs have no NIFF layers

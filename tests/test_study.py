"""The study: every run analysed beside its initialisation, the crop sweep, and a report that leads with what training changed."""
import json

import pytest

from niff_nb.study import headline, run_study, training_changes, write_report


@pytest.fixture(scope='module')
def tiny_study(tmp_path_factory):
    from niff_nb.data import DatasetNotFoundError
    out = tmp_path_factory.mktemp('study')
    try: summary = run_study(out, epochs=1, subset=512, test_subset=256, progress=False, device='cpu')
    except DatasetNotFoundError: pytest.skip('Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)')
    return out, summary


def _keys(d, depth=2):
    "The nested key structure of a dict, `depth` levels down."
    return {k: (_keys(v, depth - 1) if isinstance(v, dict) and depth > 1 else None) for k, v in d.items()}


def test_every_run_is_analysed_at_initialisation_with_the_same_structure(tiny_study):
    out, summary = tiny_study
    saved = json.loads((out / 'summary.json').read_text())
    for variant in ('baseline', 'niff'):
        a = saved['analysis'][variant]
        init = a['init']
        assert init['epoch'] == 0 and a['epoch'] == 1
        assert _keys(init['layers'], 3) == _keys(a['layers'], 3)
        assert set(init) >= {'layers', 'erf', 'input_size', 'mass', 'arch', 'variant', 'dataset', 'figures'}
        assert set(a) - set(init) <= {'to_spatial', 'crop_sweep', 'smallest_crop', 'init'}
    niff = saved['analysis']['niff']
    assert _keys(niff['init']['official_kmr'], 3) == _keys(niff['official_kmr'], 3)
    assert niff['layers']['stage1.0']['size'] == [28, 28] and niff['init']['layers']['stage3.0']['size'] == [7, 7]
    assert 'crop_sweep' not in saved['analysis']['baseline']


def test_crop_sweep_structure(tiny_study):
    _, summary = tiny_study
    a = summary['analysis']['niff']
    sweep = a['crop_sweep']
    assert [r['window'] for r in sweep] == [3, 5, 7, 9, 13, 17, 21, 25, 'full']
    assert all(set(r) == {'window', 'test_acc'} and 0 <= r['test_acc'] <= 1 for r in sweep)
    assert sweep[-1]['test_acc'] == pytest.approx(a['to_spatial']['acc_niff'], abs=1 / 256 + 1e-9)
    sc = a['smallest_crop']
    assert sc['reference_acc'] == a['to_spatial']['acc_niff'] and sc['tolerance'] == 0.005
    assert sc['test_acc'] >= sc['reference_acc'] - 0.005


def test_training_changes_and_report(tiny_study):
    out, summary = tiny_study
    ch = summary['training_changes']['niff']
    a = summary['analysis']['niff']
    assert list(ch) == ['stage1.0', 'stage2.0', 'stage3.0'] and summary['training_changes']['baseline'] == {}
    for layer, c in ch.items():
        assert c['effective_size']['init'] == a['init']['layers'][layer]['effective_size_median']
        assert c['effective_size']['trained'] == a['layers'][layer]['effective_size_median']
        assert c['mass_3x3']['change'] == pytest.approx(c['mass_3x3']['trained'] - c['mass_3x3']['init'])
        assert c['learned_size'] == (c['effective_size']['trained'] != c['effective_size']['init'])
    report = (out / 'report.md').read_text()
    assert report.index('## What training changed') < report.index('## Runs')
    assert "this project's own summary" in report and 'not a measure of the paper' in report
    for name in ('kernel_mass_niff.png', 'kernel_mass_official_niff.png', 'eigen_kernels_init_niff.png', 'crop_sweep_niff.png'):
        assert (out / name).exists() and name in report


def _layer(eff, m3, m7=0.9, size=(28, 28)):
    return {'size': list(size), 'n_kernels': 4, 'effective_size_median': eff, 'effective_size_p90': eff, 'ratio_mean': 1.0,
            'convention': 'centred', 'windows': [1, 3, 5, 7, 9], 'kmr_mean': [0.1, m3, 0.8, m7, 1.0], 'kmr_std': [0.0] * 5}


def test_a_size_the_untrained_model_already_had_is_never_reported_as_learned(tmp_path):
    analysis = {'layers': {'a': _layer(23, 0.45), 'b': _layer(13, 0.38, size=(14, 14))},
                'init': {'layers': {'a': _layer(23, 0.30), 'b': _layer(13, 0.39, size=(14, 14))}}}
    ch = training_changes(analysis)
    assert not ch['a']['learned_size'] and not ch['b']['learned_size']
    text = ' '.join(headline(ch))
    assert text.count('not a learned size') == 2 and 'shrank' not in text and 'grew' not in text
    assert 'into the central 3x3 (0.30 → 0.45)' in text and 'barely moved (0.39 → 0.38)' in text
    analysis['layers']['a'] = _layer(15, 0.45)
    ch = training_changes(analysis)
    assert ch['a']['learned_size'] and ch['a']['effective_size']['change'] == -8
    lines = headline(ch, {'window': 13, 'test_acc': 0.909, 'reference_acc': 0.912, 'tolerance': 0.005, 'all_larger_within': True})
    assert lines[0].startswith('a (28x28): training shrank the median effective size from 23 to 15')
    assert '13x13' in lines[-1] and '0.5 points' in lines[-1]

"""The equalization study's error measure (plain tensors, no model)."""
import torch

from qdrop_mm.benchmarks.equalization import equalization_errors


def _pair(outlier: float):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 8, 12, 12, generator=g)
    a[:, 0] *= outlier
    w = torch.randn(6, 8, 3, 3, generator=g)
    return a, w, torch.zeros(6)


def test_equalization_pays_only_when_one_channel_dominates_the_range():
    a, w, b = _pair(outlier=30.0)
    skewed = equalization_errors(a, w, b, padding=1, bits=4, alphas=[0.5])
    assert skewed['channel_range_ratio'] > 20
    assert skewed['alpha_0.5'] < 0.5 * skewed['none']
    a, w, b = _pair(outlier=1.0)
    balanced = equalization_errors(a, w, b, padding=1, bits=4, alphas=[0.5])
    assert balanced['channel_range_ratio'] < 1.5
    assert abs(balanced['alpha_0.5'] - balanced['none']) < 0.5 * balanced['none']


def test_more_bits_less_error():
    a, w, b = _pair(outlier=1.0)
    assert equalization_errors(a, w, b, 1, 8, [0.5])['none'] < equalization_errors(a, w, b, 1, 4, [0.5])['none'] / 50


def test_json_records_the_command_line_arguments(tmp_path, monkeypatch):
    """Run from the command line (argv=None), the JSON names the arguments that produced it."""
    import json
    import sys

    from qdrop_mm.benchmarks import equalization
    row = {'block': 'b', 'channel_range_ratio': 2.0, 'none': 0.5, 'alpha_0.5': 0.25}
    monkeypatch.setattr(equalization, 'study', lambda *a: [row])
    out = str(tmp_path / 'eq.json')
    monkeypatch.setattr(sys, 'argv', ['study_equalization.py', '--bits', '3', '--alphas', '0.5', '--out', out])
    equalization.main()
    saved = json.load(open(out))
    assert saved['command'] == f'python tools/study_equalization.py --bits 3 --alphas 0.5 --out {out}'
    assert saved['bits'] == 3 and saved['rows'] == [row]

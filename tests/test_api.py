"""The Python API (qdrop_mm.quantize / load_quantized / build_quantized_model) and the import boundary."""
import os.path as osp
import subprocess
import sys

import pytest
import torch

import qdrop_mm
from qdrop_mm.core import QuantLayer
from qdrop_mm.core.adaround import AdaRoundQuantizer
from qdrop_mm.openmmlab.settings import PTQConfigError

from .openmmlab.conftest import REPO, save_random_checkpoint

CONFIG = osp.join(REPO, 'tests/openmmlab/configs/faster_rcnn_r18_coco128_tiny.py')


def _data(root):
    return {'train_dataloader.dataset.data_root': f'{root}/', 'test_dataloader.dataset.data_root': f'{root}/',
            'test_evaluator.ann_file': f'{root}/annotations/instances_val2017.json'}


@pytest.fixture(scope='module')
def api_run(tmp_path_factory, coco128):
    tmp = tmp_path_factory.mktemp('api')
    ckpt = save_random_checkpoint(CONFIG, str(tmp / 'fp.pth'))
    run = qdrop_mm.quantize(CONFIG, ckpt, work_dir=str(tmp / 'work'), cfg_options=_data(coco128),
                            scope=['neck', 'backbone'], iters=2)
    return tmp, run


def test_quantize_returns_model_metrics_report(api_run):
    _, run = api_run
    assert run.quantized == osp.join(run.work_dir, 'quantized.pth') and osp.isfile(run.quantized)
    assert set(run.metrics) >= {'coco/bbox_mAP', 'coco/bbox_mAP_50'}
    assert run.report['metrics'] == pytest.approx(run.metrics)
    assert run.report['settings']['iters'] == 2 and run.report['settings']['scope'] == ['neck', 'backbone']
    names = [u['name'] for u in run.report['plan']]
    assert names[0] == 'backbone.conv1' and names[-1].startswith('neck.')  # the network's call order
    assert isinstance(run.model.backbone.conv1, QuantLayer)
    # the stem is the 8-bit first layer although the scope lists the neck first
    bits = {n: q.bits for n, q in run.model.named_modules() if isinstance(q, AdaRoundQuantizer)}
    assert [n for n, b in bits.items() if b == 8] == ['backbone.conv1.weight_quantizer']
    assert set(bits.values()) == {4, 8}


def test_load_quantized_and_build_quantized_model_reproduce_the_run(api_run, coco128):
    tmp, run = api_run
    loaded = qdrop_mm.load_quantized(CONFIG, run.quantized, work_dir=str(tmp / 'eval'), cfg_options=_data(coco128))
    assert loaded.metrics == run.metrics
    assert [u['name'] for u in loaded.report['plan']] == [u['name'] for u in run.report['plan']]  # saved order
    _, model = qdrop_mm.build_quantized_model(CONFIG, run.quantized)
    expected, got = run.model.state_dict(), model.state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_bad_ptq_key_is_a_config_error_naming_it(tmp_path, coco128):
    ckpt = save_random_checkpoint(CONFIG, str(tmp_path / 'fp.pth'))
    with pytest.raises(PTQConfigError, match='ptq.w_bits'):
        qdrop_mm.quantize(CONFIG, ckpt, work_dir=str(tmp_path / 'w'), cfg_options=_data(coco128), w_bits=1)


def test_core_and_export_import_no_openmmlab_package():
    code = ('import sys, qdrop_mm.core, qdrop_mm.export, qdrop_mm\n'
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mmengine', 'mmcv', 'mmdet', 'mmseg'}))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == '[]'


def test_console_scripts_are_the_tools(tmp_path):
    from importlib.metadata import entry_points
    scripts = {ep.name: ep for ep in entry_points(group='console_scripts') if ep.value.startswith('qdrop_mm.')}
    assert set(scripts) >= {'qdrop-ptq', 'qdrop-sensitivity', 'qdrop-export-onnx'}
    for ep in scripts.values():
        assert callable(ep.load())
    missing = tmp_path / 'missing.py'
    out = subprocess.run([osp.join(osp.dirname(sys.executable), 'qdrop-ptq'), str(missing)],
                         capture_output=True, text=True)
    assert (out.returncode, out.stderr.strip()) == (1, f'error: config file not found: {missing}')

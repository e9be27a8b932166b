"""tools/dist_ptq.sh with 2 CPU processes (gloo): distributed PTQ and evaluation match one process."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, save_random_checkpoint
from .test_resume import CONFIG, data_options

pytestmark = pytest.mark.skipif(sys.platform != 'linux', reason='uses torchrun on loopback')


def _run(cmd, env):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_ptq_and_eval_match_single_process(tmp_path, coco128):
    ckpt = save_random_checkpoint(CONFIG, str(tmp_path / 'fp.pth'))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHON=sys.executable, PYTHONPATH=REPO,
               PORT=str(29600 + os.getpid() % 300))
    opts = data_options(coco128)
    _run(['bash', 'tools/dist_ptq.sh', CONFIG, '2', '--checkpoint', ckpt, '--work-dir', str(tmp_path / 'dist'),
          '--cfg-options', *opts], env)
    dist_report = json.loads((tmp_path / 'dist' / 'ptq_report.json').read_text())
    assert len(dist_report['units']) > 0 and all(u['iters'] > 0 for u in dist_report['units'])
    _run([sys.executable, 'tools/ptq.py', CONFIG, '--load-quantized', str(tmp_path / 'dist' / 'quantized.pth'),
          '--work-dir', str(tmp_path / 'single'), '--cfg-options', *opts], env)
    single = json.loads((tmp_path / 'single' / 'ptq_report.json').read_text())
    assert dist_report['metrics'] == single['metrics']
    assert any(k.startswith('coco/') for k in single['metrics'])

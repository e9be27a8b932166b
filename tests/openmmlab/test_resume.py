"""Resume: a tools/ptq.py run killed with SIGKILL continues with --resume to the same weights, bit for bit.

The runs are real subprocesses of tools/ptq.py on coco128 (Faster R-CNN R18-FPN, random weights, tiny
images; tests/openmmlab/configs/faster_rcnn_r18_coco128_tiny.py). The resume files themselves (atomic
saves, checksums, weights_only loading, RNG round trip, fingerprints) are tested without a model.
"""
import json
import os
import os.path as osp
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from qdrop_mm.openmmlab.resume import (FORMAT, MANIFEST, RESUME_DIR, ResumeSession, ResumeStateError,
                                       compare_fingerprints, rng_state, set_rng_state)

from .conftest import REPO, save_random_checkpoint

CONFIG = osp.join(REPO, 'tests', 'openmmlab', 'configs', 'faster_rcnn_r18_coco128_tiny.py')
TOOL = osp.join(REPO, 'tools', 'ptq.py')


def data_options(root):
    return [f'train_dataloader.dataset.data_root={root}/', f'test_dataloader.dataset.data_root={root}/',
            f'test_evaluator.ann_file={root}/annotations/instances_val2017.json']


def quantized_state(work):
    return torch.load(osp.join(work, 'quantized.pth'), weights_only=True)['state_dict']


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:5]}'


def _env():
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=REPO)


def _command(ckpt, work, root, *extra):
    return [sys.executable, TOOL, CONFIG, '--checkpoint', ckpt, '--work-dir', str(work), *extra,
            '--cfg-options', *data_options(root)]


@pytest.fixture(scope='module')
def fp_checkpoint(tmp_path_factory):
    return save_random_checkpoint(CONFIG, str(tmp_path_factory.mktemp('r18') / 'fp.pth'))


def test_sigkilled_run_resumes_to_identical_weights(fp_checkpoint, coco128, tmp_path):
    ref, work = tmp_path / 'uninterrupted', tmp_path / 'killed'
    done = subprocess.run(_command(fp_checkpoint, ref, coco128), env=_env(), capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (ref / RESUME_DIR).exists(), 'a successful run removes its resume state'

    manifest_path = work / RESUME_DIR / MANIFEST
    log = open(tmp_path / 'killed.log', 'w')
    victim = subprocess.Popen(_command(fp_checkpoint, work, coco128), env=_env(), stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO)
    finished, deadline = [], time.monotonic() + 300
    try:
        while victim.poll() is None and time.monotonic() < deadline:
            try:
                finished = json.loads(manifest_path.read_text())['finished']
            except (OSError, ValueError, KeyError):
                finished = []
            if len(finished) >= 2:
                victim.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if victim.poll() is None and len(finished) < 2:
            victim.kill()
        victim.wait()
        log.close()
    assert victim.returncode == -signal.SIGKILL, (victim.returncode, (tmp_path / 'killed.log').read_text()[-3000:])
    manifest = json.loads(manifest_path.read_text())
    assert manifest['format'] == FORMAT and manifest['status'] == 'running'
    n_done = len(manifest['finished'])
    assert 2 <= n_done < len(manifest['fingerprint']['units']), 'killed too late: nothing left to resume'
    assert [r['name'] for r in manifest['records']] == [name for _, name in manifest['finished']]
    assert not (work / 'quantized.pth').exists() and not (work / 'ptq_report.json').exists()

    resumed = subprocess.run(_command(fp_checkpoint, work, coco128, '--resume'), env=_env(), capture_output=True,
                             text=True, cwd=REPO, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert f'{n_done} finished unit(s) restored' in out
    assert f'[stage 1/1] unit 1/' not in out  # the finished units were skipped, not redone
    assert not (work / RESUME_DIR).exists()

    assert_bit_identical(quantized_state(ref), quantized_state(work))
    report_ref = json.loads((ref / 'ptq_report.json').read_text())
    report = json.loads((work / 'ptq_report.json').read_text())
    assert report['resumed_units'] == n_done and report_ref['resumed_units'] == 0
    strip = [{k: v for k, v in u.items() if k != 'seconds'} for u in report_ref['units']]
    assert [{k: v for k, v in u.items() if k != 'seconds'} for u in report['units']] == strip


# ----------------------------------------------------------------------------- resume files, no model

def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {'m.alpha': torch.randn(4, 3, generator=g), 'm.mode_code': torch.tensor(2, dtype=torch.uint8)}


def test_store_saves_atomically_and_verifies_checksums(tmp_path):
    store = ResumeSession(str(tmp_path))
    manifest = {'status': 'running', 'finished': []}
    store.save('calibration', _state(0), manifest)
    store.save('unit', _state(1), dict(store.manifest, finished=[[0, 'm']]))
    files = sorted(p.name for p in (tmp_path / RESUME_DIR).iterdir())
    assert files == ['calibration.pth', MANIFEST, 'unit-0001.pth']  # no temp files left behind
    again = ResumeSession(str(tmp_path)).read_manifest()
    assert again['finished'] == [[0, 'm']] and [f['name'] for f in again['files']] == files[::2]
    states = store.load_states(again)
    assert torch.equal(states[1]['state_dict']['m.alpha'], _state(1)['m.alpha'])
    for f in files[::2]:  # plain tensors, numbers, lists: loadable with weights_only
        torch.load(tmp_path / RESUME_DIR / f, weights_only=True)

    # an orphan written after the manifest (killed before the manifest update) is ignored
    (tmp_path / RESUME_DIR / 'unit-0002.pth').write_bytes(b'half written')
    assert len(store.load_states(again)) == 2
    # a damaged file the manifest trusts is refused
    path = tmp_path / RESUME_DIR / 'unit-0001.pth'
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ResumeStateError, match='unit-0001.pth is damaged'):
        store.load_states(again)
    (tmp_path / RESUME_DIR / MANIFEST).write_text('{"format": "other"}')
    with pytest.raises(ResumeStateError, match='not a qdrop_mm.resume/1 manifest'):
        store.read_manifest()
    assert store.clear() and not (tmp_path / RESUME_DIR).exists() and store.read_manifest() is None


def test_rng_states_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.rand(5), np.random.rand(5), random.random()
    path = tmp_path / 'rng.pth'
    torch.save(rng_state(), path)
    expected = torch.rand(3), np.random.rand(3), random.random(), np.random.randn(2)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(torch.load(path, weights_only=True))
    got = torch.rand(3), np.random.rand(3), random.random(), np.random.randn(2)
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and np.array_equal(expected[3], got[3])


def test_fingerprint_changes_that_block_resume():
    base = {'settings': {'w_bits': 4, 'iters': 100, 'seed': 0}, 'units': ['a', 'b'],
            'checkpoint': {'path': '/x.pth', 'bytes': 10}, 'calibration': 'abc'}
    assert compare_fingerprints(base, base) == ([], [])
    blocking, allowed = compare_fingerprints(base, dict(base, settings={'w_bits': 2, 'iters': 50, 'seed': 0}))
    assert blocking == ['ptq.w_bits: 4 -> 2'] and allowed == ['ptq.iters: 100 -> 50']
    blocking, _ = compare_fingerprints(base, dict(base, calibration='def', units=['a']))
    assert any('calibration batches differ' in b for b in blocking) and any('block plan' in b for b in blocking)

"""Up-front validation (one-line errors naming the key and the allowed values, no outputs left behind),
the NaN/inf guard (stops the unit, keeps the finished units for --resume) and determinism (same seed,
bit-identical weights), through tools/ptq.py on coco128 with a tiny Faster R-CNN R18-FPN."""
import fractions
import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO
from .test_resume import CONFIG, TOOL, assert_bit_identical, data_options, quantized_state

OUTPUTS = ('quantized.pth', 'ptq_report.json')


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """A random FP checkpoint for the tiny config, one with keys that do not fit, one that is not a checkpoint."""
    from .conftest import save_random_checkpoint
    tmp = tmp_path_factory.mktemp('ckpts')
    good = save_random_checkpoint(CONFIG, str(tmp / 'fp.pth'))
    state = torch.load(good, weights_only=True)['state_dict']
    for key in ('backbone.layer1.0.conv1.weight', 'backbone.layer2.0.bn1.bias', 'roi_head.bbox_head.fc_cls.bias'):
        del state[key]
    state['backbone.extra.weight'] = torch.zeros(1)
    torch.save({'state_dict': state}, tmp / 'mismatched.pth')
    (tmp / 'garbage.pth').write_bytes(b'this is not a checkpoint\n' * 10)
    data = open(good, 'rb').read()
    (tmp / 'truncated.pth').write_bytes(data[:len(data) // 2])
    torch.save({'state_dict': {}, 'meta': fractions.Fraction(1, 3)}, tmp / 'pickled_object.pth')
    return {name: str(tmp / f'{name}.pth') for name in ('mismatched', 'garbage', 'truncated', 'pickled_object')} \
        | {'good': good}


def run_tool(work, ckpt, root, options=(), extra=()):
    from tools.ptq import main
    return main([CONFIG, '--checkpoint', ckpt, '--work-dir', str(work), *extra,
                 '--cfg-options', *data_options(root), *options])


def assert_no_outputs(work):
    for name in OUTPUTS:
        assert not os.path.exists(os.path.join(work, name)), name


# (id, cfg-options, extra CLI args, checkpoint, expected message parts: the key and the allowed values)
CASES = [
    ('method', ['ptq.method=qdorp'], [], 'good',
     ["ptq.method must be one of ['adaround', 'brecq'", "'qdrop'", "'rtn'", "'qdorp'"]),
    ('w_bits_range', ['ptq.w_bits=9'], [], 'good', ['ptq.w_bits must be an integer from 2 to 8', '9']),
    ('a_bits_float', ['ptq.a_bits=4.5'], [], 'good', ['ptq.a_bits must be an integer from 2 to 8', '4.5']),
    ('first_layer_bits', ['ptq.first_layer_bits=1'], [], 'good',
     ['ptq.first_layer_bits must be an integer from 2 to 8']),
    ('drop_prob', ['ptq.drop_prob=1.5'], [], 'good', ['ptq.drop_prob must be a number in [0, 1]', '1.5']),
    ('iters', ['ptq.iters=0'], [], 'good', ['ptq.iters must be a positive integer', 'got 0']),
    ('batch_size', ['ptq.batch_size=-2'], [], 'good', ['ptq.batch_size must be a positive integer', '-2']),
    ('num_images', ['ptq.num_images=0'], [], 'good', ['ptq.num_images must be a positive integer']),
    ('seed', ['ptq.seed=-1'], [], 'good', ['ptq.seed must be an integer from 0 to 4294967295']),
    ('lr', ['ptq.method_options.w_lr=-0.1'], [], 'good', ['ptq.method_options.w_lr must be >= 0']),
    ('unknown_key', ['ptq.itres=10'], [], 'good', ["unknown ptq key(s) ['itres']", 'allowed keys']),
    ('scope', ['ptq.scope=[backbone,nek]'], [], 'good',
     ["ptq.scope entry 'nek' matches no module of FasterRCNN", "top-level modules are ['backbone'"]),
    ('missing_checkpoint', [], [], 'missing', ['--checkpoint / load_from: checkpoint not found', 'nope.pth']),
    ('unreadable_checkpoint', [], [], 'garbage',
     ['--checkpoint / load_from', 'garbage.pth is not a PyTorch checkpoint']),
    ('truncated_checkpoint', [], [], 'truncated',
     ['--checkpoint / load_from: cannot read checkpoint', 'truncated.pth: not a PyTorch checkpoint or damaged']),
    ('unsafe_checkpoint', [], [], 'pickled_object',
     ['--checkpoint / load_from:', 'pickled_object.pth contains pickled objects', '--allow-unsafe-checkpoint']),
    ('checkpoint_keys', [], [], 'mismatched',
     ['(--checkpoint / load_from) does not fit the FasterRCNN', '3 missing keys',
      "'backbone.layer1.0.conv1.weight'", '1 unexpected key', "'backbone.extra.weight'"]),
    ('data_root', ['train_dataloader.dataset.data_root=/nonexistent/coco/'], [], 'good',
     ["train_dataloader.dataset.data_root: directory not found: '/nonexistent/coco/'", 'existing folder']),
    ('too_few_images', ['ptq.num_images=1000'], [], 'good',
     ['ptq.num_images=1000 but the train split', 'ptq.num_images must be from 1 to']),
    ('work_dir', [], ['--work-dir', '{file}/work'], 'good', ['--work-dir / work_dir', 'is not a writable folder']),
    ('resume_and_load', [], ['--resume', '--load-quantized', '{file}'], 'good',
     ['--resume and --load-quantized exclude each other']),
]


@pytest.mark.parametrize('options,extra,ckpt,expected', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_line_naming_the_key(options, extra, ckpt, expected, ckpts, coco128, tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    extra = [e.format(file=a_file) for e in extra]
    path = ckpts.get(ckpt, str(tmp_path / 'nope.pth'))
    work = tmp_path / 'work'
    with pytest.raises(SystemExit) as exc:
        run_tool(work, path, coco128, options, extra)
    message = str(exc.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    for part in expected:
        assert part in message, (part, message)
    assert_no_outputs(work)
    assert not (work / 'ptq_resume').exists()


def test_unwritable_work_dir(ckpts, coco128, tmp_path):
    if os.geteuid() == 0:  # root writes into read-only folders: a work dir under a plain file fails for anyone
        (tmp_path / 'file').write_text('')
        work = tmp_path / 'file' / 'work'
    else:
        work = tmp_path / 'ro'
        work.mkdir(mode=0o500)
    with pytest.raises(SystemExit, match=f'--work-dir / work_dir {work} is not a writable folder'):
        run_tool(work, ckpts['good'], coco128)


def test_cache_over_budget_is_one_line_naming_ptq_cache(ckpts, coco128, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_tool(tmp_path / 'work', ckpts['good'], coco128, ['ptq.cache.host_budget_gb=0', 'ptq.cache.spill=False'])
    message = str(exc.value.code)
    assert message.startswith('error: out of cache budget: ') and '(ptq.cache)' in message and '\n' not in message
    assert_no_outputs(tmp_path / 'work')


def test_cli_prints_error_and_exits_nonzero_without_traceback(ckpts, coco128, tmp_path):
    """A problem found after the runner is built (checkpoint keys) still ends as one 'error:' line."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, TOOL, CONFIG, '--checkpoint', ckpts['mismatched'], '--work-dir',
                           str(tmp_path / 'work'), '--cfg-options', *data_options(coco128)],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 1
    assert 'Traceback' not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith('error: checkpoint ')
    assert '3 missing keys' in done.stderr
    assert_no_outputs(tmp_path / 'work')


# ----------------------------------------------------------------------------- determinism, NaN guard

@pytest.fixture(scope='module')
def reference_run(ckpts, coco128, tmp_path_factory):
    work = tmp_path_factory.mktemp('reference')
    run_tool(work, ckpts['good'], coco128)
    return work


def test_same_seed_gives_bit_identical_weights(reference_run, ckpts, coco128, tmp_path):
    run_tool(tmp_path, ckpts['good'], coco128)
    assert_bit_identical(quantized_state(reference_run), quantized_state(tmp_path))
    other = json.loads((tmp_path / 'ptq_report.json').read_text())['units']
    ref = json.loads((reference_run / 'ptq_report.json').read_text())['units']
    assert [u['curve'] for u in other] == [u['curve'] for u in ref]


def test_different_seed_changes_the_calibration_and_weights(reference_run, ckpts, coco128, tmp_path):
    run_tool(tmp_path, ckpts['good'], coco128, ['ptq.seed=1'])
    ref, other = quantized_state(reference_run), quantized_state(tmp_path)
    assert any(not torch.equal(ref[k], other[k]) for k in ref if k.endswith('alpha'))


def test_nan_loss_stops_the_unit_and_the_run_resumes(reference_run, ckpts, coco128, tmp_path, monkeypatch):
    import qdrop_mm.core.ptq as core_ptq
    from qdrop_mm.core import UnitCache
    real = core_ptq.reconstruct_unit
    calls = []

    def poisoned(unit, cache, stage, **kw):  # the third unit sees NaN targets: its loss is NaN at iteration 1
        calls.append(1)
        if len(calls) == 3:
            n = range(len(cache))
            cache = UnitCache.from_tensors([cache.x_fp.load(i) for i in n], [cache.x_q.load(i) for i in n],
                                           [torch.full_like(cache.target.load(i), float('nan')) for i in n])
        return real(unit, cache, stage, **kw)

    monkeypatch.setattr(core_ptq, 'reconstruct_unit', poisoned)
    with pytest.raises(SystemExit) as exc:
        run_tool(tmp_path, ckpts['good'], coco128)
    message = str(exc.value.code)
    assert message.startswith('error: non-finite reconstruction loss (nan) in unit backbone.layer1.1 '
                              '(stage 1/1, unit 3/17) at iteration 1/4; 2 finished unit(s) are saved in'), message
    assert '--resume' in message
    assert_no_outputs(tmp_path)
    manifest = json.loads((tmp_path / 'ptq_resume' / 'manifest.json').read_text())
    assert manifest['finished'] == [[0, 'backbone.conv1'], [0, 'backbone.layer1.0']]
    assert manifest['last_error'] == message[len('error: '):]

    monkeypatch.setattr(core_ptq, 'reconstruct_unit', real)
    run_tool(tmp_path, ckpts['good'], coco128, extra=['--resume'])
    assert_bit_identical(quantized_state(reference_run), quantized_state(tmp_path))
    assert json.loads((tmp_path / 'ptq_report.json').read_text())['resumed_units'] == 2
    assert not (tmp_path / 'ptq_resume').exists()

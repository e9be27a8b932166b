"""Runner checkpoints load under weights_only via the allow-list; other pickles are refused clearly."""
import fractions
import pickle

import pytest
import torch

from qdrop_mm.openmmlab.checkpoint import atomic_save, safe_load


def _runner_like_checkpoint(path):
    from mmengine.logging import MessageHub
    hub = MessageHub.get_instance('qdrop_mm_test_ckpt')
    hub.update_scalar('train/loss', 1.5)
    hub.update_scalar('train/loss', 0.5)
    torch.save({'meta': {'epoch': 1, 'iter': 2}, 'state_dict': {'w': torch.ones(2)},
                'message_hub': hub.state_dict()}, path)


def test_mmengine_runner_checkpoint_needs_and_gets_the_allow_list(tmp_path):
    path = str(tmp_path / 'runner.pth')
    _runner_like_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    ckpt = safe_load(path)
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert buf.mean() == pytest.approx(1.0)


def test_unknown_pickled_objects_refused_with_a_message(tmp_path):
    path = str(tmp_path / 'odd.pth')
    torch.save({'x': fractions.Fraction(1, 3)}, path)
    with pytest.raises(RuntimeError, match='--allow-unsafe-checkpoint'):
        safe_load(path)
    assert safe_load(path, allow_unsafe=True)['x'] == fractions.Fraction(1, 3)
    with pytest.raises(FileNotFoundError):
        safe_load(str(tmp_path / 'missing.pth'))


def test_mmengine_load_from_goes_through_safe_load(tmp_path):
    from mmengine.runner import CheckpointLoader
    from qdrop_mm.openmmlab.checkpoint import install_safe_mmengine_loading
    path = str(tmp_path / 'runner.pth')
    _runner_like_checkpoint(path)
    install_safe_mmengine_loading()
    assert torch.equal(CheckpointLoader.load_checkpoint(path)['state_dict']['w'], torch.ones(2))
    odd = str(tmp_path / 'odd.pth')
    torch.save({'x': fractions.Fraction(1, 3)}, odd)
    with pytest.raises(RuntimeError, match='not loaded'):
        CheckpointLoader.load_checkpoint(odd)


def test_atomic_save_leaves_no_temp_files(tmp_path):
    path = tmp_path / 'q.pth'
    atomic_save({'a': torch.zeros(3)}, str(path))
    atomic_save({'a': torch.ones(3)}, str(path))
    assert [p.name for p in tmp_path.iterdir()] == ['q.pth']
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(3))

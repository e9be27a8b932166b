"""Shared fixtures for the export tests."""
import pytest
import torch

from qdrop_mm.core import build_method, run_ptq
from qdrop_mm.core.toy_network import make_toy_setup, quantize_toy_net, toy_forward


@pytest.fixture(scope='session')
def hardened_toy():
    """ToyNet W4A4 (stem 8-bit) after a short QDrop run: hard rounding, calibrated and learned steps."""
    net, batches = make_toy_setup(seed=0, num_batches=4, batch_size=2, size=16, width=8)
    units = quantize_toy_net(net, w_bits=4, a_bits=4)
    torch.manual_seed(0)
    run_ptq(net, units, batches, toy_forward, build_method('qdrop', iters=10))
    return net, batches


SHAPES_VAL = 32  # the first 32 images of the demo val split (each image depends only on its index)


@pytest.fixture(scope='session')
def shapes_root(tmp_path_factory):
    """A generated shapes dataset: 8 train images (calibration) and the demo val split's first SHAPES_VAL images."""
    from qdrop_mm.demo.shapes_dataset import generate_shapes_dataset
    root = tmp_path_factory.mktemp('shapes')
    generate_shapes_dataset(root, num_train=8, num_val=SHAPES_VAL, image_size=256, seed=0)
    return str(root)


def demo_config(name: str, root: str, out_dir, **options) -> str:
    """``configs/demo/<name>.py`` re-rooted to ``root`` (paths, evaluator, sizes), no workers, written to ``out_dir``."""
    import os.path as osp
    from qdrop_mm.demo.training import load_demo_config
    from ..openmmlab.conftest import REPO
    cfg = load_demo_config(osp.join(REPO, 'configs/demo', name + '.py'),
                           {'data_root': root + '/', 'demo_data.num_train': 8, 'demo_data.num_val': SHAPES_VAL,
                            'test_dataloader.num_workers': 0, 'test_dataloader.persistent_workers': False,
                            **options}, str(out_dir))
    path = osp.join(str(out_dir), name + '.py')
    cfg.dump(path)
    return path

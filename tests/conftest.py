import os
import os.path as osp

import pytest
import torch

SHARED_COCO128 = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'shared', 'coco128')


@pytest.fixture(scope='session')
def coco128(tmp_path_factory):
    """Real COCO images (../shared/coco128) when present, else a generated folder of the same layout.

    ``QDROP_MM_COCO_STANDIN=1`` uses the generated folder even where the real one exists (how a fresh
    clone runs the suite).
    """
    if osp.isdir(SHARED_COCO128) and not os.environ.get('QDROP_MM_COCO_STANDIN'):
        return SHARED_COCO128
    from tests.coco_standin import make_coco_standin
    return make_coco_standin(str(tmp_path_factory.mktemp('coco_standin')))


@pytest.fixture(scope='module')
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

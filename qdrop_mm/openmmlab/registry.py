"""qdrop_mm's child registries of mmengine's, so configs can say ``type='qdrop_mm.PTQLoop'``."""
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import Registry

LOOPS = Registry('loop', parent=MMENGINE_LOOPS, scope='qdrop_mm', locations=['qdrop_mm.openmmlab.ptq_loop'])

from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS  # noqa: E402

MODEL_WRAPPERS = Registry('model_wrapper', parent=MMENGINE_MODEL_WRAPPERS, scope='qdrop_mm',
                          locations=['qdrop_mm.openmmlab.eval_wrapper'])

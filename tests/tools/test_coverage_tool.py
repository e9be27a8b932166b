"""tools/coverage.py end to end on RTMDet-tiny: its EMAHook config, PTQ and --load-quantized through the Runner."""
import os.path as osp

import pytest

from tests.openmmlab.conftest import COCO128


@pytest.mark.skipif(not osp.isdir(COCO128), reason='../shared/coco128 not present')
def test_rtmdet_tiny_runs_and_reloads_identically(tmp_path):
    from tools.coverage import CASES, format_table, run_case
    case = next(c for c in CASES if c.name == 'rtmdet_tiny')
    row = run_case(case, str(tmp_path), COCO128, iters=1, num_images=2, test_images=1)
    assert row.error == '' and row.run_ok and row.reload_identical
    assert (row.blocks, row.layers, row.fp_layers, row.unfolded_bn) == (9, 14, 0, 0)
    table = format_table([row])
    assert '| CSPNeXt | `rtmdet/rtmdet_tiny_8xb32-300e_coco.py` | 9 / 14 | 0 (0.0 %) | 0 | 0 | yes | yes |' in table

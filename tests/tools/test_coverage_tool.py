"""tools/coverage.py end to end on RTMDet-tiny: its EMAHook config, PTQ and --load-quantized through the Runner."""


def test_rtmdet_tiny_runs_and_reloads_identically(tmp_path, coco128):
    from qdrop_mm.benchmarks.coverage import CASES, format_table, run_case
    case = next(c for c in CASES if c.name == 'rtmdet_tiny')
    row = run_case(case, str(tmp_path), coco128, iters=1, num_images=2, test_images=1)
    assert row.error == '' and row.run_ok and row.reload_identical
    assert (row.blocks, row.layers, row.fp_layers, row.unfolded_bn) == (9, 14, 0, 0)
    table = format_table([row])
    assert row.compared.endswith(' boxes') and int(row.compared.split()[0]) > 0
    assert ('| CSPNeXt | `rtmdet/rtmdet_tiny_8xb32-300e_coco.py` | 9 / 14 | 0 (0.0 %) | 0 | 0 | yes | '
            f'yes ({row.compared}) |') in table


def test_dense_head_in_scope_is_reconstructed_through_the_model_forward(tmp_path, coco128):
    from qdrop_mm.benchmarks.coverage import CASES, run_case
    case = next(c for c in CASES if c.name == 'retinanet_r18')
    row = run_case(case, str(tmp_path), coco128, iters=1, num_images=2, test_images=1,
                   extra_options=("ptq.scope=['backbone','neck','bbox_head']",))
    assert row.error == '' and row.run_ok and row.reload_identical
    # 1 stem + 8 blocks + 8 FPN layers, then the head: 4 + 4 shared convs and retina_cls / retina_reg
    assert (row.blocks, row.layers, row.fp_layers) == (8, 9 + 10, 0)
    assert int(row.compared.split()[0]) > 0


def test_roi_head_in_scope_is_reconstructed_through_the_model_forward(tmp_path, coco128):
    from qdrop_mm.benchmarks.coverage import CASES, run_case
    case = next(c for c in CASES if c.name == 'faster_rcnn_r50')
    row = run_case(case, str(tmp_path), coco128, iters=1, num_images=2, test_images=1,
                   extra_options=("ptq.scope=['backbone','neck','rpn_head','roi_head']",))
    assert row.error == '' and row.run_ok and row.reload_identical
    # 16 blocks; stem + 8 FPN layers, 3 RPN layers, the box head's 2 shared fcs, fc_cls and fc_reg
    assert (row.blocks, row.layers, row.fp_layers) == (16, 9 + 3 + 4, 0)


def test_cascade_roi_head_in_scope_is_reconstructed_on_the_fp_boxes(tmp_path, coco128):
    from qdrop_mm.benchmarks.coverage import CASES, run_case
    case = next(c for c in CASES if c.name == 'cascade_rcnn_r50')
    row = run_case(case, str(tmp_path), coco128, iters=1, num_images=2, test_images=1,
                   extra_options=("ptq.scope=['backbone','neck','roi_head']",))
    assert row.error == '' and row.run_ok and row.reload_identical
    # 16 blocks; stem + 8 FPN layers, and per stage the box head's 2 shared fcs, fc_cls and fc_reg
    assert (row.blocks, row.layers, row.fp_layers) == (16, 9 + 3 * 4, 0)


def test_segmentation_lists_are_found_with_a_relative_work_dir(tmp_path, coco128, monkeypatch):
    """The default --work-dir is relative; mmseg reads a relative ann_file under data_root, so the lists must be absolute."""
    import os.path as osp

    from mmengine.config import Config
    from qdrop_mm.benchmarks.coverage import CASES, write_case_config
    monkeypatch.chdir(tmp_path)
    case = next(c for c in CASES if c.name == 'fast_scnn')
    cfg = Config.fromfile(write_case_config(case, 'work_dirs/coverage', coco128, test_images=1))
    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        ann_file = loader.dataset.ann_file
        assert osp.isabs(ann_file) and osp.isfile(ann_file) and open(ann_file).read().split()

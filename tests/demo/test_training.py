"""train_fp_model end to end on a tiny shapes dataset: train, publish, reload, cache."""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")

from qdrop_mm.demo.training import (  # noqa: E402
    build_fp_model,
    load_demo_config,
    load_published_weights,
    publish_weights,
    train_fp_model,
)

REPO = Path(__file__).resolve().parents[2]
FRCNN = REPO / "configs" / "demo" / "faster_rcnn_r18_fpn_shapes.py"
ITERS = 4


def _options(data_root: Path) -> dict:
    return {
        "data_root": f"{data_root}/",
        "demo_data.num_train": 8,
        "demo_data.num_val": 4,
        "demo_data.image_size": 128,
        "train_cfg.max_iters": ITERS,
        "train_dataloader.batch_size": 2,
        "train_dataloader.num_workers": 0,
        "train_dataloader.persistent_workers": False,
        "val_dataloader.num_workers": 0,
        "val_dataloader.persistent_workers": False,
        "default_hooks.logger.interval": 1,
    }


def test_train_publish_reload_and_cache(tmp_path, monkeypatch):
    data_root, work_dir = tmp_path / "shapes", tmp_path / "work"
    options = _options(data_root)

    threads = torch.get_num_threads()
    first = train_fp_model(FRCNN, work_dir, options, num_threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert first["cached"] is False and first["record"]["num_threads"] == 1
    assert first["iterations"] == ITERS
    assert (data_root / "meta.json").is_file() and len(list((data_root / "train2017").glob("*.jpg"))) == 8

    # derived values followed the overrides
    cfg = load_demo_config(FRCNN, options, work_dir)
    assert cfg.val_evaluator.ann_file == f"{data_root}/annotations/instances_val2017.json"
    assert cfg.train_dataloader.dataset.pipeline[2]["scale"] == (128, 128)
    warmup, cosine = cfg.param_scheduler  # LR schedule rescaled to the shortened run
    assert (warmup["begin"], warmup["end"]) == (0, 1)
    assert (cosine["begin"], cosine["end"], cosine["T_max"]) == (1, ITERS, ITERS - 1)

    # published weights: plain tensors + plain meta, loadable with weights_only=True
    ckpt = Path(first["checkpoint"])
    assert ckpt == work_dir / "fp_model.pth"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "meta"}
    meta = raw["meta"]
    assert meta["config"] == "faster_rcnn_r18_fpn_shapes" and meta["iterations"] == ITERS
    assert meta["dataset"]["image_size"] == 128 and meta["dataset"]["num_train"] == 8

    model = build_fp_model(cfg)
    expected = model.state_dict()
    assert set(raw["state_dict"]) == set(expected)
    assert all(raw["state_dict"][k].shape == v.shape for k, v in expected.items())
    # training changed the weights (the build above is a fresh random init)
    assert any(not torch.equal(raw["state_dict"][k], v) for k, v in expected.items() if v.is_floating_point())
    loaded = build_fp_model(cfg, ckpt)
    assert torch.equal(loaded.state_dict()["backbone.conv1.weight"], raw["state_dict"]["backbone.conv1.weight"])

    record = json.loads((work_dir / "fp_metrics.json").read_text())
    metrics = record["metrics"]
    assert "coco/bbox_mAP" in metrics and "coco/bbox_mAP_50" in metrics
    assert 0.0 <= metrics["coco/bbox_mAP"] <= metrics["coco/bbox_mAP_50"] <= 1.0
    assert metrics == first["metrics"] == meta["metrics"]
    assert record["config_digest"] == meta["config_digest"]
    assert record["s_per_iter"] > 0 and record["train_seconds"] >= record["s_per_iter"] * ITERS

    # second call: cached, no training, same metrics, file untouched
    mtime = ckpt.stat().st_mtime_ns
    second = train_fp_model(FRCNN, work_dir, options)
    assert second["cached"] is True
    assert second["metrics"] == first["metrics"]
    assert second["seconds"] < 30 and ckpt.stat().st_mtime_ns == mtime

    # a different config (here: one more iteration) is not served from the cache
    cfg2 = load_demo_config(FRCNN, {**options, "train_cfg.max_iters": ITERS + 1}, work_dir)
    from qdrop_mm.demo import training
    assert training.config_digest(cfg2) != meta["config_digest"]

    # a shipped model of the same config is used instead of training (a fresh work dir, no cache)
    shipped = tmp_path / "shipped"
    (shipped / FRCNN.stem).mkdir(parents=True)
    for name in ("fp_model.pth", "fp_metrics.json"):
        (shipped / FRCNN.stem / name).write_bytes((work_dir / name).read_bytes())
    monkeypatch.setattr(training, "SHIPPED_DIR", shipped)
    third = train_fp_model(FRCNN, tmp_path / "fresh", options)
    assert third["cached"] is True and third["metrics"] == first["metrics"]
    assert (tmp_path / "fresh" / "fp_model.pth").read_bytes() == ckpt.read_bytes()
    fourth = train_fp_model(FRCNN, tmp_path / "fresh2", {**options, "train_cfg.max_iters": ITERS + 1})
    assert fourth["cached"] is False and fourth["iterations"] == ITERS + 1  # another config trains


@pytest.mark.parametrize("name", ["faster_rcnn_r18_fpn_shapes", "retinanet_r18_fpn_shapes", "sem_fpn_r18_shapes"])
def test_the_shipped_demo_models_match_their_demo_configs(name):
    from qdrop_mm.demo.training import SHIPPED_DIR, config_digest
    config = REPO / "configs" / "demo" / f"{name}.py"
    cfg = load_demo_config(config)
    record = json.loads((SHIPPED_DIR / name / "fp_metrics.json").read_text())
    published = load_published_weights(SHIPPED_DIR / name / "fp_model.pth")
    assert record["config_digest"] == published["meta"]["config_digest"] == config_digest(cfg)
    assert record["training_command"] == f"python tools/train_demo.py configs/demo/{config.name} --threads 1"
    assert set(published["state_dict"]) == set(build_fp_model(cfg).state_dict())


def test_publish_rejects_non_plain_meta(tmp_path):
    with pytest.raises(TypeError):
        publish_weights({"w": torch.zeros(2)}, tmp_path / "m.pth", {"bad": object()})
    path = publish_weights({"w": torch.ones(2)}, tmp_path / "m.pth", {"n": 1, "s": "x", "l": [1.5, None]})
    obj = load_published_weights(path)
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    assert obj["meta"]["n"] == 1 and obj["meta"]["l"] == [1.5, None]


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        train_fp_model(tmp_path / "nope.py", tmp_path / "w")

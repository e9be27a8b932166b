"""Train the small FP demo models on the shapes task and publish their weights.

The published ``fp_model.pth`` holds only ``{'state_dict': tensors, 'meta': plain Python values}``
so that it loads with ``torch.load(weights_only=True)`` (torch >= 2.6 default), unlike mmengine's
own checkpoints, which pickle training state (``HistoryBuffer``, numpy scalars, ...).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import print_log

from qdrop_mm.demo.shapes_dataset import dataset_params, generate_shapes_dataset, is_up_to_date
from qdrop_mm.openmmlab.atomic_io import atomic_write

PathLike = Union[str, os.PathLike]

PUBLISHED_WEIGHTS = "fp_model.pth"
PUBLISHED_METRICS = "fp_metrics.json"
# FP models the project trained and ships (``<name>/fp_model.pth`` + ``fp_metrics.json``, the training
# command in their record): the demo's numbers then do not depend on how this machine trains
SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"
FORMAT = "qdrop_mm.fp_model/v1"
DEFAULT_WORK_ROOT = Path("work_dirs") / "demo"
_SCALE_KEYS = ("scale", "crop_size", "img_scale")
_PLAIN = (str, int, float, bool, type(None))


# ----------------------------------------------------------------------------- config
def _walk_replace(node: Any, fn) -> Any:
    """Rebuild nested dicts/lists/tuples, applying ``fn(key, value)`` to every leaf."""
    if isinstance(node, Mapping):
        return {k: _walk_replace(fn(k, v), fn) for k, v in node.items()}
    if isinstance(node, (list, tuple)) and not _is_scale(node):
        return type(node)(_walk_replace(fn(None, v), fn) for v in node)
    return node


def _is_scale(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value)


def _check_no_pretrained(node: Any, where: str = "cfg") -> None:
    """Refuse configs that would download weights (no network; the demo trains from scratch)."""
    if isinstance(node, Mapping):
        if node.get("type") == "Pretrained" or node.get("pretrained"):
            source = node.get("checkpoint") or node.get("pretrained")
            raise ValueError(f"{where} asks for pretrained weights ({source}); the demo trains from "
                             "scratch without network access: set init_cfg=None / pretrained=None")
        for k, v in node.items():
            _check_no_pretrained(v, f"{where}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_no_pretrained(v, f"{where}[{i}]")


def load_demo_config(cfg_path: PathLike, cfg_options: Optional[Mapping[str, Any]] = None,
                     work_dir: Optional[PathLike] = None) -> Config:
    """Read a demo config, merge ``cfg_options`` and re-derive dependent values.

    mmengine evaluates a config once, so overriding ``data_root`` or
    ``demo_data.image_size`` with ``--cfg-options`` would leave stale copies (dataset
    roots, evaluator ``ann_file``, pipeline ``Resize`` scales). Here every string that
    starts with the file's ``data_root`` is re-rooted, and every pipeline
    ``scale``/``crop_size`` equal to the file's ``(image_size, image_size)`` follows the
    new size. Overriding ``train_cfg.max_iters`` rescales the iteration-based LR schedule
    proportionally and moves the val/checkpoint intervals that equalled the old length.
    ``work_dir`` defaults to ``work_dirs/demo/<config name>``.
    """
    path = Path(cfg_path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path} (expected e.g. "
                                "configs/demo/faster_rcnn_r18_fpn_shapes.py)")
    cfg = Config.fromfile(str(path))
    old_root = cfg.get("data_root")
    old_size = cfg.get("demo_data", {}).get("image_size")
    if old_size is not None:
        for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
            scales = _pipeline_scales(cfg.get(key))
            if any(tuple(s) != (old_size, old_size) for s in scales):
                print_log(f"{path}: {key} pipeline scales {scales} differ from demo_data.image_size="
                          f"{old_size}", logger="current", level=30)
    old_iters = cfg.get("train_cfg", {}).get("max_iters")
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    new_iters = cfg.get("train_cfg", {}).get("max_iters")
    if old_iters and new_iters and new_iters != old_iters:
        _rescale_schedule(cfg, int(old_iters), int(new_iters))
    new_root = cfg.get("data_root")
    if isinstance(new_root, str) and str(old_root).endswith("/") and not new_root.endswith("/"):
        new_root = cfg.data_root = new_root + "/"  # derived paths are built as data_root + 'sub/dir'
    new_size = cfg.get("demo_data", {}).get("image_size")
    if (old_root and new_root != old_root) or (old_size and new_size != old_size):
        def fix(key: Optional[str], value: Any) -> Any:
            if old_root and new_root != old_root and isinstance(value, str) and value.startswith(old_root):
                return new_root + value[len(old_root):]
            if key in _SCALE_KEYS and _is_scale(value) and tuple(value) == (old_size, old_size):
                return (new_size, new_size)
            return value
        rebuilt = _walk_replace(cfg.to_dict(), fix)
        rebuilt["data_root"], rebuilt["demo_data"] = new_root, cfg.get("demo_data")
        cfg = Config(rebuilt, filename=str(path))
    cfg.work_dir = str(work_dir or cfg.get("work_dir") or DEFAULT_WORK_ROOT / path.stem)
    _check_no_pretrained(cfg.get("model"), "model")
    return cfg


def _rescale_schedule(cfg: Config, old_iters: int, new_iters: int) -> None:
    """Follow a new ``train_cfg.max_iters``: scale scheduler ``begin``/``end``/``T_max``."""
    factor = new_iters / old_iters
    old_prev_end = new_prev_end = None  # chained schedulers (warmup -> cosine) stay chained
    for sched in cfg.get("param_scheduler") or []:
        if sched.get("by_epoch", True):
            continue
        begin, end = sched.get("begin", 0), sched.get("end")
        new_begin = new_prev_end if begin == old_prev_end else min(new_iters - 1, round(begin * factor))
        sched["begin"] = new_begin
        if end is not None:
            new_end = min(new_iters, max(new_begin + 1, round(end * factor)))
            if sched.get("T_max") == end - begin:
                sched["T_max"] = new_end - new_begin
            sched["end"], old_prev_end, new_prev_end = new_end, end, new_end
    checkpoint = cfg.get("default_hooks", {}).get("checkpoint") or {}
    for owner, key in ((cfg, "max_iters"), (cfg.train_cfg, "val_interval"), (checkpoint, "interval")):
        if owner.get(key) == old_iters:
            owner[key] = new_iters


def _pipeline_scales(loader: Optional[Mapping[str, Any]]) -> List[Any]:
    scales: List[Any] = []
    dataset = (loader or {}).get("dataset") or {}
    while "dataset" in dataset:  # wrappers (RepeatDataset, ...)
        dataset = dataset["dataset"]
    for t in dataset.get("pipeline") or []:
        scales += [t[k] for k in _SCALE_KEYS if _is_scale(t.get(k))]
    return scales


def config_digest(cfg: Config) -> str:
    """sha256 of the merged config (``work_dir`` excluded): the cache key of a training."""
    data = cfg.to_dict()
    data.pop("work_dir", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=repr).encode()).hexdigest()


def register_scope(cfg: Config) -> str:
    """``register_all_modules`` of the config's codebase (mmdet or mmseg); returns the scope."""
    scope = cfg.get("default_scope")
    if scope not in ("mmdet", "mmseg"):
        raise ValueError(f"default_scope must be 'mmdet' or 'mmseg', got {scope!r}")
    importlib.import_module(f"{scope}.utils").register_all_modules(init_default_scope=False)
    return scope


# ------------------------------------------------------------------------------- data
def ensure_demo_data(cfg: Config) -> Dict[str, Any]:
    """Generate the shapes dataset under ``cfg.data_root`` unless an identical one exists.

    Returns the generator parameters (``shapes_dataset.dataset_params``).
    """
    spec = dict(cfg.get("demo_data") or {})
    if not spec:
        raise KeyError("config has no `demo_data` (generator arguments for data_root)")
    root = cfg.data_root
    params = dataset_params(**spec)
    if not is_up_to_date(root, params):
        print_log(f"generating shapes dataset in {root}: {spec}", logger="current")
        start = time.perf_counter()
        generate_shapes_dataset(root, **spec)
        print_log(f"generated {root} in {time.perf_counter() - start:.1f}s", logger="current")
    return params


# ---------------------------------------------------------------------------- weights
def _check_plain(value: Any, where: str = "meta") -> None:
    """Exact builtin types only: str subclasses such as torch's TorchVersion fail weights_only."""
    if type(value) is dict:
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
    elif type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif type(value) not in _PLAIN:
        raise TypeError(f"{where}: {type(value).__name__} is not a plain dict/list/str/int/float/bool/None")


def publish_weights(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                    meta: Mapping[str, Any]) -> Path:
    """Write ``{'state_dict', 'meta'}`` loadable with ``torch.load(weights_only=True)``.

    Tensors are detached, moved to CPU and cloned (no shared storage with the live model);
    ``meta`` must hold plain Python values only. The file is written atomically.
    """
    tensors: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        tensors[k] = v.detach().cpu().clone()
    meta = copy.deepcopy(dict(meta))
    _check_plain(meta)
    meta.setdefault("format", FORMAT)
    buffer = io.BytesIO()
    torch.save({"state_dict": tensors, "meta": meta}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)  # fail here, not in the consumer
    atomic_write(str(path), lambda f: f.write(buffer.getvalue()))
    return Path(path)


def load_published_weights(path: PathLike) -> Dict[str, Any]:
    """``{'state_dict': {name: tensor}, 'meta': dict}`` of a published file (weights_only load)."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "state_dict" not in obj or "meta" not in obj:
        raise ValueError(f"{path} is not a published FP model (expected keys 'state_dict', 'meta')")
    return obj


def build_fp_model(cfg: Config, checkpoint: Optional[PathLike] = None) -> torch.nn.Module:
    """Build ``cfg.model`` (eval mode, CPU) and load published weights strictly, if given."""
    from mmengine.registry import DefaultScope, MODELS

    with DefaultScope.overwrite_default_scope(register_scope(cfg)):
        model = MODELS.build(cfg.model)
    if checkpoint is not None:
        model.load_state_dict(load_published_weights(checkpoint)["state_dict"], strict=True)
    return model.eval()


# --------------------------------------------------------------------------- training
class _RecordHook(Hook):
    """Times training iterations and keeps the last validation metrics."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.metrics: Optional[Dict[str, float]] = None
        self.iter_seconds: List[float] = []
        self._t0 = 0.0

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._t0 = time.perf_counter()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.iter_seconds.append(time.perf_counter() - self._t0)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics = {k: float(v) for k, v in (metrics or {}).items()
                        if isinstance(v, (int, float)) or getattr(v, "ndim", 1) == 0}


def _cached(work_dir: Path, digest: str) -> Optional[Dict[str, Any]]:
    weights, metrics = work_dir / PUBLISHED_WEIGHTS, work_dir / PUBLISHED_METRICS
    if not (weights.is_file() and metrics.is_file()):
        return None
    try:
        meta = load_published_weights(weights)["meta"]
        record = json.loads(metrics.read_text())
    except Exception as exc:  # corrupt / foreign file: retrain
        print_log(f"ignoring unreadable {weights}: {exc}", logger="current", level=30)
        return None
    return record if meta.get("config_digest") == digest == record.get("config_digest") else None


def train_fp_model(cfg_path: PathLike, work_dir: Optional[PathLike] = None,
                   cfg_options: Optional[Mapping[str, Any]] = None, force: bool = False,
                   num_threads: Optional[int] = None) -> Dict[str, Any]:
    """Train (or reuse) the FP model of a demo config and publish it.

    Returns ``dict(metrics, checkpoint, seconds, train_seconds, s_per_iter, iterations,
    cached, work_dir, record)``: ``metrics`` are the final validation metrics (e.g.
    ``coco/bbox_mAP``, ``mIoU``), ``checkpoint`` the published ``fp_model.pth``,
    ``seconds`` the wall time of this call, ``train_seconds`` that of the (possibly
    earlier) training. Training is skipped when ``work_dir`` holds a published model of
    the identical merged config, unless ``force``. ``num_threads`` sets
    ``torch.set_num_threads`` for the training (not part of the cache key): on a small CPU
    shared with other jobs, 1 thread is several times faster than OpenMP's default.
    """
    start = time.perf_counter()
    cfg = load_demo_config(cfg_path, cfg_options, work_dir)
    name = Path(cfg_path).stem
    out = Path(cfg.work_dir)
    digest = config_digest(cfg)
    record = None if force else _cached(out, digest)
    if record is None and not force and _cached(SHIPPED_DIR / name, digest) is not None:
        for file in (PUBLISHED_WEIGHTS, PUBLISHED_METRICS):
            atomic_write(str(out / file), lambda f, src=SHIPPED_DIR / name / file: f.write(src.read_bytes()))
        record = _cached(out, digest)
        print_log(f"{name}: using the FP model shipped with qdrop_mm ({SHIPPED_DIR / name}), trained with "
                  f"{record.get('num_threads')} thread(s), {record['iterations']} iterations", logger="current")
    scope = register_scope(cfg)
    data = ensure_demo_data(cfg)
    if record is not None:
        print_log(f"{name}: cached FP model {out / PUBLISHED_WEIGHTS} "
                  f"(trained in {record['train_seconds']:.0f}s): {_fmt(record['metrics'])}", logger="current")
        return _result(record, out, time.perf_counter() - start, cached=True)

    from mmengine.runner import Runner

    for stale in (PUBLISHED_WEIGHTS, PUBLISHED_METRICS):
        (out / stale).unlink(missing_ok=True)
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        runner = Runner.from_cfg(cfg)
        hook = _RecordHook()
        runner.register_hook(hook)
        t0 = time.perf_counter()
        model = runner.train()
        train_seconds = time.perf_counter() - t0
        metrics = hook.metrics if hook.metrics is not None else {
            k: float(v) for k, v in runner.val().items() if isinstance(v, (int, float))}
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
    iterations = int(runner.iter)
    record = {
        "format": FORMAT,
        "config": name,
        "config_path": str(cfg_path),
        "config_digest": digest,
        "default_scope": scope,
        "iterations": iterations,
        "batch_size": int(cfg.train_dataloader.batch_size),
        "train_seconds": round(train_seconds, 2),
        "num_threads": int(threads),
        "s_per_iter": round(sum(hook.iter_seconds) / max(len(hook.iter_seconds), 1), 4),
        "dataset": dict(data),
        "data_root": str(cfg.data_root),
        "metrics": metrics,
        "versions": _versions(),
    }
    module = model.module if hasattr(model, "module") else model
    weights = publish_weights(module.state_dict(), out / PUBLISHED_WEIGHTS, record)
    (out / PUBLISHED_METRICS).write_text(json.dumps(record, indent=2))
    print_log(f"{name}: trained {iterations} iters in {train_seconds:.0f}s "
              f"({record['s_per_iter']:.3f} s/iter); published {weights}: {_fmt(metrics)}", logger="current")
    return _result(record, out, time.perf_counter() - start, cached=False)


def with_val_split(cfg_path: PathLike, num_val: int) -> Config:
    """The demo config evaluated on a ``num_val``-image val split, generated beside ``data_root``.

    Every image depends only on (seed, split, index), so the train split and the first images of
    val are those of the default dataset: a larger split only adds held-out images (for benchmarks
    that need a smaller evaluation spread than the default val split allows).
    """
    if num_val < 1:
        raise ValueError(f"the val split needs at least one image, got {num_val}")
    cfg = load_demo_config(cfg_path)
    root = f"{str(cfg.data_root).rstrip('/')}_val{num_val}/"
    cfg = load_demo_config(cfg_path, {"data_root": root, "demo_data.num_val": num_val})
    register_scope(cfg)
    ensure_demo_data(cfg)
    return cfg


def evaluate_fp_model(cfg: Config, checkpoint: PathLike) -> Dict[str, float]:
    """The test metrics of published FP weights under ``cfg`` (e.g. on another val split)."""
    from mmengine.runner import Runner

    register_scope(cfg)
    cfg = cfg.copy()
    cfg.load_from = str(checkpoint)
    cfg.work_dir = str(Path(cfg.work_dir) / "fp_eval")
    metrics = Runner.from_cfg(cfg).test()
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) or getattr(v, "ndim", 1) == 0}


def _result(record: Dict[str, Any], out: Path, seconds: float, cached: bool) -> Dict[str, Any]:
    return {"metrics": dict(record["metrics"]), "checkpoint": str(out / PUBLISHED_WEIGHTS),
            "seconds": seconds, "train_seconds": record["train_seconds"],
            "s_per_iter": record["s_per_iter"], "iterations": record["iterations"],
            "cached": cached, "work_dir": str(out), "record": record}


def _fmt(metrics: Mapping[str, float]) -> str:
    keys = [k for k in metrics if k.endswith(("bbox_mAP", "bbox_mAP_50", "mIoU", "aAcc"))] or list(metrics)
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)


def _versions() -> Dict[str, str]:
    out = {"torch": str(torch.__version__)}
    for mod in ("mmengine", "mmcv", "mmdet", "mmseg"):  # only mmdet or mmseg can be missing: both import the others
        with contextlib.suppress(ImportError):
            out[mod] = str(__import__(mod).__version__)
    return out

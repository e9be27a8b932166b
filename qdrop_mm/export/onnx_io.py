"""Write an export-form model to ONNX, inspect its Q/DQ nodes, run it in onnxruntime.

Plain PyTorch + onnx/onnxruntime (imported when called). Export uses the
TorchScript exporter (``dynamo=False``): it maps the ``symbolic`` methods of
:mod:`.onnx_qdq` to QuantizeLinear/DequantizeLinear without onnxscript.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

DEFAULT_OPSET = 17
MIN_OPSET = 13  # per-axis DequantizeLinear
OPTIMIZATION_LEVELS = ('disable', 'basic', 'extended', 'all')
BIAS_QUANTIZATION_PASS = 'WeightBiasQuantization'


def require_onnx() -> None:
    """Raise ImportError with the install line when onnx/onnxruntime are missing."""
    missing = []
    for name in ('onnx', 'onnxruntime'):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f'{" and ".join(missing)} not installed: pip install the versions pinned in '
                          f'requirements/lock.txt (onnx, onnxruntime)')


class MethodForward(nn.Module):
    """Exposes ``model.<method>(x)`` as ``forward`` with a tuple output, e.g. a detector's ``extract_feat``."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        if not callable(getattr(model, method, None)):
            raise ValueError(f'{type(model).__name__} has no method {method!r} to export')
        self.model = model
        self.method = method

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        out = getattr(self.model, self.method)(x)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def reference_outputs(module: nn.Module, x: Union[Tensor, Tuple[Tensor, ...]]) -> List[Tensor]:
    """``module(x)`` (``module(*x)`` for a tuple) as a list of tensors, without gradients."""
    with torch.no_grad():
        out = module(*(x if isinstance(x, tuple) else (x,)))
    return list(out) if isinstance(out, (list, tuple)) else [out]


def export_onnx(module: nn.Module, example: Union[Tensor, Tuple[Tensor, ...]], path: str,
                opset: int = DEFAULT_OPSET, dynamic: bool = False, input_names: Sequence[str] = ('input',),
                output_names: Optional[Sequence[str]] = None,
                dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None) -> List[str]:
    """Export ``module`` (an export-form model from :func:`to_qdq`) to ``path``; returns the output names.

    ``example``: one input tensor or a tuple of them (named ``input_names``). ``dynamic`` marks batch,
    height and width of the first input (and the first dims of all outputs of rank 4) as dynamic;
    ``dynamic_axes`` adds to that (e.g. the number of RoIs). ``output_names`` default to out0, out1, ...
    """
    require_onnx()
    if opset < MIN_OPSET:
        raise ValueError(f'opset must be >= {MIN_OPSET} (per-channel DequantizeLinear), got {opset}')
    examples = example if isinstance(example, tuple) else (example,)
    outputs = reference_outputs(module.eval(), examples)
    output_names = list(output_names) if output_names is not None else [f'out{i}' for i in range(len(outputs))]
    if len(output_names) != len(outputs):
        raise ValueError(f'{len(output_names)} output names for {len(outputs)} outputs')
    axes: Dict[str, Dict[int, str]] = {}
    if dynamic:
        axes[input_names[0]] = {0: 'batch', 2: 'height', 3: 'width'}
        axes.update({n: {0: 'batch', 2: f'{n}_height', 3: f'{n}_width'}
                     for n, o in zip(output_names, outputs) if o.dim() == 4})
    for name, dims in (dynamic_axes or {}).items():
        axes.setdefault(name, {}).update(dims)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # dynamo=False is deprecated, not removed, in 2.13
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        torch.onnx.export(module, examples, path, dynamo=False, opset_version=opset, input_names=list(input_names),
                          output_names=output_names, dynamic_axes=axes or None, do_constant_folding=True)
    inline_shared_constants(path)
    return output_names


def inline_shared_constants(path: str) -> None:
    """Replace ``Identity(initializer)`` nodes by copies of the initializer.

    The TorchScript exporter stores equal constants once (e.g. every zero point 0) and aliases the
    others through Identity nodes; consumers that pattern-match Q/DQ want the constants themselves.
    """
    import onnx
    model = onnx.load(path)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    aliases = [n for n in graph.node if n.op_type == 'Identity' and n.input[0] in inits]
    for node in aliases:
        copy_ = onnx.TensorProto()
        copy_.CopyFrom(inits[node.input[0]])
        copy_.name = node.output[0]
        graph.initializer.append(copy_)
        graph.node.remove(node)
    if aliases:
        onnx.save(model, path)


def qdq_node_counts(path: str) -> Dict[str, int]:
    """Number of nodes per op type in the ONNX graph at ``path``."""
    import onnx
    return dict(Counter(node.op_type for node in onnx.load(path).graph.node))


@dataclass
class WeightConstant:
    """One per-channel weight DequantizeLinear whose integer input is a constant."""

    name: str
    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


def weight_constants(path: str) -> List[WeightConstant]:
    """The integer weight initializers feeding DequantizeLinear nodes, in graph order."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type != 'DequantizeLinear' or node.input[0] not in inits:
            continue
        axis = next((a.i for a in node.attribute if a.name == 'axis'), 1)
        zp = inits[node.input[2]] if len(node.input) > 2 else np.zeros((), inits[node.input[0]].dtype)
        found.append(WeightConstant(node.input[0], inits[node.input[0]], inits[node.input[1]], zp, axis))
    return found


def onnxruntime_session(source: Union[str, bytes], optimization: str = 'all', quantize_bias: bool = True,
                        threads: int = 1, **options):
    """An onnxruntime CPU session; the defaults are onnxruntime's default session (all optimizations, including
    ``WeightBiasQuantization``, which rounds a float conv bias to int32 at scale s_x·s_w), on ``threads``
    intra-op threads. ``options``: further ``SessionOptions`` attributes (e.g. ``optimized_model_filepath``)."""
    import onnxruntime as ort
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f'optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}')
    level = {'disable': 'ORT_DISABLE_ALL', 'basic': 'ORT_ENABLE_BASIC', 'extended': 'ORT_ENABLE_EXTENDED',
             'all': 'ORT_ENABLE_ALL'}[optimization]
    opts = ort.SessionOptions()
    for name, value in {'graph_optimization_level': getattr(ort.GraphOptimizationLevel, level),
                        'intra_op_num_threads': threads, 'inter_op_num_threads': 1, **options}.items():
        setattr(opts, name, value)
    disabled = [] if quantize_bias else [BIAS_QUANTIZATION_PASS]
    return ort.InferenceSession(source, opts, providers=['CPUExecutionProvider'], disabled_optimizers=disabled)


def run_onnxruntime(path: str, x: Union[Tensor, Tuple[Tensor, ...]], optimization: str = 'all',
                    quantize_bias: bool = False, extra_outputs: Sequence[str] = ()) -> List[np.ndarray]:
    """Outputs of the graph at ``path`` for input ``x`` (a tensor, or a tuple for the graph's inputs in order)
    on onnxruntime's CPU provider.

    ``quantize_bias=False`` switches off onnxruntime's ``WeightBiasQuantization`` pass, which rounds a
    float conv bias to int32 at scale s_x·s_w; the graph is then computed with the float bias it holds
    (as the PyTorch model does). ``True`` runs onnxruntime's default session. ``extra_outputs`` names
    intermediate tensors to return after the graph outputs.
    """
    import onnx
    source: Union[str, bytes] = path
    if extra_outputs:
        model = onnx.load(path)
        for name in extra_outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        source = model.SerializeToString()
    session = onnxruntime_session(source, optimization, quantize_bias)
    inputs = x if isinstance(x, tuple) else (x,)
    return session.run(None, {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)})


def activation_qdq_outputs(path: str) -> List[Tuple[str, str]]:
    """(module path, DequantizeLinear output) of every activation Q/DQ pair, in graph order.

    The module path comes from the QuantizeLinear scale's initializer name, ``<module path>.scale``. A quantizer
    written as two pairs (QuantizeLinear after the conv, then Clip and the final pair) counts once: its output
    is the last pair.
    """
    import onnx
    graph = onnx.load(path).graph
    dq_of = {n.input[0]: n for n in graph.node if n.op_type == 'DequantizeLinear'}
    pairs: Dict[str, str] = {}
    for node in graph.node:
        if node.op_type == 'QuantizeLinear' and node.output[0] in dq_of and node.input[1].endswith('.scale'):
            name = node.input[1][:-len('.scale')]
            pairs.pop(name, None)
            pairs[name] = dq_of[node.output[0]].output[0]
    return list(pairs.items())

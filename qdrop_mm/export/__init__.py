"""Export of quantized models to ONNX in QuantizeLinear/DequantizeLinear (QDQ) form."""
from .onnx_io import (MethodForward, activation_qdq_outputs, export_onnx, qdq_node_counts, run_onnxruntime,
                      weight_constants)
from .onnx_qdq import QDQActivation, QDQLayer, QDQSummary, integer_weight, to_qdq
from .parity import (Parity, QuantizerAgreement, compare_outputs, first_divergence, quantizer_agreement,
                     random_input, reference_outputs)

__all__ = ['MethodForward', 'activation_qdq_outputs', 'export_onnx', 'qdq_node_counts', 'run_onnxruntime',
           'weight_constants', 'QDQActivation', 'QDQLayer', 'QDQSummary', 'integer_weight', 'to_qdq', 'Parity',
           'QuantizerAgreement', 'compare_outputs', 'first_divergence', 'quantizer_agreement', 'random_input',
           'reference_outputs']

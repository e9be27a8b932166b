"""Export of quantized models to ONNX in QuantizeLinear/DequantizeLinear (QDQ) form."""
from .int32_bias import (BiasRounding, describe_rounding, grid_bias, layer_input_scales, off_grid_biases,
                         requantized_layers, round_biases_to_int32_grid)
from .onnx_io import (MethodForward, activation_qdq_outputs, export_onnx, onnxruntime_session, qdq_node_counts,
                      reference_outputs, run_onnxruntime, weight_constants)
from .onnx_qdq import QDQActivation, QDQLayer, QDQOptions, QDQSummary, integer_weight, to_qdq
from .parity import (Parity, QuantizerAgreement, compare_outputs, first_divergence, quantizer_agreement,
                     random_input)
from .prepare import PreparedExport, prepare_export
from .whole import (GraphPredictor, GraphRunner, WholeModel, compare_detections, compare_segmentation,
                    example_rois, model_kind)

__all__ = ['BiasRounding', 'describe_rounding', 'grid_bias', 'layer_input_scales', 'off_grid_biases',
           'requantized_layers', 'round_biases_to_int32_grid', 'MethodForward', 'activation_qdq_outputs',
           'export_onnx', 'onnxruntime_session', 'qdq_node_counts', 'run_onnxruntime', 'weight_constants',
           'QDQActivation', 'QDQLayer', 'QDQOptions', 'QDQSummary', 'integer_weight', 'to_qdq', 'Parity',
           'QuantizerAgreement', 'compare_outputs', 'first_divergence', 'quantizer_agreement', 'random_input',
           'reference_outputs', 'PreparedExport', 'prepare_export', 'GraphPredictor', 'GraphRunner', 'WholeModel',
           'compare_detections', 'compare_segmentation', 'example_rois', 'model_kind']

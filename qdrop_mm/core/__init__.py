"""Quantization core: plain PyTorch, no OpenMMLab imports."""
from .adaround import AdaRoundQuantizer, RoundingRegularizer
from .bn_fold import fold_bn
from .capture import capture_inputs
from .fake_quant import UniformQuantizer, fake_quantize, qparams_from_range, round_ste
from .lsq import LSQActQuantizer
from .method_hooks import MethodHooks
from .methods import (METHODS, CompensationConfig, MethodConfig, PredictionConfig, StageConfig, build_method,
                      register_method)
from .observers import MinMaxObserver, MSEObserver, build_observer
from .prediction_loss import PredictionGroup, PredictionSource, PredictionTerm, prediction_difference
from .ptq import PTQCallbacks, PTQResult, Unit, UnitRecord, calibrate_activations, run_ptq
from .qmodules import QuantLayer, QuantOutput, QuantResidual
from .quant_state import act_quantizers, quant_state, weight_quantizers
from .qwt import Compensated, LeastSquaresAccumulator, fit_compensation, wrap_units
from .reconstruct import NonFiniteLossError, ReconResult, output_mse, reconstruct_unit
from .unit_cache import UnitCache

__all__ = [
    'AdaRoundQuantizer', 'RoundingRegularizer', 'fold_bn', 'capture_inputs', 'UniformQuantizer',
    'fake_quantize', 'qparams_from_range', 'round_ste', 'LSQActQuantizer', 'METHODS', 'MethodConfig',
    'StageConfig', 'build_method', 'register_method', 'MinMaxObserver', 'MSEObserver', 'build_observer',
    'PTQCallbacks', 'PTQResult', 'Unit', 'UnitRecord', 'calibrate_activations', 'run_ptq', 'QuantLayer',
    'QuantOutput', 'QuantResidual', 'act_quantizers', 'quant_state', 'weight_quantizers', 'NonFiniteLossError',
    'ReconResult', 'output_mse', 'reconstruct_unit', 'UnitCache', 'CompensationConfig', 'Compensated',
    'LeastSquaresAccumulator', 'fit_compensation', 'wrap_units', 'PredictionConfig', 'PredictionGroup',
    'PredictionSource', 'PredictionTerm', 'prediction_difference', 'MethodHooks',
]

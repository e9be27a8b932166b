"""OpenMMLab glue: registration, config, calibration data, block rules, evaluation."""
from .checkpoint import install_safe_mmengine_loading, safe_load
from .eval_wrapper import PTQEvalWrapper
from .ptq_loop import PTQLoop
from .registry import LOOPS
from .settings import PTQSettings

__all__ = ['PTQEvalWrapper', 'PTQLoop', 'LOOPS', 'PTQSettings', 'install_safe_mmengine_loading', 'safe_load']

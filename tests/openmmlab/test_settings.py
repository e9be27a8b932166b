import pytest

from qdrop_mm.core.unit_cache import GiB
from qdrop_mm.openmmlab import PTQSettings

from .conftest import REPO


def test_cache_options_map_to_policy(tmp_path):
    s = PTQSettings.from_cfg(dict(cache=dict(dtype='float16', host_budget_gb=0.5, device_budget_gb=2)))
    p = s.cache_policy(str(tmp_path))
    assert (p.dtype, p.host_budget, p.device_budget) == ('float16', GiB // 2, 2 * GiB)
    assert p.spill_dir == str(tmp_path / 'cache_spill')
    assert PTQSettings.from_cfg(dict(cache=dict(spill=False))).cache_policy('w').spill_dir is None
    assert PTQSettings.from_cfg({}).cache_policy('w').dtype == 'float32'


@pytest.mark.parametrize('cache,match', [
    (dict(dtype='int8'), 'ptq.cache.dtype'),
    (dict(host_budget_gb=-1), 'ptq.cache.host_budget_gb'),
    (dict(budget=1), 'ptq.cache has unknown key'),
    (dict(spill='yes'), 'ptq.cache.spill'),
])
def test_cache_options_validated(cache, match):
    with pytest.raises(ValueError, match=match):
        PTQSettings.from_cfg(dict(cache=cache))


def test_bits_for_first_layer_and_overrides():
    s = PTQSettings.from_cfg(dict(w_bits=2, a_bits=4, first_layer_bits=8,
                                  overrides={'backbone.layer4': dict(w_bits=6), 'backbone.layer4.1': dict(a_bits=8)}))
    assert s.bits_for('backbone.conv1', first_layer=True) == (8, 4)
    assert s.bits_for('backbone.layer3.0', first_layer=False) == (2, 4)
    assert s.bits_for('backbone.layer4.0.conv1', first_layer=False) == (6, 4)
    assert s.bits_for('backbone.layer4.1', first_layer=False) == (6, 8)
    assert s.bits_for('backbone.layer40', first_layer=False) == (2, 4)


def test_device_budget_auto_is_zero_without_gpu_and_bad_values_name_the_key():
    import torch
    from qdrop_mm.openmmlab.settings import PTQConfigError
    s = PTQSettings.from_cfg(dict(cache=dict(device_budget_gb='auto')))
    if not torch.cuda.is_available():
        assert s.cache_policy('/tmp').device_budget == 0
    with pytest.raises(PTQConfigError, match=r"ptq.cache.device_budget_gb must be a number >= 0 \(GiB\) or 'auto'"):
        PTQSettings.from_cfg(dict(cache=dict(device_budget_gb='lots')))


def test_nested_overrides_from_cfg_options_flatten_to_module_paths():
    nested = {'backbone': {'layer1': {'0': {'w_bits': 8}}, 'layer2': {'a_bits': 8, 'w_bits': 6}}}
    s = PTQSettings.from_cfg(dict(overrides=nested))
    assert {(o.prefix, o.w_bits, o.a_bits) for o in s.overrides} == {('backbone.layer1.0', 8, None),
                                                                     ('backbone.layer2', 6, 8)}
    assert s.bits_for('backbone.layer1.0.conv1', first_layer=False) == (8, 4)
    assert s.bits_for('backbone.layer1.1.conv1', first_layer=False) == (4, 4)


def test_method_option_types_follow_the_stage_fields():
    from qdrop_mm.openmmlab.settings import PTQConfigError
    s = PTQSettings.from_cfg(dict(method_options=dict(compile=True, log_interval=50, w_lr=2e-3)))
    stage = s.build_method().stages[0]
    assert (stage.compile, stage.log_interval, stage.w_lr) == (True, 50, 2e-3)
    for opts, match in [(dict(compile=1), 'compile must be True or False'),
                        (dict(log_interval=2.0), 'log_interval must be a finite integer'),
                        (dict(batch_size=4), 'the reconstruction batch size is ptq.batch_size'),
                        (dict(pd_interval=True), 'pd_interval must be a finite integer'),
                        (dict(w_lr=float('nan')), 'w_lr must be a finite number')]:
        with pytest.raises(PTQConfigError, match=match):
            PTQSettings.from_cfg(dict(method_options=opts))


def test_calibration_and_reconstruction_batch_sizes_are_separate():
    s = PTQSettings.from_cfg(dict(batch_size=4))
    assert (s.calibration_batch_size, s.build_method().stages[0].batch_size) == (4, 4)
    s = PTQSettings.from_cfg(dict(batch_size=4, calib_batch_size=16))
    assert (s.calibration_batch_size, s.build_method().stages[0].batch_size) == (16, 4)
    with pytest.raises(ValueError, match='ptq.calib_batch_size must be a positive integer, got 0'):
        PTQSettings.from_cfg(dict(calib_batch_size=0))


def test_base_config_shows_exactly_the_defaults():
    """configs/_base_/ptq_qdrop.py shows ptq keys for the reader; each value must be the default."""
    from mmengine.config import Config
    from qdrop_mm.openmmlab.settings import CACHE_DEFAULTS
    ptq = Config.fromfile(f'{REPO}/configs/_base_/ptq_qdrop.py').ptq
    assert set(ptq) <= set(PTQSettings.__dataclass_fields__) and dict(ptq.cache) == CACHE_DEFAULTS
    assert PTQSettings.from_cfg(dict(ptq, cache={})) == PTQSettings()

import pytest

from qdrop_mm.core import StageConfig, build_method


def test_method_stages():
    assert build_method('rtn').stages == ()
    (ada,) = build_method('adaround', iters=10).stages
    assert ada.learn_rounding and not ada.learn_act_steps and not ada.act_quant
    w, a = build_method('brecq', iters=10, act_iters=5).stages
    assert (w.act_quant, a.act_quant, a.learn_rounding, a.iters, a.a_lr, a.drop_prob) == (False, True, False, 5, 4e-4, 1.0)
    (q,) = build_method('qdrop', iters=10).stages
    assert (q.drop_prob, q.learn_rounding, q.learn_act_steps, q.act_quant, q.w_lr, q.a_lr) == (0.5, True, True, True, 1e-3, 4e-5)
    assert build_method('qdrop', drop_prob=1.0).stages[0].drop_prob == 1.0
    assert build_method('qdrop').stages[0].iters == 20000
    assert build_method('qdrop', round_weight=0.1).stages[0].round_weight == 0.1


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='gptq'), 'unknown method'),
    (dict(name='qdrop', drop_prob=1.5), 'drop_prob'),
    (dict(name='qdrop', iters=0), 'iters'),
    (dict(name='qdrop', batch_size=-1), 'batch_size'),
    (dict(name='qdrop', learning_rate=1), 'unknown method option'),
])
def test_method_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_method(**kwargs)


def test_stage_needs_something_to_learn():
    with pytest.raises(ValueError, match='must learn'):
        StageConfig(learn_rounding=False, learn_act_steps=False)

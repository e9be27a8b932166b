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


def test_budget_schedule_scales_learning_rates_with_the_iterations():
    import math
    from qdrop_mm.core.methods import budget_lr_factor
    assert budget_lr_factor(20000) == 1.0 and budget_lr_factor(50000) == 1.0
    assert math.isclose(budget_lr_factor(2000), 10.0) and math.isclose(budget_lr_factor(500), 40.0)
    assert budget_lr_factor(100) == budget_lr_factor(10) == 100.0  # capped
    assert build_method('qdrop').stages[0].schedule == 'budget'  # the default; the paper's lr is one option away
    (paper,) = build_method('qdrop', iters=500, schedule='paper').stages
    assert (paper.schedule, paper.effective_w_lr, paper.effective_a_lr, paper.effective_b_lr) == \
        ('paper', 1e-3, 4e-5, 1e-3)
    (budget,) = build_method('qdrop', iters=500, schedule='budget').stages
    assert math.isclose(budget.effective_w_lr, 4e-2) and math.isclose(budget.effective_a_lr, 1.6e-3)
    assert math.isclose(budget.effective_b_lr, 4e-2)
    (full,) = build_method('qdrop', iters=20000, schedule='budget').stages
    assert (full.effective_w_lr, full.effective_a_lr) == (1e-3, 4e-5)
    stages = build_method('brecq', iters=2000, act_iters=500, schedule='budget').to_dict()['stages']
    assert math.isclose(stages[0]['effective_w_lr'], 1e-2) and math.isclose(stages[1]['effective_a_lr'], 4e-4 * 40)


@pytest.mark.parametrize('kwargs,match', [
    (dict(accum_steps=0), 'accum_steps'), (dict(accum_steps=1.5), 'accum_steps'),
    (dict(schedule='cosine'), 'schedule must be one of'),
])
def test_schedule_and_accumulation_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_method('qdrop', **kwargs)

# The PTQ section shared by every qdrop_mm config: QDrop as the authors' code runs
# it, with the learning rates scaled to the iteration budget (method_options.schedule
# 'budget'; identical to the authors' at 20 000 iterations; 'paper' keeps their rates).
# See README "Configuration". Override any key in a config or with --cfg-options ptq.w_bits=2 ...
# Every value below is the default (PTQSettings, the core's method configs): shown for the reader, kept
# equal to the code by tests/openmmlab/test_settings.py::test_base_config_shows_exactly_the_defaults.
ptq = dict(
    method='qdrop',          # rtn | adaround | brecq | qdrop | qwt | qdrop_qwt | pdquant
    w_bits=4,
    a_bits=4,
    first_layer_bits=8,      # stem conv weights; None = same as w_bits
    drop_prob=0.5,           # probability of KEEPING activation quantization per element
    iters=20000,             # reconstruction iterations per unit
    act_iters=5000,          # brecq's second (activation step) stage
    num_images=256,          # calibration images from the TRAIN split
    batch_size=2,            # reconstruction batch (images per step)
    calib_batch_size=None,   # images per calibration/capture forward; None = batch_size
    seed=0,
    scope='auto',            # backbone and neck (whichever the model has); heads stay FP, as in the authors' protocol
    quantize_fpn_outputs=False,   # FPN output convs: weights quantized, outputs FP
    overrides=dict(),        # e.g. {'backbone.layer4': dict(w_bits=8)}
    method_options=dict(),   # e.g. dict(schedule='paper', round_weight=0.01, w_lr=1e-3, a_lr=4e-5, warmup=0.2)
    act_calibration='fp',    # 'quantized': activation ranges observed behind the already quantized units
    holdout_images=0,        # > 0: also report the feature error on that many held-out train images
    cache=dict(dtype='float32', device_budget_gb='auto', host_budget_gb=16, spill=True),  # unit input/target cache
)

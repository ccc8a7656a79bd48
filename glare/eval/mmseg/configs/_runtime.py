# Shared runtime of GLARE's mmseg configs: registry scope, hooks, AdamW with layer-wise lr decay,
# and the IoU evaluation. Iteration counts and lr schedules live in the _<dataset>.py files.
default_scope = 'mmseg'
custom_imports = dict(imports=['glare.eval.mmseg'], allow_failed_imports=False)

env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))

# Fine-tuning a ViT: AdamW, lr decayed by 0.65 per block from the head down (BEiT / MAE practice);
# the constructor reads the depth off the backbone (see glare/eval/mmseg/backbone.py).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='GlareLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.65))

val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
# mmseg's IoUMetric, also reporting unrounded per-class IoU (read by the runner).
val_evaluator = dict(type='GlareIoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

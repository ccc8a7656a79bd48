# UperNet + GLARE ViT on the embedded mosaic (glare.data.mosaic): 10 texture classes, mask values 0..9,
# no reduce_zero_label. A small, CPU-sized protocol check, not a benchmark: a light head, crops of
# at most 128 px (smaller mosaics are used whole), whole-image inference and no checkpoints.
# Without --data-root the runner generates the default mosaic (ensure_mosaic(MosaicConfig())).
_base_ = ['./_upernet.py', './_runtime.py', './_dataloaders.py']
dataset_type = 'GlareMosaicDataset'
data_root = ''  # set by the runner
crop_size = (128, 128)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='train/images', seg_map_path='train/masks'),
        pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=2,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='val/images', seg_map_path='val/masks'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

model = dict(
    data_preprocessor=dict(size_divisor=32),  # mmseg's batching needs a size or a divisor to pad to
    decode_head=dict(num_classes=10, channels=128),
    auxiliary_head=dict(num_classes=10, channels=64),
    test_cfg=dict(mode='whole'))

max_iters = 2000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=500)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=100),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=100, end=max_iters, by_epoch=False),
]
# No checkpoints: mmengine's carry numpy objects that torch>=2.6 refuses to load by default
# (weights_only), and this protocol is short enough to rerun.
default_hooks = dict(checkpoint=None, logger=dict(interval=20))

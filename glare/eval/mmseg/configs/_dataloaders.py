# The dataloader settings every dataset config shares: it sets `batch_size` (train) and each
# loader's `dataset` (type, data_root, data_prefix, pipeline), which mmengine merges into these.
train_dataloader = dict(
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader

# Semantic FPN + GLARE ViT on ADE20k: 150 classes, (512, 512) crops, sliding-window inference.
_base_ = ['./_fpn.py', './_ade20k.py']
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

# Semantic FPN + GLARE ViT on Cityscapes: 19 classes, (512, 1024) crops, sliding-window inference.
_base_ = ['./_fpn.py', './_cityscapes.py']
crop_size = (512, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=19),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 683)))

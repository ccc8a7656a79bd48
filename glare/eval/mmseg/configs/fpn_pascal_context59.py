# Semantic FPN + GLARE ViT on Pascal Context 59: 59 classes, (480, 480) crops, sliding-window inference.
_base_ = ['./_fpn.py', './_pascal_context59.py']
crop_size = (480, 480)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=59),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(320, 320)))

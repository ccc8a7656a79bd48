# UperNet + GLARE ViT on Cityscapes: 19 classes, 512x1024 crops, 80k iterations, sliding-window inference.
_base_ = ['./_upernet.py', './_cityscapes.py']
crop_size = (512, 1024)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=19),
    auxiliary_head=dict(num_classes=19),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 683)))

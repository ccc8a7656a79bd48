# UperNet + GLARE ViT on LoveDA: 7 classes, 512x512 crops, 80k iterations, sliding-window inference.
_base_ = ['./_upernet.py', './_loveda.py']
crop_size = (512, 512)
model = dict(
    data_preprocessor=dict(size=crop_size),
    decode_head=dict(num_classes=7),
    auxiliary_head=dict(num_classes=7),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

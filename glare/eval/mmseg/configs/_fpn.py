# Semantic FPN (the head UDI evaluates with) over GLARE's adapted ViT: four blocks -> MultiLevelNeck (the
# patch grid resized by 4, 2, 1, 0.5) -> FPN (top-down fusion) -> FPNHead. A list of necks builds an
# mmengine Sequential. Channel counts are written for ViT-S (384); the GLARE runner adapts them.
norm_cfg = dict(type='SyncBN', requires_grad=True)  # the runner reverts SyncBN to BN without distributed training
# GlareViT wants RGB in [0, 1] and normalises with the ViT's own mean/std (see _upernet.py).
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[0.0, 0.0, 0.0],
    std=[255.0, 255.0, 255.0],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='GlareViT',
        arch='vit_small_patch14_dinov2',
        img_size=518,  # DINOv2-S/14's native 37x37 grid; 512 crops are resized to 518 by GlareViT
        timm_kwargs=dict(drop_path_rate=0.1),
        out_indices=(3, 5, 7, 11),
        init_cfg=None),
    neck=[
        dict(type='MultiLevelNeck', in_channels=[384, 384, 384, 384], out_channels=384, scales=[4, 2, 1, 0.5]),
        dict(type='FPN', in_channels=[384, 384, 384, 384], out_channels=256, num_outs=4),
    ],
    decode_head=dict(
        type='FPNHead',
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

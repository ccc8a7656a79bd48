# UperNet over GLARE's adapted ViT: four blocks -> MultiLevelNeck (the ViT pyramid: the patch grid
# resized by 4, 2, 1, 0.5) -> UPerHead, with an FCN auxiliary head on the third level.
# Channel counts are written for ViT-S (384); the GLARE runner sets them to the loaded backbone's width.
norm_cfg = dict(type='SyncBN', requires_grad=True)  # the runner reverts SyncBN to BN without distributed training
# GlareViT wants RGB in [0, 1] and normalises with the ViT's own mean/std, so the preprocessor only
# divides by 255 (mmseg's usual ImageNet mean/std here would normalise twice).
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
        # Architecture for an init spec (--weights imgfocus / none / timm); a GLARE export brings its own.
        arch='vit_small_patch14_dinov2',
        img_size=518,  # DINOv2-S/14's native 37x37 grid; 512 crops are resized to 518 by GlareViT
        timm_kwargs=dict(drop_path_rate=0.1),
        out_indices=(3, 5, 7, 11),
        init_cfg=None),  # the runner sets dict(type='Pretrained', checkpoint=<--weights>)
    neck=dict(type='MultiLevelNeck', in_channels=[384, 384, 384, 384], out_channels=384, scales=[4, 2, 1, 0.5]),
    decode_head=dict(
        type='UPerHead',
        in_channels=[384, 384, 384, 384],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=384,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

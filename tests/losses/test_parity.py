"""Each loss term against a plain DINO cross-entropy written out here, on a grid of temperatures and momenta."""

from __future__ import annotations

import pytest
import torch

from glare.models import GlareModel, create_backbone

TERMS = ("glob", "reg", "loc1", "loc2")


def reference(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
              teacher_temp: float) -> torch.Tensor:
    """DINO's loss in float64: -sum_k p_k log q_k, p = softmax((t - c) / tau_t), q = softmax(s / tau_s)."""
    s, t, c = student.double(), teacher.double(), center.double()
    p = torch.exp((t - c) / teacher_temp)
    p = p / p.sum(dim=-1, keepdim=True)
    log_q = s / student_temp - torch.logsumexp(s / student_temp, dim=-1, keepdim=True)
    return -(p * log_q).sum(dim=-1).mean()


@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("student_temp", [0.1, 0.5])
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07, 1.0])
@pytest.mark.parametrize("center_momentum", [0.0, 0.9])
def test_term_matches_plain_reference(tiny_cfg, term, student_temp, teacher_temp, center_momentum):
    cfg = tiny_cfg(f"loss.student_temp={student_temp}", f"loss.center_momentum={center_momentum}")
    loss = GlareModel(cfg, create_backbone(cfg.model)).losses[term]
    k = loss.center.shape[1]
    g = torch.Generator().manual_seed(len(term))
    student, teacher = torch.randn(6, k, generator=g) * 3, torch.randn(6, k, generator=g) * 3
    center = torch.randn(1, k, generator=g)
    loss.center.copy_(center)
    student.requires_grad_(True)
    got = loss(student, teacher, teacher_temp)

    if term == "glob":  # rows are views 1 then 2; each view's student learns from the other view's teacher
        (s1, s2), (t1, t2) = student.chunk(2), teacher.chunk(2)
        want = 0.5 * (reference(s1, t2, center, student_temp, teacher_temp)
                      + reference(s2, t1, center, student_temp, teacher_temp))
    else:
        want = reference(student, teacher, center, student_temp, teacher_temp)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
    grad_got, = torch.autograd.grad(got, student)
    grad_want, = torch.autograd.grad(want, student)
    assert torch.allclose(grad_got, grad_want, rtol=1e-4, atol=1e-6)
    # the centre moved one EMA step towards the teacher's mean over all rows
    expected_center = center_momentum * center + (1 - center_momentum) * teacher.mean(dim=0, keepdim=True)
    assert torch.allclose(loss.center, expected_center, atol=1e-6)


def test_empty_selection_gives_zero_and_keeps_the_centre(tiny_cfg):
    loss = GlareModel(tiny_cfg(), create_backbone(tiny_cfg().model)).losses["loc2"]
    k = loss.center.shape[1]
    student = torch.zeros(0, k, requires_grad=True)
    out = loss(student, torch.zeros(0, k), 0.04)
    assert float(out.detach()) == 0.0 and out.requires_grad
    assert torch.equal(loss.center, torch.zeros(1, k))

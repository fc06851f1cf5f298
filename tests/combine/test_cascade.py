"""Cascade sweeps, threshold choice, FLOP counting and the early-exit module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reuse_core.combine import Cascade, choose, flops_per_sample, seconds_per_sample, sweep
from reuse_core.combine.cascade import CascadePoint


def test_flops_per_sample_counts_matrix_products():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    assert flops_per_sample(model, torch.randn(8, 20)) == 2 * (20 * 30 + 30 * 4)
    assert seconds_per_sample(model, torch.randn(64, 20)) > 0


def test_sweep_matches_the_cascade_module_and_brute_force(gen):
    n, d, c = 300, 12, 5
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    stages = [nn.Linear(d, c), nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, c)), nn.Linear(d, c)]
    temps = [1.3, 0.8, 1.0]
    with torch.no_grad():
        logits = [s(x) for s in stages]
    flops = [flops_per_sample(s, x) for s in stages]
    points = sweep(logits, y, temperatures=temps, flops=flops, seconds=[1.0, 2.0, 3.0])
    assert points[-1].exits == [0.0, 0.0, 1.0] and points[-1].flops == pytest.approx(sum(flops))
    for p in points[:: max(1, len(points) // 12)]:
        cascade = Cascade(stages, temps, p.threshold)
        with torch.no_grad():
            out = cascade(x)
        # the module agrees with the sweep (up to confidences within float32 rounding of the threshold)
        assert abs(float((out.argmax(-1) == y).double().mean()) - p.accuracy) <= 2 / n
        # brute force from the definition
        conf = [torch.softmax(z.double() / t, -1).max(-1).values for z, t in zip(logits, temps)]
        stage = torch.full((n,), 2)
        for k in (1, 0):
            stage[conf[k] >= p.threshold] = k
        acc = float((torch.stack([z.argmax(-1) for z in logits]).gather(0, stage[None])[0] == y).double().mean())
        assert p.accuracy == pytest.approx(acc)
        reach = [float((stage >= k).double().mean()) for k in range(3)]
        assert p.flops == pytest.approx(sum(r * f for r, f in zip(reach, flops)))
        assert p.seconds == pytest.approx(sum(r * s for r, s in zip(reach, [1.0, 2.0, 3.0])))


def test_choose_for_accuracy_target_and_compute_budget():
    pts = [CascadePoint(0.5, 0.80, 10, 1, [1, 0]), CascadePoint(0.7, 0.90, 20, 2, [0.6, 0.4]),
           CascadePoint(0.9, 0.93, 30, 3, [0.3, 0.7]), CascadePoint(0.95, 0.93, 40, 4, [0.1, 0.9]),
           CascadePoint(1.1, 0.92, 50, 5, [0, 1])]
    assert choose(pts, min_accuracy=0.85) == (pts[1], True)
    assert choose(pts, min_accuracy=0.93) == (pts[2], True)
    assert choose(pts, min_accuracy=0.99) == (pts[2], False)  # unreachable: the most accurate, cheapest
    assert choose(pts, max_flops=35) == (pts[2], True)
    assert choose(pts, max_flops=15) == (pts[0], True)
    assert choose(pts, max_flops=5) == (pts[0], False)
    with pytest.raises(ValueError, match="exactly one target"):
        choose(pts)
    with pytest.raises(ValueError, match="exactly one target"):
        choose(pts, min_accuracy=0.9, max_flops=10)


def test_sweep_refuses_mismatched_stage_lists(gen):
    z = torch.randn(4, 3, generator=gen)
    with pytest.raises(ValueError, match=">= 2 stages"):
        sweep([z, z], torch.zeros(4, dtype=torch.long), temperatures=[1.0], flops=[1, 2], seconds=[1, 2])

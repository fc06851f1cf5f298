"""Temperature scaling fixes over-confidence, and the expected calibration error shows it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reuse_core.combine import expected_calibration_error, fit_temperature


def test_temperature_scaling_lowers_ece_on_an_overconfident_model(gen):
    n, c, t_true = 4000, 5, 3.0
    z = 1.5 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)  # z is calibrated
    over = t_true * z  # an over-confident model: same ranking, too sharp
    before = expected_calibration_error(over, y)
    t = fit_temperature(over, y)
    after = expected_calibration_error(over, y, temperature=t)
    assert abs(t - t_true) < 0.5, t
    assert after < before / 2, (before, after)
    assert F.cross_entropy(over / t, y) < F.cross_entropy(over, y)


def test_ece_of_a_perfectly_calibrated_constant_case():
    # confidence 0.75 everywhere, right 3 times in 4: calibrated, ECE 0
    logits = torch.log(torch.tensor([[0.75, 0.25]] * 8, dtype=torch.float64))
    y = torch.tensor([0, 0, 0, 1] * 2)
    assert expected_calibration_error(logits, y) < 1e-12
    # all right at confidence 0.75: off by 0.25
    assert abs(expected_calibration_error(logits, torch.zeros(8, dtype=torch.long)) - 0.25) < 1e-12

"""Knowledge distillation in a plain PyTorch training loop, with the fused DistillationLoss.

A wide teacher is trained on the embedded digits data first; then a small student learns from
its softened outputs (temperature 4) plus the hard labels. Runs in a few seconds on a CPU:

    python examples/distill_training_loop.py
"""
import torch
from sklearn.datasets import load_digits
from torch import nn

from reuse_core.nn import DistillationLoss

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
train, test = slice(0, 1400), slice(1400, None)


def fit(model, loss_of, epochs):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(1400).split(64):
            loss = loss_of(model, x[train][idx], y[train][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(x[test]).argmax(1) == y[test]).float().mean().item()


teacher = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
teacher_acc = fit(teacher, lambda m, xb, yb: nn.functional.cross_entropy(m(xb), yb), epochs=15)
teacher.eval()

student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
kd = DistillationLoss(temperature=4.0, kd_weight=0.9, ce_weight=0.1)


def distill_loss(model, xb, yb):
    with torch.no_grad():
        teacher_logits = teacher(xb)
    return kd(model(xb), teacher_logits, yb)  # loss and gradient in one fused pass


student_acc = fit(student, distill_loss, epochs=15)
print(f"teacher accuracy {teacher_acc:.3f}, distilled student accuracy {student_acc:.3f}")
assert student_acc > 0.8, student_acc

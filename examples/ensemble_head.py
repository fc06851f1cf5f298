"""An ensemble head with learned member weights, on the fused EnsembleAverage.

Three small members are trained on the embedded digits data; then only the combination weights
are learned on held-out data through the op's gradient (log_probs mode + NLL). The weights stay
non-negative and sum to 1 (softmax parametrisation). Runs in a few seconds on a CPU:

    python examples/ensemble_head.py
"""
import torch
from sklearn.datasets import load_digits
from torch import nn

from reuse_core.nn import EnsembleAverage

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
train, val, test = slice(0, 1100), slice(1100, 1400), slice(1400, None)

members = [nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10)) for width in (4, 32, 128)]
for m in members:
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(10):
        for idx in torch.randperm(1100).split(64):
            loss = nn.functional.cross_entropy(m(x[train][idx]), y[train][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.requires_grad_(False)

head = EnsembleAverage(len(members), mode="log_probs")  # learnable weights, uniform start
opt = torch.optim.Adam(head.parameters(), lr=0.1)
with torch.no_grad():
    val_logits = [m(x[val]) for m in members]
for _ in range(100):
    loss = nn.functional.nll_loss(head(val_logits), y[val])
    opt.zero_grad()
    loss.backward()
    opt.step()

with torch.no_grad():
    test_logits = [m(x[test]) for m in members]
    accs = [(z.argmax(1) == y[test]).float().mean().item() for z in test_logits]
    ens = (head(test_logits).argmax(1) == y[test]).float().mean().item()
print("member accuracies", [f"{a:.3f}" for a in accs], f"ensemble {ens:.3f}")
print("learned weights", [f"{w:.2f}" for w in head.weights.tolist()])
assert head.weights[0] < head.weights[2], "the weakest member should get less weight than the strongest"

"""reuse_core.combine.merge against float64 references written from each paper's definition, on
fresh random state dicts: linear, task arithmetic, TIES (trim, sign election, disjoint mean),
DARE (drop, exact rescaling, one seed one result), SLERP (and its fallback to lerp); buffers;
stacked heads; and the errors that name the model that does not fit."""
from __future__ import annotations

import math

import pytest
import torch

from reuse_core.combine import MergeError, merge, stack_heads, stack_logits, union_classes
from reuse_core.combine.merge import PARALLEL_COS

SHAPES = {"conv.weight": (6, 3, 3, 3), "conv.bias": (6,), "fc.weight": (5, 12), "fc.bias": (5,)}
BUFFERS = {"bn.running_mean": (6,), "bn.running_var": (6,)}


def state(gen, *, near=None, dtype=torch.float64) -> dict:
    """A random state dict (parameters, batch-norm statistics, an integer counter); ``near``: a
    fine-tuning of that state (it plus a small random task vector)."""
    out = {}
    for k, shape in {**SHAPES, **BUFFERS}.items():
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if k.endswith("running_var"):
            x = x.abs() + 0.5
        out[k] = (x if near is None else near[k].double() + 0.1 * x).to(dtype)
    out["bn.num_batches_tracked"] = torch.randint(0, 100, (), generator=gen)
    return out


@pytest.fixture
def family(gen):
    base = state(gen)
    return base, [state(gen, near=base) for _ in range(3)]


def params(sd):
    return {k: v for k, v in sd.items() if k in SHAPES}


def check_buffers(out, models):
    for k in BUFFERS:  # floating buffers: the uniform mean of the models, whatever the method
        torch.testing.assert_close(out[k], sum(m[k] for m in models) / len(models), rtol=1e-12, atol=1e-12)
    assert torch.equal(out["bn.num_batches_tracked"], models[0]["bn.num_batches_tracked"])


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- references, from the papers


def ref_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the top-k% entries by magnitude (k = ceil(density * n)), reset the rest."""
    flat = tau.flatten().tolist()
    k = math.ceil(density * len(flat))
    keep = set(sorted(range(len(flat)), key=lambda i: -abs(flat[i]))[:k])
    return torch.tensor([v if i in keep else 0.0 for i, v in enumerate(flat)], dtype=torch.float64).view(tau.shape)


def ref_elect_and_mean(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES steps 2-3, entry by entry: γ = sgn(Σ w τ); the mean (weighted by w) of the τ that agree
    with γ; 0 where γ = 0."""
    flats = [t.flatten().tolist() for t in taus]
    out = []
    for j in range(len(flats[0])):
        values = [f[j] for f in flats]
        total = sum(w * v for w, v in zip(weights, values))
        gamma = (total > 0) - (total < 0)
        agree = [(w, v) for w, v in zip(weights, values) if v != 0 and ((v > 0) - (v < 0)) == gamma]
        out.append(sum(w * v for w, v in agree) / sum(w for w, _ in agree) if gamma and agree else 0.0)
    return torch.tensor(out, dtype=torch.float64).view(taus[0].shape)


def ref_dare_masks(shapes: list[tuple], n_models: int, drop: float, seed: int) -> dict:
    """The masks as the contract draws them: parameter keys in sorted order, models in order,
    kept where torch.rand(shape) >= drop."""
    g = torch.Generator().manual_seed(seed)
    return {(k, i): torch.rand(shapes[k], generator=g) >= drop for k in sorted(shapes) for i in range(n_models)}


def ref_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake's slerp on the flattened tensors: sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b."""
    cos = float(a.flatten() @ b.flatten()) / (float(a.norm()) * float(b.norm()))
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega) * a + math.sin(t * omega) / math.sin(omega) * b


# ---------------------------------------------------------------- the methods


def test_linear_is_the_weighted_mean(family):
    base, models = family
    w = [0.5, 2.0, 1.5]
    out = merge(None, models, "linear", weights=w)
    for k in SHAPES:
        close(out[k], sum(wi * m[k] for wi, m in zip(w, models)) / sum(w))
    check_buffers(out, models)
    equal = merge(base, models, "linear")  # a base is only checked, not used
    for k in SHAPES:
        close(equal[k], sum(m[k] for m in models) / 3)


def test_task_arithmetic_adds_weighted_task_vectors(family):
    base, models = family
    w, lam = [1.0, -0.5, 0.7], 0.8  # a negative weight subtracts a task (Ilharco et al.'s negation)
    out = merge(base, models, "task-arithmetic", weights=w, scale=lam)
    for k in SHAPES:
        close(out[k], base[k] + lam * sum(wi * (m[k] - base[k]) for wi, m in zip(w, models)))
    check_buffers(out, models)
    # two models at λ = 0.5 with unit weights are their plain average
    half = merge(base, models[:2], "task-arithmetic", scale=0.5)
    for k in SHAPES:
        close(half[k], (models[0][k] + models[1][k]) / 2)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5]])
def test_ties_trims_elects_signs_and_takes_the_disjoint_mean(family, density, weights):
    base, models = family
    lam = 1.3
    out = merge(base, models, "ties", density=density, weights=weights, scale=lam)
    w = weights or [1.0, 1.0, 1.0]
    for k in SHAPES:
        taus = [ref_trim(m[k] - base[k], density) for m in models]
        close(out[k], base[k] + lam * ref_elect_and_mean(taus, w))
    check_buffers(out, models)


def test_ties_keeps_exactly_the_top_fraction_and_a_zero_sum_stays_zero(gen):
    from reuse_core.combine.merge import trim

    tau = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    kept = trim(tau, 0.3)
    assert int((kept != 0).sum()) == math.ceil(0.3 * 63)
    assert float(kept.abs()[kept != 0].min()) >= float(tau.abs()[kept == 0].max())
    # entry 0: +1 and -1 (both kept) sum to 0: no sign wins, the entry stays at the base
    base = {"w": torch.zeros(4, dtype=torch.float64)}
    a = {"w": torch.tensor([1.0, 2.0, -3.0, 0.5], dtype=torch.float64)}
    b = {"w": torch.tensor([-1.0, 1.0, 1.0, 0.5], dtype=torch.float64)}
    out = merge(base, [a, b], "ties", density=1.0)["w"]
    close(out, torch.tensor([0.0, 1.5, -3.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties"])
def test_dare_matches_the_reference_with_the_documented_masks(family, method):
    base, models = family
    drop, lam, seed, w = 0.4, 0.9, 1234, [1.0, 0.5, 2.0]
    out = merge(base, models, method, drop=drop, scale=lam, weights=w, generator=torch.Generator().manual_seed(seed))
    masks = ref_dare_masks({k: SHAPES[k] for k in SHAPES}, len(models), drop, seed)
    for k in SHAPES:
        taus = [torch.where(masks[k, i], (m[k] - base[k]) / (1 - drop), 0.0) for i, m in enumerate(models)]
        tau = sum(wi * t for wi, t in zip(w, taus)) if method == "dare-linear" else ref_elect_and_mean(taus, w)
        close(out[k], base[k] + lam * tau)
    check_buffers(out, models)


def test_dare_rescales_kept_entries_exactly_and_drops_about_p(gen):
    base = {"w": torch.randn(200, 200, generator=gen, dtype=torch.float64)}
    model = {"w": base["w"] + torch.randn(200, 200, generator=gen, dtype=torch.float64)}
    tau = model["w"] - base["w"]
    for drop in (0.1, 0.5, 0.9):
        got = merge(base, [model], "dare-linear", drop=drop, generator=torch.Generator().manual_seed(7))["w"]
        got = got - base["w"]
        dropped = got == 0
        share = float(dropped.double().mean())
        assert abs(share - drop) < 0.01, f"drop {drop}: dropped {share}"
        close(got[~dropped], tau[~dropped] / (1 - drop))  # the kept entries, rescaled by exactly 1/(1 - p)


def test_dare_one_seed_one_result_whatever_the_key_order(family):
    base, models = family

    def run(seed, sds=models, b=base):
        return merge(b, sds, "dare-ties", drop=0.5, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in SHAPES)
    # a safetensors file does not keep the dict's order: the masks must not depend on it
    shuffled = run(5, [dict(reversed(m.items())) for m in models], dict(reversed(base.items())))
    assert all(torch.equal(first[k], shuffled[k]) for k in first) and list(shuffled) == list(reversed(base))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_interpolates_on_the_great_circle(family, t):
    _, models = family
    a, b = models[0], models[1]
    out = merge(None, [a, b], "slerp", t=t)
    for k in SHAPES:
        close(out[k], ref_slerp(a[k], b[k], t))
    check_buffers(out, [a, b])


def test_slerp_falls_back_to_lerp_when_nearly_parallel(gen):
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    cases = {"parallel": (x, 2 * x), "anti-parallel": (x, -3 * x), "zero": (x, torch.zeros_like(x)),
             "nearly parallel": (x, x + 1e-4 * torch.randn(5, 4, generator=gen, dtype=torch.float64))}
    for what, (a, b) in cases.items():
        if what == "nearly parallel":
            assert float(a.flatten() @ b.flatten() / (a.norm() * b.norm())) > PARALLEL_COS
        got = merge(None, [{"w": a}, {"w": b}], "slerp", t=0.25)["w"]
        close(got, 0.75 * a + 0.25 * b)


def test_dtypes_are_kept_and_the_math_runs_in_float64(gen):
    base = state(gen, dtype=torch.float32)
    models = [state(gen, near=base, dtype=torch.float32) for _ in range(2)]
    out = merge(base, models, "task-arithmetic", scale=0.7)
    for k in SHAPES:
        assert out[k].dtype == torch.float32
        ref = base[k].double() + 0.7 * sum(m[k].double() - base[k].double() for m in models)
        torch.testing.assert_close(out[k], ref.float(), rtol=0, atol=0)  # one rounding, at the end


def test_explicit_buffers_are_averaged_not_merged(family):
    base, models = family
    out = merge(base, models, "task-arithmetic", scale=2.0, buffers={"fc.bias", *BUFFERS})
    close(out["fc.bias"], sum(m["fc.bias"] for m in models) / 3)
    close(out["fc.weight"], base["fc.weight"] + 2.0 * sum(m["fc.weight"] - base["fc.weight"] for m in models))


# ---------------------------------------------------------------- refusals


def test_architecture_mismatches_name_the_model(family):
    base, models = family
    wrong_shape = dict(models[1], **{"fc.weight": torch.zeros(5, 13, dtype=torch.float64)})
    with pytest.raises(MergeError, match=r"b does not have the architecture of the base: fc.weight is \(5, 13\)"):
        merge(base, {"a": models[0], "b": wrong_shape}, "ties")
    missing = {k: v for k, v in models[1].items() if k != "conv.bias"}
    with pytest.raises(MergeError, match="model 1 does not have the architecture of the base: it lacks conv.bias"):
        merge(base, [models[0], missing], "task-arithmetic")
    with pytest.raises(MergeError, match="model 1 does not have the architecture of model 0"):
        merge(None, [models[0], dict(models[1], extra=torch.zeros(1))], "linear")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(method="ties", base=None), "ties needs the base"),
    (dict(method="slerp", n=3, base=None), "exactly 2 models"),
    (dict(method="slerp"), "slerp takes no base"),
    (dict(method="task-arithmetic", density=0.5), "density is a setting of ties, not of task-arithmetic"),
    (dict(method="ties", drop=0.5), "drop is a setting of dare-linear and dare-ties"),
    (dict(method="linear", t=0.5), "t is a setting of slerp"),
    (dict(method="linear", scale=2.0), "scale"),
    (dict(method="ties", density=0.0), r"density must be in \(0, 1\]"),
    (dict(method="dare-linear", drop=1.0), r"drop must be in \[0, 1\)"),
    (dict(method="task-arithmetic", weights=[1.0]), "1 given for 2 models"),
    (dict(method="ties", weights=[1.0, -1.0]), "ties weights must be positive"),
    (dict(method="average"), "unknown merge method 'average'"),
])
def test_bad_settings_are_refused(family, kwargs, message):
    base, models = family
    kwargs = dict(kwargs)
    n, b = kwargs.pop("n", 2), kwargs.pop("base", base)
    method = kwargs.pop("method")
    with pytest.raises(MergeError, match=message):
        merge(b, models[:n] if n <= 3 else models, method, **kwargs)


# ---------------------------------------------------------------- stacked heads


def test_stacked_heads_keep_each_model_s_rows_over_the_union(gen):
    heads = [{"weight": torch.randn(3, 4, generator=gen), "bias": torch.randn(3, generator=gen)},
             {"weight": torch.randn(2, 4, generator=gen), "bias": torch.randn(2, generator=gen)}]
    classes = [["0", "1", "2"], ["7", "8"]]
    stacked, union = stack_heads(heads, classes)
    assert union == ["0", "1", "2", "7", "8"]
    assert torch.equal(stacked["weight"], torch.cat([heads[0]["weight"], heads[1]["weight"]]))
    assert torch.equal(stacked["bias"], torch.cat([heads[0]["bias"], heads[1]["bias"]]))
    # a class both models predict gets the mean of their rows; the union keeps first appearance
    overlap, union = stack_heads(heads, [["0", "1", "2"], ["2", "9"]])
    assert union == ["0", "1", "2", "9"]
    torch.testing.assert_close(overlap["weight"][2], (heads[0]["weight"][2] + heads[1]["weight"][0]) / 2)
    assert torch.equal(overlap["weight"][3], heads[1]["weight"][1])
    with pytest.raises(MergeError, match="the head of model 1 does not fit"):
        stack_heads(heads, [["0", "1", "2"], ["7", "8", "9"]])


def test_stacked_logits_are_the_stacked_head_on_each_model_s_features(gen):
    feats = [torch.randn(6, 4, generator=gen) for _ in range(2)]
    heads = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)]
    classes = [["a", "b", "c"], ["d", "e"]]
    z = stack_logits([h(f) for h, f in zip(heads, feats)], classes)
    stacked, _ = stack_heads([h.state_dict() for h in heads], classes)
    assert z.shape == (6, 5)
    for i, (f, cols) in enumerate(zip(feats, union_classes(classes)[1])):
        torch.testing.assert_close(z[:, cols], f @ stacked["weight"][cols].T + stacked["bias"][cols])

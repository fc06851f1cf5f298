"""Model soups (Wortsman et al., 2022): averaging the weights of models fine-tuned from one parent.

Averaging only makes sense for models that share an architecture and a starting point (they stay
in one basin of the loss); :func:`check_ingredients` refuses anything else before any averaging.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch


class SoupError(ValueError):
    """The models cannot be souped: no common parent, or different architectures."""


@dataclass
class Ingredient:
    """A model to soup: its name (store ID), its parents (lineage), its architecture (backbone
    name and config) and its weights."""

    name: str
    parents: Sequence[str]
    architecture: Mapping
    state_dict: Mapping[str, torch.Tensor] = field(repr=False)


def check_ingredients(ingredients: Sequence[Ingredient]) -> str:
    """The parent every ingredient was fine-tuned from; raises SoupError saying which model differs
    and how."""
    if len(ingredients) < 2:
        raise SoupError(f"a soup needs at least 2 models, got {len(ingredients)}")
    first = ingredients[0]
    common = set(first.parents)
    for ing in ingredients:
        if not ing.parents:
            raise SoupError(f"model {ing.name} has no parent in its lineage: a soup averages models fine-tuned "
                            "from one parent")
        common &= set(ing.parents)
    if not common:
        lines = "; ".join(f"{i.name} <- {', '.join(i.parents)}" for i in ingredients)
        raise SoupError(f"the models do not share a parent ({lines}): a soup averages models fine-tuned from one parent")
    for ing in ingredients[1:]:
        if dict(ing.architecture) != dict(first.architecture):
            raise SoupError(f"model {ing.name} has architecture {dict(ing.architecture)}, but {first.name} has "
                            f"{dict(first.architecture)}: a soup averages models of one architecture")
        shapes = {k: tuple(v.shape) for k, v in ing.state_dict.items()}
        first_shapes = {k: tuple(v.shape) for k, v in first.state_dict.items()}
        if shapes != first_shapes:
            diff = sorted(k for k in shapes.keys() | first_shapes.keys() if shapes.get(k) != first_shapes.get(k))
            raise SoupError(f"model {ing.name}'s weights differ from {first.name}'s in name or shape at "
                            f"{', '.join(diff[:5])}: a soup averages models of one architecture")
    return sorted(common)[0]


def uniform_soup(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of every floating-point tensor; integer buffers (batch-norm's step counter) come
    from the first model."""
    first = state_dicts[0]
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            out[k] = torch.stack([sd[k].to(torch.float64) for sd in state_dicts]).mean(0).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


@dataclass
class GreedySoup:
    state_dict: dict[str, torch.Tensor]
    chosen: list[int]        # indices into the ingredients, in the order they were added
    accuracy: float          # held-out accuracy of the soup
    history: list[dict]      # one row per ingredient tried: index, accuracy with it, added


def greedy_soup(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                held_out_accuracy: Callable[[Mapping[str, torch.Tensor]], float]) -> GreedySoup:
    """Greedy soup: the ingredients in order of their own held-out accuracy, best first; each is
    added only if the soup's held-out accuracy with it is higher than without."""
    own = [held_out_accuracy(sd) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: -own[i])
    chosen, best = [order[0]], own[order[0]]
    history = [{"index": order[0], "accuracy": best, "added": True}]
    for i in order[1:]:
        acc = held_out_accuracy(uniform_soup([state_dicts[j] for j in chosen + [i]]))
        added = acc > best
        history.append({"index": i, "accuracy": acc, "added": added})
        if added:
            chosen.append(i)
            best = acc
    return GreedySoup(uniform_soup([state_dicts[j] for j in chosen]), chosen, best, history)

"""``soup``: average the weights of stored models fine-tuned from one parent (Wortsman et al.,
2022), uniformly or greedily (ingredients best first, each kept only if the validation accuracy of
the soup improves), and save the soup with its ingredients as parents.

Models that do not share a parent and an architecture (backbone, config, classes, weight shapes)
are refused before anything is averaged.
"""
from __future__ import annotations

from reuse_core.combine import Ingredient, check_ingredients, greedy_soup, uniform_soup
from reuse_core.strategy import NAME_OPTION, Option, Strategy, StrategyResult, data_options, parse_classes
from reuse_core.strategy.blocks import class_indices, evaluate, load_splits

METHODS = ("uniform", "greedy")


def run(ctx, options: dict) -> StrategyResult:
    ids = [ctx.model_id(r) for r in options["models"]]
    ingredients = []
    for i in ids:
        state, m = ctx.store.load(i)
        arch = {"backbone": m["backbone"], "config": m["config"], "classes": m["classes"]}
        ingredients.append(Ingredient(i, m["lineage"]["parents"], arch, state))
    parent = check_ingredients(ingredients)
    model, first = ctx.load_model(ids[0])
    dataset = options["dataset"] or first["dataset"]
    classes = parse_classes(options["classes"]) or class_indices(dataset, first["classes"], options)
    _, val, test = load_splits(options, dataset=dataset, classes=classes)

    def score(state, data) -> dict:
        model.load_state_dict(state)
        return evaluate(model, data, ctx.device)

    states = [ing.state_dict for ing in ingredients]
    own_val = [score(s, val)["accuracy"] for s in states]
    own_test = [score(s, test)["accuracy"] for s in states]
    if options["method"] == "greedy":
        result = greedy_soup(states, lambda s: score(s, val)["accuracy"])
        soup, chosen, history = result.state_dict, [ids[i] for i in result.chosen], result.history
    else:
        soup, chosen, history = uniform_soup(states), ids, []
    val_m, test_m = score(soup, val), score(soup, test)
    metrics = {
        "test_accuracy": test_m["accuracy"], "test_loss": test_m["loss"], "val_accuracy": val_m["accuracy"],
        "ingredients_val_accuracy": own_val, "ingredients_test_accuracy": own_test,
        "best_ingredient_test_accuracy": max(own_test), "chosen": chosen, "parent": parent,
        "method": options["method"], "greedy_history": [{**h, "model": ids[h["index"]]} for h in history],
    }
    model_id = ctx.save(soup, backbone=first["backbone"], config=first["config"], dataset=dataset,
                        classes=first["classes"], metrics=metrics, parents=chosen, options=options, name=options["name"])
    if model_id is None:  # not the main process of a torchrun job: it saved nothing
        return StrategyResult(metrics=metrics)
    ctx.log(f"soup: {len(chosen)} of {len(ids)} models averaged (test accuracy "
            f"{metrics['test_accuracy']:.4f}, best ingredient {metrics['best_ingredient_test_accuracy']:.4f})")
    return StrategyResult(metrics=metrics, models=[model_id])


SOUP = Strategy(
    name="soup",
    description="average the weights of models fine-tuned from one parent (uniform or greedy soup)",
    options=(
        Option("models", list, help="stored models fine-tuned from one parent (recipe steps, store IDs, prefixes "
               "or names)", ref=True),
        Option("method", str, "greedy", "uniform: average all; greedy: best first, keep each only if the "
               "validation accuracy improves", choices=METHODS),
        *data_options(inherit_from="first model", label_budget=False, classes_help="the dataset's class indices for "
                      "the models' outputs, in order, e.g. 0-4 (default: the first model's classes)"),
        Option("seed", int, 0, "seed of the data split (use the models' own)"),
        NAME_OPTION,
    ),
    run=run,
    examples=("reuse run soup --models ft-a ft-b ft-c --method greedy",),
)

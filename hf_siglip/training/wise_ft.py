"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): mixing the starting and the fine-tuned
weights, theta(alpha) = (1 - alpha) theta_0 + alpha theta_1, trades what fine-tuning gained on the target for what
it lost elsewhere.

At the end of `hf-siglip train --wise_ft_alphas 0,0.25,0.5,0.75,1 --anchor_dataset ...` each mix is evaluated on
the target's evaluation split (`--wise_ft_target_metric`, `TARGET_METRICS`: retrieval recall@1, the mean of
image->text and text->image, or zero-shot top-1 with the target's class names, the paper's own target) and on the
anchor set (zero-shot top-1, `hf_siglip.cli.anchor`); one mix is chosen by `--wise_ft_rule` and becomes the model
saved in output_dir (the fine-tuned end point is kept in output_dir/finetuned/). The grid always holds 0 (the
starting weights, exactly) and 1 (the fine-tuned weights, exactly): the rules measure against them.

Rules (`WISE_FT_RULES`), ties going to the smaller alpha (the mix closer to the starting weights):
- `anchor_drop` (default): the best target metric among the mixes whose anchor accuracy is at most
  `--wise_ft_max_anchor_drop` below the starting weights' (alpha 0 always qualifies).
- `mean`: the best mean of the target metric and the anchor accuracy (both fractions in [0, 1]).
- `target`: the best target metric, forgetting ignored.
- a number in [0, 1] (e.g. `0.5`, the paper's usual mix): that alpha (added to the grid).
"""

import math

import torch

from .finite import finite_or_none

WISE_FT_RULES = ("anchor_drop", "mean", "target")
# --wise_ft_target_metric: what "target" means in the sweep, the rules, the card and eval_results.json. Retrieval
# recall@1 suits data whose captions differ per image; zero-shot top-1 suits labelled data whose captions are shared
# by a class (template captions tie, so their recall stays near chance whatever the model learns).
TARGET_METRICS = {"recall@1": "recall@1 (mean of image->text and text->image)",
                  "zero_shot_top1": "zero-shot top-1 over its class names"}


def parse_alphas(value) -> list[float] | None:
    """`--wise_ft_alphas`: '0,0.5,1' (or a YAML list) -> sorted alphas with 0 and 1 added; None when unset. Raises
    ValueError naming a value that is not a number in [0, 1]."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    items = value.replace(" ", ",").split(",") if isinstance(value, str) else list(value)
    alphas = set()
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            alpha = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"wise_ft_alphas: {item!r} is not a number (give alphas in [0, 1], e.g. "
                             "0,0.25,0.5,0.75,1)") from None
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"wise_ft_alphas: {alpha:g} is outside [0, 1] (0: the starting weights, 1: the "
                             "fine-tuned ones)")
        alphas.add(alpha)
    return sorted(alphas | {0.0, 1.0})


def wise_ft_problems(script_args) -> list[str]:
    """Problems of the WiSE-FT and anchor settings, found before any data is read."""
    problems = []
    try:
        alphas = parse_alphas(script_args.wise_ft_alphas)
    except ValueError as error:
        problems.append(str(error))
        alphas = None
    if script_args.wise_ft_rule not in WISE_FT_RULES:
        try:
            fixed = rule_alpha(script_args.wise_ft_rule)
        except ValueError:
            fixed = None
        if fixed is None:
            problems.append(f"wise_ft_rule is one of {WISE_FT_RULES} or an alpha in [0, 1], got "
                            f"{script_args.wise_ft_rule!r}")
    drop = script_args.wise_ft_max_anchor_drop
    if not (isinstance(drop, (int, float)) and math.isfinite(drop) and drop >= 0):
        problems.append(f"wise_ft_max_anchor_drop must be a number >= 0 (a fraction: 0.01 = one point of "
                        f"accuracy), got {drop!r}")
    from ..cli.arguments import DEMO

    target = script_args.wise_ft_target_metric
    if target not in TARGET_METRICS:
        problems.append(f"wise_ft_target_metric is one of {tuple(TARGET_METRICS)}, got {target!r}")
    elif target == "zero_shot_top1" and not (script_args.zero_shot_classes or script_args.dataset == DEMO):
        problems.append(f"wise_ft_target_metric zero_shot_top1 needs the target's class names: give "
                        f"--zero_shot_classes (and --zero_shot_templates) for dataset {script_args.dataset}")
    if alphas is not None and not script_args.anchor_dataset:
        problems.append("wise_ft_alphas needs --anchor_dataset: the mixes are chosen by what they keep on it")
    if (alphas is not None or script_args.anchor_dataset) and script_args.eval_split is None:
        problems.append("anchor_dataset / wise_ft_alphas need an evaluation split (the target metric); eval_split "
                        "is None")
    return problems


def rule_alpha(rule) -> float | None:
    """The alpha a numeric `--wise_ft_rule` fixes (None for a named rule); ValueError outside [0, 1]."""
    if rule in WISE_FT_RULES:
        return None
    alpha = float(rule)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"wise_ft_rule {rule!r}: an alpha must lie in [0, 1]")
    return alpha


def sweep_alphas(alphas_setting, rule) -> list[float]:
    """The grid a run sweeps: `--wise_ft_alphas` with 0, 1 and a fixed rule's alpha."""
    fixed = rule_alpha(rule)
    return sorted(set(parse_alphas(alphas_setting)) | ({fixed} if fixed is not None else set()))


def weight_snapshot(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state dict (the weights a mix starts from or ends at)."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def interpolate(theta_0: dict, theta_1: dict, alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) theta_0 + alpha theta_1 for every floating-point tensor, in float32 at least, cast back to the
    tensor's dtype (`torch.lerp`, exact at 0 and 1); integer buffers are equal in both and taken from theta_1."""
    mixed = {}
    for name, end in theta_1.items():
        start = theta_0[name]
        if not end.is_floating_point():
            mixed[name] = end.clone()
            continue
        dtype = torch.promote_types(end.dtype, torch.float32)
        mixed[name] = torch.lerp(start.to(dtype), end.to(dtype), alpha).to(end.dtype)
    return mixed


def target_value(metrics: dict, prefix: str, target_metric: str = "recall@1") -> float:
    """The target metric (`TARGET_METRICS`) of one evaluation: the mean of its two recall@1 values, or its zero-shot
    top-1."""
    if target_metric == "zero_shot_top1":
        return metrics[f"{prefix}zero_shot_top1"]
    return (metrics[f"{prefix}i2t_recall@1"] + metrics[f"{prefix}t2i_recall@1"]) / 2


def choose(rows: list[dict], rule: str, max_anchor_drop: float) -> int:
    """Index in `rows` (sorted by alpha, each with `alpha`, `target`, `anchor`) of the mix `rule` picks; see the
    module docstring. Ties go to the smaller alpha."""
    start = next(row for row in rows if row["alpha"] == 0.0)
    fixed = rule_alpha(rule)
    if fixed is not None:
        return next(i for i, row in enumerate(rows) if row["alpha"] == fixed)
    if rule == "anchor_drop":
        candidates = [i for i, row in enumerate(rows) if row["anchor"] >= start["anchor"] - max_anchor_drop - 1e-12]
        score = [row["target"] for row in rows]
    elif rule == "mean":
        candidates, score = range(len(rows)), [(row["target"] + row["anchor"]) / 2 for row in rows]
    elif rule == "target":
        candidates, score = range(len(rows)), [row["target"] for row in rows]
    else:
        raise AssertionError(rule)  # rule_alpha refused it above
    best = max(score[i] for i in candidates)
    return min(i for i in candidates if score[i] == best)


def rule_text(rule: str, max_anchor_drop: float, target_metric: str = "recall@1") -> str:
    target = TARGET_METRICS[target_metric]
    if rule_alpha(rule) is not None:
        return f"the fixed mix alpha = {rule_alpha(rule):g}"
    return {"anchor_drop": f"the best target {target} among the mixes whose anchor zero-shot top-1 is at most "
                           f"{max_anchor_drop:g} below the starting weights'",
            "mean": f"the best mean of the target {target} and the anchor zero-shot top-1",
            "target": f"the best target {target}"}[rule] + " (ties: the smaller alpha)"


def run_sweep(trainer, theta_0: dict, alphas: list[float], rule: str, max_anchor_drop: float,
              target_metric: str = "recall@1", zero_shot=None) -> dict:
    """Evaluate each mix with `trainer.evaluate` (prefix `wise_ft_<alpha>`; the anchor callback adds the anchor's
    accuracy) and, when the target has class names, `zero_shot(model)` (its `zero_shot_*` metrics), then leave the
    chosen mix loaded in the trainer's model. Collective: every process calls it.
    Returns {"rows": [{alpha, target, anchor, metrics}], "chosen": index, "alpha": chosen alpha, "rule", ...}."""
    from ..cli.anchor import ANCHOR_TOP1

    model = trainer.accelerator.unwrap_model(trainer.model)
    theta_1 = weight_snapshot(model)
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate(theta_0, theta_1, alpha))
        prefix = f"wise_ft_{alpha:g}_"
        metrics = trainer.evaluate(metric_key_prefix=prefix[:-1])
        metrics = {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}
        if zero_shot is not None:
            metrics.update(zero_shot(model))
        rows.append({"alpha": alpha, "target": target_value(metrics, "", target_metric),
                     "anchor": metrics[ANCHOR_TOP1],
                     "metrics": {key: finite_or_none(value) if isinstance(value, float) else value
                                 for key, value in metrics.items()}})
    chosen = choose(rows, rule, max_anchor_drop)
    model.load_state_dict(interpolate(theta_0, theta_1, rows[chosen]["alpha"]))
    result = {"rows": rows, "chosen": chosen, "alpha": rows[chosen]["alpha"], "rule": rule,
              "max_anchor_drop": max_anchor_drop, "rule_text": rule_text(rule, max_anchor_drop, target_metric),
              "target_metric": TARGET_METRICS[target_metric], "target_metric_name": target_metric,
              "anchor_metric": "zero-shot top-1 on the anchor set"}
    trainer.log({"wise_ft_alpha": rows[chosen]["alpha"], "wise_ft_target": rows[chosen]["target"],
                 "wise_ft_anchor": rows[chosen]["anchor"]})
    return result


def save_sweep_curve(result: dict, path: str, anchor_name: str = "anchor") -> str | None:
    """PNG of the trade-off: anchor zero-shot top-1 (x) against the target metric (y), one point per mix, labelled
    by alpha, the chosen one ringed (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    anchor, target = [row["anchor"] for row in rows], [row["target"] for row in rows]
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    axis.plot(anchor, target, "o-", color="tab:blue")
    for row in rows:
        axis.annotate(f"α={row['alpha']:g}", (row["anchor"], row["target"]), textcoords="offset points",
                      xytext=(6, 4), fontsize=8)
    best = rows[result["chosen"]]
    axis.plot([best["anchor"]], [best["target"]], "o", markersize=14, markerfacecolor="none", color="tab:red",
              label=f"chosen: α={best['alpha']:g} ({result['rule']})")
    axis.set_xlabel(f"{anchor_name}: zero-shot top-1")
    axis.set_ylabel({"recall@1": "target: recall@1 (mean of both directions)",
                     "zero_shot_top1": "target: zero-shot top-1"}[result.get("target_metric_name", "recall@1")])
    axis.set_title("WiSE-FT: (1-α)·start + α·fine-tuned")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["TARGET_METRICS", "WISE_FT_RULES", "choose", "interpolate", "parse_alphas", "rule_alpha", "run_sweep",
           "save_sweep_curve", "sweep_alphas", "target_value", "weight_snapshot", "wise_ft_problems"]

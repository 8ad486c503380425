"""Model cards and Hub uploads.

`model.push_to_hub` writes a generic README over any card, so `push_to_hub` here saves the model,
processor and a card filled from `model_cards/model_card_template.md` (top level) into one folder and uploads it
as a single commit.
"""

import importlib.resources
import math
import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .training.finite import check_finite_weights

TEMPLATE_NAME = "model_card_template.md"


def _template_path():
    """model_cards/ sits at the repository's top level; a wheel installs it as the hf_siglip.model_cards package."""
    try:
        packaged = importlib.resources.files("hf_siglip.model_cards") / TEMPLATE_NAME
        if packaged.is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "model_cards" / TEMPLATE_NAME  # a source checkout


TEMPLATE_PATH = _template_path()
CARD_TAGS = ["siglip", "hf_siglip", "image-text", "zero-shot-image-classification"]
# what a card's usage snippet loads until the folder is pushed (`hf-siglip push` and `push_to_hub` fill in the id)
REPO_ID_PLACEHOLDER = "your-username/your-model"
_PLACEHOLDER_NOTE = re.compile(r"<!-- repo id note -->.*?<!-- /repo id note -->\n?", re.S)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(value) -> bool:
    """Whether `value` can name a Hub repository (`name` or `namespace/name`) and is not a local file or folder:
    card metadata holds Hub ids only (a local path is named in the card's text instead)."""
    if not isinstance(value, str) or not _HUB_ID.fullmatch(value) or ".." in value or value.endswith((".", "-")):
        return False
    return not os.path.exists(os.path.expanduser(value))


def _local_name(value: str) -> str:
    """A local dataset's name for the Hub's results table: its folder's name, never a path."""
    return os.path.basename(os.path.normpath(value)) or value


def _family(model) -> str:
    return {"clip": "CLIP", "siglip2": "SigLIP 2", "vision-text-dual-encoder": "Vision-text"}.get(
        model.config.model_type, "SigLIP")


def _saved_format(model) -> tuple[str, str, bool]:
    """(class, model type, whether plain transformers loads it) of what `model.save_pretrained` writes."""
    native_class = getattr(model, "native_class", None)  # hf_siglip.dual_encoders adapters save as the native class
    if native_class is not None:
        return native_class.__name__, model.config.model_type, True
    if model.config.native_compatible:  # a SiglipBottleneckModel that SiglipModel can hold
        return "SiglipModel", "siglip", True
    return type(model).__name__, model.config.model_type, False


def _tower_description(model) -> tuple[str, str]:
    text_config = model.config.text_config
    kind = (f"{text_config.model_type} text encoder ({model.config.text_pooling} pooling)"
            if hasattr(model.config, "text_pooling") else f"{_family(model)} text transformer")
    text = (
        f"{kind}, {text_config.num_hidden_layers} layers, width {text_config.hidden_size}, "
        f"vocabulary {text_config.vocab_size}"
    )
    if getattr(text_config, "bottleneck_dim", None) is not None:
        text += f", bottleneck token embeddings K={text_config.bottleneck_dim}"
    vision_config = model.config.vision_config
    vision = f"{vision_config.model_type}" + (
        f", {vision_config.num_hidden_layers} layers, width {vision_config.hidden_size}"
        if hasattr(vision_config, "num_hidden_layers") and hasattr(vision_config, "hidden_size")
        else ""
    )
    return text, vision


def _eval_table(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "No evaluation was recorded."
    from .evaluation import format_metrics

    return "```\n" + format_metrics(metrics) + "\n```"


def _key_value_table(values: dict | None, header: str) -> str:
    rows = "\n".join(f"| {key} | {value} |" for key, value in (values or {}).items() if value is not None)
    return f"| {header} | value |\n|---|---|\n{rows}" if rows else "Not recorded."


def _data_table(report: dict | None) -> str:
    """The data steps' counts (rows dropped or skipped, and why) as a table; nested reports are flattened."""
    rows = []

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}" if prefix else str(key), inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append(f"| {prefix} | {value:,} |" if isinstance(value, int) else f"| {prefix} | {value:.4g} |")

    walk("", report or {})
    if not rows:
        return "No row was dropped or skipped."
    return "| step / reason | count |\n|---|---|\n" + "\n".join(rows)


def _wise_ft_section(result: dict | None) -> str:
    """The card's WiSE-FT section: what was mixed, the rule, each mix's target and anchor metrics (the saved one
    marked), the curve and where the fine-tuned end point lives."""
    if not result:
        return ""
    rows = "\n".join(
        f"| {row['alpha']:g} | {row['target']:.4f} | {row['anchor']:.4f} |"
        + (" **saved here** |" if index == result["chosen"] else " |")
        for index, row in enumerate(result["rows"]))
    anchor = _local_name(str(result.get("anchor_dataset") or "the anchor set"))
    text = (f"### Fine-tuning that does not forget (WiSE-FT)\n\n"
            f"The weights in this folder mix the starting and the fine-tuned weights: (1 - α) start + α fine-tuned "
            f"with α = {result['alpha']:g} (Wortsman et al., 2022). Each mix was evaluated on the target's held-out "
            f"split ({result['target_metric']}) and zero-shot on {anchor} (top-1: what fine-tuning forgets). "
            f"Rule: {result['rule_text']}.")
    if result.get("finetuned"):
        text += f" The fine-tuned end point (α = 1) is in `{result['finetuned']}/`."
    text += f"\n\n| α | target {result['target_metric']} | {anchor} zero-shot top-1 | |\n|---|---|---|---|\n{rows}"
    if result.get("curve"):
        text += f"\n\n![WiSE-FT trade-off: target metric against anchor accuracy per mix]({result['curve']})"
    return text


# model-index: the metrics the Hub shows as results (recall@k both ways, zero-shot accuracy), with readable names
_INDEXED = {"i2t_recall@": ("image-text-retrieval", "recall", "image-to-text recall@{}"),
            "t2i_recall@": ("image-text-retrieval", "recall", "text-to-image recall@{}"),
            "zero_shot_top": ("zero-shot-image-classification", "accuracy", "zero-shot top-{} accuracy")}
# the captioner's scores (hf-siglip caption), by exact name
_INDEXED_EXACT = {"caption_bleu4": ("image-to-text", "bleu", "captioning BLEU-4"),
                  "caption_cider": ("image-to-text", "cider", "captioning CIDEr-D")}


def _eval_results(metrics: dict[str, float], eval_dataset: str) -> list[EvalResult]:
    eval_dataset = eval_dataset if is_hub_id(eval_dataset) or "/" not in eval_dataset else _local_name(eval_dataset)
    results = []
    for name, value in metrics.items():
        if name in _INDEXED_EXACT:
            task, metric, label = _INDEXED_EXACT[name]
            results.append(EvalResult(task_type=task, dataset_type=eval_dataset, dataset_name=eval_dataset,
                                      metric_type=metric, metric_name=label, metric_value=round(float(value), 4)))
        for prefix, (task, metric, label) in _INDEXED.items():
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                results.append(EvalResult(task_type=task, dataset_type=eval_dataset, dataset_name=eval_dataset,
                                          metric_type=metric, metric_name=label.format(name[len(prefix):]),
                                          metric_value=round(float(value), 4)))
    return results


def framework_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("hf_siglip", "transformers", "torch", "datasets", "accelerate", "tokenizers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def build_model_card(
    model,
    repo_id: str | None = None,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | str | None = None,
    license: str = "apache-2.0",
    metrics: dict[str, float] | None = None,
    eval_dataset: str | None = None,
    evaluation_protocol: str | None = None,
    recipe: str | None = None,
    training_data: str | None = None,
    training_curve: str | None = None,
    hyperparameters: dict | None = None,
    hardware: str | None = None,
    intended_use: str | None = None,
    limitations: str = "",
    data_report: dict | None = None,
    wise_ft: dict | None = None,
    captioner: str | None = None,
) -> ModelCard:
    """Fill the package's model card template for `model` (a `SiglipBottleneckModel` or a `hf_siglip.dual_encoders`
    adapter of SiglipModel / Siglip2Model / CLIPModel).

    `repo_id` is the Hub repository the card's usage snippet loads: the one pushed to, when known; else the snippet
    says `your-username/your-model` and the card explains it. `model_name` is the title (default: the repo's name).
    Metadata holds Hub ids only: a `base_model` or dataset that is a local path is named in the text, not in it.
    `metrics` (name -> value) become the evaluation table and, with `eval_dataset` named, the `model-index`
    results the Hub displays (recall@k both ways, zero-shot accuracy). `evaluation_protocol` says how they were
    measured; `hyperparameters` and `hardware` describe the run; `intended_use` replaces the default statement (the
    demo's toy notice); `training_curve` is a path relative to the repo root; `data_report` holds the data steps'
    counts (rows dropped or skipped, per reason); `wise_ft` is a WiSE-FT sweep (`hf_siglip.training.wise_ft.run_sweep`
    plus `curve`, `finetuned`, `anchor_dataset`), shown as a table of the mixes and the trade-off curve; `captioner`
    the subfolder holding a captioner (`hf_siglip.captioner`), whose use the card shows. Framework
    versions are read from the installed packages.
    """
    datasets = [datasets] if isinstance(datasets, str) else datasets
    pushed = is_hub_id(repo_id) and "/" in repo_id
    repo_id = repo_id if pushed else REPO_ID_PLACEHOLDER
    model_name = model_name or repo_id.split("/")[-1]
    eval_results = _eval_results(metrics, eval_dataset) if metrics and eval_dataset else None
    card_data = ModelCardData(
        base_model=base_model if is_hub_id(base_model) else None,
        datasets=[name for name in datasets if is_hub_id(name)] or None if datasets else None,
        license=license,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=list(CARD_TAGS),
        metrics=sorted({result.metric_type for result in eval_results}) if eval_results else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    text_tower, vision_tower = _tower_description(model)
    image_size = getattr(model.config.vision_config, "image_size", 224)
    architecture, model_type, native_compatible = _saved_format(model)
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        pushed=pushed,
        repo_id_placeholder=REPO_ID_PLACEHOLDER,
        model_summary="A SigLIP-style image-text dual encoder.",
        text_tower=text_tower,
        vision_tower=vision_tower,
        num_parameters=f"{model.num_parameters():,}",
        temperature=f"{math.exp(model.logit_scale.item()):.4g}",
        bias=f"{model.logit_bias.item():.4g}",
        base_model=base_model,
        base_model_is_local=base_model is not None and not is_hub_id(base_model),
        training_data=training_data or (", ".join(datasets) if datasets else "not recorded"),
        recipe=recipe or "not recorded",
        training_curve=training_curve,
        hyperparameter_table=_key_value_table(hyperparameters, "hyperparameter"),
        hardware=hardware or "not recorded",
        versions_table=_key_value_table(framework_versions(), "package"),
        eval_table=_eval_table(metrics),
        evaluation_protocol=evaluation_protocol or "",
        data_table=_data_table(data_report),
        wise_ft_section=_wise_ft_section(wise_ft),
        captioner=captioner,
        intended_use=intended_use or ("Image-text retrieval and zero-shot image classification, and a starting point "
                                      "for fine-tuning on similar data."),
        limitations=limitations,
        image_size=image_size,
        native_compatible=native_compatible,
        architecture=architecture,
        model_type=model_type,
        family=_family(model),
        bias_in_config=getattr(model, "bias_in_config", False),
        text_pooling=getattr(model.config, "text_pooling", None),  # a VisionTextDualEncoder's (dual_encoders.py)
    )


def usage_code(card_text: str, load_from: str | os.PathLike | None = None) -> str:
    """The card's first Python code block (what a reader copies); with `load_from`, loading from there (a local
    folder) instead of the repository it names."""
    start = card_text.index("```python\n") + len("```python\n")
    code = card_text[start:card_text.index("```", start)]
    if load_from is not None:
        code = re.sub(r'from_pretrained\("[^"]*"', lambda _: f"from_pretrained({str(load_from)!r}", code)
    return code


def card_for_repo(folder: str | os.PathLike, repo_id: str, *, base_model: str | None = None,
                  datasets: list[str] | str | None = None, license: str | None = None) -> ModelCard | None:
    """The card `hf-siglip train` saved in `folder` (README.md), made ready for `repo_id`: its usage snippet loads
    `repo_id`, the note about the placeholder is gone, and `base_model` / `datasets` / `license` given here join
    the metadata (Hub ids only). None when the folder has no card of ours (`push_to_hub` then builds one)."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    if "hf_siglip" not in (card.data.tags or []):
        return None
    text = _PLACEHOLDER_NOTE.sub("", str(card)).replace(f'"{REPO_ID_PLACEHOLDER}"', f'"{repo_id}"')
    card = ModelCard(text)
    if base_model is not None:
        card.data.base_model = base_model if is_hub_id(base_model) else None
    for name in [datasets] if isinstance(datasets, str) else datasets or []:
        if is_hub_id(name) and name not in (card.data.datasets or []):
            card.data.datasets = [*(card.data.datasets or []), name]
    if license is not None:
        card.data.license = license
    return card


def save_for_hub(model, folder: str | os.PathLike, processor=None, card: ModelCard | None = None, **card_kwargs):
    """Write weights (safetensors), config, remote code, processor files and README.md into `folder`."""
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    (card or build_model_card(model, **card_kwargs)).save(os.path.join(folder, "README.md"))


class HubAccessError(RuntimeError):
    """Pushing cannot work (offline, not logged in, no connection): said in one line, before any work."""


def check_hub_access(token: str | None = None) -> None:
    """Raise `HubAccessError` with one line saying what to do when a push cannot succeed: offline mode, no token,
    no connection to the Hub, or a rejected token. One `whoami` request; nothing is uploaded."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():
        raise HubAccessError("cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1). Unset it on a connected "
                             "machine, or push the saved folder later with `hf-siglip push FOLDER REPO_ID`.")
    token = token or get_token()
    if not token:
        raise HubAccessError("cannot push to the Hub: not logged in. Run `hf auth login` or set HF_TOKEN, then retry.")
    try:
        HfApi(token=token).whoami()
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        raise HubAccessError(f"cannot push to the Hub: the token was refused (HTTP {status}). Log in again with "
                             "`hf auth login` or set a valid HF_TOKEN.") from None
    except Exception as error:  # httpx / socket errors: no route to the Hub endpoint
        raise HubAccessError(f"cannot push to the Hub: no connection to {constants.ENDPOINT} "
                             f"({type(error).__name__}). Check the network, or push the saved folder later with "
                             "`hf-siglip push FOLDER REPO_ID`.") from None


def push_to_hub(
    model,
    repo_id: str,
    processor=None,
    card: ModelCard | None = None,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload SigLIP model with hf_siglip",
    from_folder: str | os.PathLike | None = None,
    **card_kwargs,
):
    """Upload model, processor and model card to `repo_id` in one commit; returns the commit info.

    `card_kwargs` go to `build_model_card` when no `card` is given (e.g. `base_model`, `metrics`); with
    `from_folder` (a folder `hf-siglip train` wrote), its saved card is uploaded instead, its usage snippet loading
    `repo_id` and `base_model` / `datasets` / `license` from `card_kwargs` added to its metadata. Raises
    `HubAccessError` (one line) before anything is written when the Hub cannot be reached or no token is set, and
    `hf_siglip.training.finite.NonFiniteError` when the model's weights hold NaN or infinity.
    """
    check_hub_access(token)
    check_finite_weights(model, consequence="not pushed")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    full_id = getattr(url, "repo_id", None)  # `name` alone is created under the token's user: the card needs both
    repo_id = full_id if isinstance(full_id, str) else repo_id
    if card is None and from_folder is not None:
        card = card_for_repo(from_folder, repo_id, **{key: value for key, value in card_kwargs.items()
                                                     if key in ("base_model", "datasets", "license")})
    with tempfile.TemporaryDirectory() as folder:
        save_for_hub(model, folder, processor, card, repo_id=repo_id, **card_kwargs)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)


__all__ = ["REPO_ID_PLACEHOLDER", "HubAccessError", "build_model_card", "card_for_repo", "check_hub_access",
           "framework_versions", "is_hub_id", "push_to_hub", "save_for_hub", "usage_code"]

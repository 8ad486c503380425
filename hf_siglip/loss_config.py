"""`SiglipLossConfig`: the settings of `hf_siglip.sigmoid_loss`, typed, documented and checked when built.

A recipe sets them under `loss_config:`, a flag as JSON (`--loss_config '{"normalize": "row"}'`), Python code with
`SiglipLossConfig(...)` or keyword arguments of `sigmoid_loss`. Every process must use the same settings (the loss
checks). Imports nothing outside the standard library (copied beside the modeling file for `trust_remote_code`).
"""

import dataclasses
import json
import zlib
from dataclasses import dataclass, field

LOSS_TYPES = ("sigmoid", "softmax")
NORMALIZATIONS = ("image", "text", "row")
NEGATIVE_SELECTIONS = ("random", "hard", "easy")
MINING_EMBEDDINGS = ("model", "teacher")
MINED_PAIRS = ("positive", "ignore")
DEFAULT_TILE = 1024

# Settings of earlier releases: a recipe or call using one is told what replaced it.
_RENAMED = {
    "hard_negative_beta": "sigmoid_hard_negative_beta (the sigmoid adaptation it was) or, with loss_type: softmax, "
                          "hn_nce_beta (DiHT's HN-NCE as published)",
    "teacher": "the `teacher` argument of sigmoid_loss (embeddings are inputs, not settings)",
    "positive_targets": "the `positive_targets` argument of sigmoid_loss (a tensor input, not a setting)",
}


@dataclass
class SiglipLossConfig:
    """Settings of the SigLIP loss (decisions 2 and 8 in docs/ARCHITECTURE.md). Defaults give the paper's plain
    sigmoid loss."""

    loss_type: str = field(default="sigmoid", metadata={"help": (
        "'sigmoid' (SigLIP) or 'softmax': symmetric InfoNCE through the same ids (for comparison), which with "
        "hn_nce_alpha / hn_nce_beta becomes DiHT's HN-NCE. The softmax ignores logit_bias.")})
    normalize: str = field(default="image", metadata={"help": (
        "Sigmoid loss divisor: 'image' (the global image count, the paper's form), 'text' (the global text count) "
        "or 'row' (also each image row by its positive count: several positives weigh as one).")})
    negative_ratio: float | None = field(default=None, metadata={"help": (
        "SigLIP section 4.8: keep floor(ratio * positives) negatives per image row, mask out the rest (None: all).")})
    negative_selection: str = field(default="random", metadata={"help": (
        "Which negatives negative_ratio keeps: 'random' (a hash of the global indices and seed), 'hard' (highest "
        "logits) or 'easy' (lowest).")})
    match_pairs_seen: bool = field(default=False, metadata={"help": (
        "SigLIP section 4.8 'hard, matching total pairs seen': with negative_ratio, train longer (max_steps or "
        "num_train_epochs times images per step / (1 + negative_ratio), set once when the training arguments are "
        "built) so the run sees as many pairs as it would without masking.")})
    seed: int = field(default=0, metadata={"help": "Seed of the random negative mask."})
    mine_image_text: float | None = field(default=None, metadata={"help": (
        "FFF positive mining: (i, j) is also positive if cos(x_i, y_j) >= this (None: off).")})
    mine_image_image: float | None = field(default=None, metadata={"help": (
        "FFF positive mining: image i also matches the texts of images i' with cos(x_i, x_i') >= this.")})
    mine_text_text: float | None = field(default=None, metadata={"help": (
        "FFF positive mining: text j also matches the images of texts j' with cos(y_j', y_j) >= this.")})
    mine_with: str = field(default="model", metadata={"help": (
        "Whose embeddings the mining rules compare: 'model' (the ones being trained) or 'teacher' (the momentum "
        "teacher's: SiglipTrainer with teacher_momentum, sigmoid_loss's `teacher` argument). Mining with the "
        "model's own similarities feeds back (mined pairs are pulled together, so more pairs cross the threshold); "
        "a slowly moving teacher damps that loop.")})
    mined_pairs: str = field(default="positive", metadata={"help": (
        "What a pair that only mining found becomes: 'positive' (FFF: pulled together) or 'ignore' (left out of the "
        "loss, neither pulled together nor pushed apart: false-negative elimination, Huynh et al. 2022). A wrong "
        "mined pair then costs one negative instead of teaching a false positive. Sigmoid loss only.")})
    mining_start_step: int = field(default=0, metadata={"help": (
        "SiglipTrainer turns the mining rules on at this optimizer step (the loss function itself does not count "
        "steps). From a random init every cosine is near 1, so mining from step 0 makes every pair a positive.")})
    sigmoid_hard_negative_beta: float | None = field(default=None, metadata={"help": (
        "Sigmoid adaptation of HN-NCE: each image row's negatives weigh n_neg * softmax(beta * cos) over that "
        "row's negatives (mean 1), positives 1. beta scales the cosine x.y of the unit embeddings, not the logit "
        "t x.y + b (an hn_nce_beta of B weighs negatives as a sigmoid_hard_negative_beta of B * t would at "
        "temperature t); the weights are constants (no gradient flows through them). None: off.")})
    hn_nce_alpha: float = field(default=1.0, metadata={"help": (
        "HN-NCE (DiHT, loss_type softmax): weight of the positives in the softmax denominator.")})
    hn_nce_beta: float = field(default=0.0, metadata={"help": (
        "HN-NCE (DiHT, loss_type softmax): negatives weighted by n_negatives * softmax(beta * logit) over the "
        "row's (or column's) negatives. beta scales the logit t x.y (the softmax has no bias), not the cosine as "
        "sigmoid_hard_negative_beta does; the weights are part of the differentiated loss. alpha = 1, beta = 0 is "
        "InfoNCE.")})
    teacher_weight: float = field(default=0.4, metadata={"help": (
        "Momentum distillation (ALBEF): weight of the teacher's probabilities in the targets, when a teacher is "
        "given.")})
    tile_size: int = field(default=DEFAULT_TILE, metadata={"help": (
        "Side of the logit tiles held at once; changes memory, not the result.")})

    def __post_init__(self):
        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"loss_config.{name} must be one of {allowed}, got {getattr(self, name)!r}")

        choice("loss_type", LOSS_TYPES)
        choice("normalize", NORMALIZATIONS)
        choice("negative_selection", NEGATIVE_SELECTIONS)
        choice("mine_with", MINING_EMBEDDINGS)
        choice("mined_pairs", MINED_PAIRS)
        if not (isinstance(self.tile_size, int) and self.tile_size > 0):
            raise ValueError(f"loss_config.tile_size must be a positive int, got {self.tile_size!r}")
        if self.negative_ratio is not None and not self.negative_ratio > 0:
            raise ValueError(f"loss_config.negative_ratio (kept negatives per positive) must be > 0, "
                             f"got {self.negative_ratio!r}")
        for name in ("mine_image_text", "mine_image_image", "mine_text_text"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= float(value) <= 1.0:
                raise ValueError(f"loss_config.{name} is a cosine threshold in [-1, 1] or None, got {value!r}")
        if not (isinstance(self.mining_start_step, int) and self.mining_start_step >= 0):
            raise ValueError(f"loss_config.mining_start_step must be an int >= 0, got {self.mining_start_step!r}")
        if not 0.0 <= float(self.teacher_weight) <= 1.0:
            raise ValueError(f"loss_config.teacher_weight must be in [0, 1], got {self.teacher_weight!r}")
        if not float(self.hn_nce_alpha) >= 0.0:
            raise ValueError(f"loss_config.hn_nce_alpha must be >= 0, got {self.hn_nce_alpha!r}")
        if self.match_pairs_seen and self.negative_ratio is None:
            raise ValueError("loss_config.match_pairs_seen needs negative_ratio (without masking every pair is seen)")
        sigmoid_only = {"negative_ratio": None, "sigmoid_hard_negative_beta": None, "normalize": "image",
                        "mined_pairs": "positive"}
        softmax_only = {"hn_nce_alpha": 1.0, "hn_nce_beta": 0.0}
        wrong = softmax_only if self.loss_type == "sigmoid" else sigmoid_only
        changed = [name for name, default in wrong.items() if getattr(self, name) != default]
        if changed:
            raise ValueError(f"loss_config: {changed} do not apply to loss_type={self.loss_type!r}")

    @classmethod
    def from_value(cls, value, where="loss_config"):
        """A config from itself, None (defaults), a mapping, or JSON text; an unknown key is named."""
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() not in ("", "None") else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error}): {value!r}") from None
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a mapping of loss settings, got {value!r}")
        cls.check_names(value, where)
        return cls(**value)

    @classmethod
    def check_names(cls, names, where="loss_config"):
        """Raise for a setting that was renamed (ValueError naming its successor) or never existed (TypeError)."""
        known = [f.name for f in dataclasses.fields(cls)]
        for name in names:
            if name in _RENAMED:
                raise ValueError(f"{where}: {name!r} is gone; use {_RENAMED[name]}")
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise TypeError(f"{where}: unknown setting(s) {unknown}; known: {', '.join(known)}")

    def pairs_seen_factor(self, images_per_step: int) -> float:
        """How much longer a run with negative masking trains under match_pairs_seen (1 otherwise): a row keeps its
        P positives and floor(ratio * P) negatives instead of every text (k * images_per_step with k captions per
        image, P = k), so masking sees (1 + ratio) / images_per_step of the pairs per step."""
        if not self.match_pairs_seen:
            return 1.0
        return max(1.0, images_per_step / (1.0 + self.negative_ratio))

    def at_step(self, step: int) -> "SiglipLossConfig":
        """The settings that hold at optimizer step `step`: mining stays off before mining_start_step."""
        if step >= self.mining_start_step or not self.mining:
            return self
        return dataclasses.replace(self, **{name: None for name in self.mining})

    def for_evaluation(self) -> "SiglipLossConfig":
        """The loss's form on the true pairs only, for evaluation: no mining, no negative masking."""
        return dataclasses.replace(self, negative_ratio=None, match_pairs_seen=False,
                                   **{name: None for name in self.mining})

    @property
    def ignores_mined_pairs(self) -> bool:
        """Mining is on and what it finds leaves the loss instead of becoming positive."""
        return bool(self.mining) and self.mined_pairs == "ignore"

    @property
    def mining(self) -> dict:
        """The positive-mining thresholds that are on, by name (keyword arguments of `positive_pairs`)."""
        return {name: getattr(self, name) for name in ("mine_image_text", "mine_image_image", "mine_text_text")
                if getattr(self, name) is not None}

    def changed(self) -> dict:
        """The settings that differ from the defaults, with tile_size (which never changes the result) left out."""
        defaults = SiglipLossConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "tile_size" and getattr(self, f.name) != getattr(defaults, f.name)}

    def fingerprint(self) -> int:
        """A process-independent hash of the settings that change the math (tile_size does not)."""
        return zlib.crc32(repr(sorted(self.changed().items())).encode())


__all__ = ["LOSS_TYPES", "MINED_PAIRS", "MINING_EMBEDDINGS", "NEGATIVE_SELECTIONS", "NORMALIZATIONS",
           "SiglipLossConfig"]

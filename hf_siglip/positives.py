"""Which image-text pairs are positives: the one rule the loss, the trainer's metrics and evaluation share.

Image i and text j are a positive pair iff their ids are equal (decision 1 in docs/ARCHITECTURE.md), or FFF's in-batch
mining
(Bulat et al. 2024, section 3.1) adds them, each rule with its cosine-similarity threshold (None = off):

- image-text: cos(x_i, y_j) >= mine_image_text;
- image-image: some image i' carrying j's id has cos(x_i, x_i') >= mine_image_image;
- text-text: some text j' carrying i's id has cos(y_j', y_j) >= mine_text_text.

`positive_pairs` applies the rule to a whole batch. The ring loss applies it block by block with the same
pieces: `similar_pairs` finds similar rows in one tile, `id_pairs` turns ids and mined (row, id) or (id, column)
lists into (image, text) index pairs, `pairs_in_tile` and `tile_mask` make one tile's positives.

Imports torch only (copied beside the modeling file for `trust_remote_code` loading).
"""

import torch

MINING_RULES = ("mine_image_text", "mine_image_image", "mine_text_text")


def matching_pairs(row_ids, col_ids):
    """All (row, col) index pairs with row_ids[row] == col_ids[col], in O((n + m) log m + pairs)."""
    row_ids = row_ids.contiguous()
    sorted_ids, order = torch.sort(col_ids)
    start = torch.searchsorted(sorted_ids, row_ids, right=False)
    counts = torch.searchsorted(sorted_ids, row_ids, right=True) - start
    rows = torch.repeat_interleave(torch.arange(row_ids.shape[0], device=row_ids.device), counts)
    first = torch.cumsum(counts, 0) - counts  # where each row's run begins in the pair list
    rank_in_run = torch.arange(rows.shape[0], device=row_ids.device) - first[rows]
    return rows, order[start[rows] + rank_in_run]


def similar_pairs(a, b, threshold):
    """(index in a, index in b) of every pair of rows with cosine similarity >= threshold."""
    hit = ((a @ b.T) >= threshold).nonzero()
    return hit[:, 0], hit[:, 1]


def id_pairs(image_ids, text_ids, image_mined=None, text_mined=None, text_offset=0):
    """(image, text) index pairs whose ids match, plus mined ones, without repeats.

    image_mined: (image index, id) pairs: the image also matches every text carrying that id (image-image rule).
    text_mined: (id, global text index) pairs: every image carrying that id also matches that text (text-text
    rule); texts outside [text_offset, text_offset + len(text_ids)) are ignored.
    """
    rows, cols = matching_pairs(image_ids, text_ids)
    if image_mined is None and text_mined is None:
        return rows, cols
    rows, cols = [rows], [cols]
    if image_mined is not None:
        mined_rows, mined_ids = image_mined
        pair, col = matching_pairs(mined_ids, text_ids)
        rows.append(mined_rows[pair])
        cols.append(col)
    if text_mined is not None:
        mined_ids, mined_cols = text_mined
        inside = (mined_cols >= text_offset) & (mined_cols < text_offset + text_ids.shape[0])
        row, pair = matching_pairs(image_ids, mined_ids[inside])
        rows.append(row)
        cols.append(mined_cols[inside][pair] - text_offset)
    n_cols = max(text_ids.shape[0], 1)
    key = torch.unique(torch.cat(rows) * n_cols + torch.cat(cols))
    return key // n_cols, key % n_cols


def pairs_in_tile(rows, cols, pairs):
    """The pairs (of a whole block) that fall in the tile `rows` x `cols` (slices), as tile-local indices."""
    pair_rows, pair_cols = pairs
    inside = ((pair_rows >= rows.start) & (pair_rows < rows.stop)
              & (pair_cols >= cols.start) & (pair_cols < cols.stop))
    return pair_rows[inside] - rows.start, pair_cols[inside] - cols.start


def tile_mask(shape, local_pairs, cosine=None, mine_image_text=None):
    """Dense positive mask of one tile from its index pairs, plus image-text mining on its cosines."""
    mask = torch.zeros(shape, dtype=torch.bool, device=local_pairs[0].device)
    mask[local_pairs] = True
    if mine_image_text is not None:
        mask |= cosine >= mine_image_text
    return mask


def positive_pairs(image_ids, text_ids, image_embeds=None, text_embeds=None, *, mine_image_text=None,
                   mine_image_image=None, mine_text_text=None):
    """The (n_images, n_texts) boolean mask of positive pairs of one batch (see the module docstring).

    Embeddings (L2-normalised) are needed only for the mining rules that are on; the ids are integers, one per row.
    """
    thresholds = {"mine_image_text": mine_image_text, "mine_image_image": mine_image_image,
                  "mine_text_text": mine_text_text}
    needs = {"mine_image_text": (image_embeds, text_embeds), "mine_image_image": (image_embeds,),
             "mine_text_text": (text_embeds,)}
    for rule, threshold in thresholds.items():
        if threshold is not None and any(embeds is None for embeds in needs[rule]):
            raise ValueError(f"{rule} mines with embeddings: pass image_embeds / text_embeds")
    image_ids, text_ids = image_ids.long(), text_ids.long()
    image_mined = text_mined = None
    if mine_image_image is not None:
        image_row, other_image = similar_pairs(image_embeds, image_embeds, mine_image_image)
        image_mined = (image_row, image_ids[other_image])
    if mine_text_text is not None:
        text_col, other_text = similar_pairs(text_embeds, text_embeds, mine_text_text)
        text_mined = (text_ids[other_text], text_col)
    pairs = id_pairs(image_ids, text_ids, image_mined, text_mined)
    cosine = image_embeds @ text_embeds.T if mine_image_text is not None else None
    return tile_mask((image_ids.shape[0], text_ids.shape[0]), pairs, cosine, mine_image_text)


__all__ = ["MINING_RULES", "id_pairs", "matching_pairs", "pairs_in_tile", "positive_pairs", "similar_pairs",
           "tile_mask"]

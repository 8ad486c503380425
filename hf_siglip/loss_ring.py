"""The ring engine behind `hf_siglip.loss.sigmoid_loss`: process-group plumbing (group resolution,
neighbour shifts of tensor lists, small gathers), index helpers, and `Engine`, which runs the tiled
passes round the ring inside one autograd Function.

Imports torch only (copied beside the modeling file for `trust_remote_code` loading).
"""

import torch
import torch.nn.functional as F
import torch.distributed as dist


class RingContext:
    """Where this process sits in the ring: rank/world in `group` and its two neighbours (global ranks)."""

    def __init__(self, group=None):
        initialised = dist.is_available() and dist.is_initialized()
        if group is not None and not initialised:
            raise ValueError("sigmoid_loss: a process group was given but torch.distributed is not initialised")
        if not initialised:
            self.group, self.rank, self.world = None, 0, 1
            return
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("sigmoid_loss: this process is not a member of the given process group")
        self.right = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.left = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def all_gather_ints(self, values, device):
        """Gather one short list of ints from every process: returns a world x len(values) int64 tensor."""
        local = torch.tensor(values, dtype=torch.int64, device=device)
        if self.world == 1:
            return local[None]
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        return torch.stack(out)

    def all_gather_padded(self, tensor, sizes):
        """Gather a 1-d tensor whose length differs by process (`sizes`), concatenated in rank order."""
        if self.world == 1:
            return tensor
        longest = max(sizes)
        padded = tensor.new_zeros(longest)
        padded[: tensor.shape[0]] = tensor
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return torch.cat([part[:size] for part, size in zip(out, sizes)])

    def start_shift(self, tensors, recv_like):
        """Send `tensors` to the right neighbour and receive tensors shaped like `recv_like` (a list of
        (shape, dtype)) from the left one. Returns (received tensors, a wait() callable)."""
        device = tensors[0].device
        received = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in recv_like]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.right, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.left, self.group) for r in received]
        requests = dist.batch_isend_irecv(ops)

        def wait():
            # `ops` holds the (possibly contiguous-copied) send buffers alive until the sends complete
            for request in requests:
                request.wait()
            ops.clear()

        return received, wait


# ----------------------------------------------------------------------------------------------------
# Index helpers
# ----------------------------------------------------------------------------------------------------


def uniform_hash(row_index, col_index, seed):
    """Deterministic pseudo-uniform numbers in [0, 1) for every (row, col) pair of global indices, so
    the ring and the dense reference draw the same random negative mask whatever the layout."""
    salt = ((seed & 0xFFFFFFFF) * 0xC2B2AE3D + 0x165667B1) & 0xFFFFFFFF  # stays inside int64 below
    h = row_index[:, None] * 0x9E3779B1 + col_index[None, :] * 0x85EBCA77 + salt
    h = h & 0xFFFFFFFF
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
    h = ((h ^ (h >> 12)) * 0x297A2D39) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    return h.to(torch.float64) / 4294967296.0


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


def row_positive_counts(image_ids, all_text_ids):
    """How many texts (of the whole batch) carry each image's id."""
    sorted_ids, image_ids = torch.sort(all_text_ids).values, image_ids.contiguous()
    return (torch.searchsorted(sorted_ids, image_ids, right=True)
            - torch.searchsorted(sorted_ids, image_ids, right=False))


def _unique_pairs(rows, cols, n_cols):
    key = torch.unique(rows * n_cols + cols)
    return key // n_cols, key % n_cols


# ----------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------


class _RingLoss(torch.autograd.Function):
    """Forward computes the loss and all its gradients in one ring; backward only scales them."""

    @staticmethod
    def forward(fn_ctx, image_embeds, text_embeds, logit_scale, logit_bias, engine):
        loss, grads = engine.run(image_embeds, text_embeds, logit_scale, logit_bias)
        fn_ctx.save_for_backward(*grads)
        fn_ctx.dtypes = (image_embeds.dtype, text_embeds.dtype, logit_scale.dtype, logit_bias.dtype)
        fn_ctx.shapes = (logit_scale.shape, logit_bias.shape)
        return loss

    @staticmethod
    def backward(fn_ctx, grad_output):
        gx, gy, gt, gb = fn_ctx.saved_tensors
        dx, dy, dt, db = fn_ctx.dtypes
        go = grad_output.float()
        return ((gx * go).to(dx), (gy * go).to(dy), (gt * go).reshape(fn_ctx.shapes[0]).to(dt),
                (gb * go).reshape(fn_ctx.shapes[1]).to(db), None)


class Engine:
    """One call of the loss: the ring, sizes, ids and options; `apply` runs it under autograd.

    Passes round the ring (each visits every text block once):
      - mining pre-passes (image-image: images travel; text-text: texts travel) that list mined pairs
        sparsely, only when those thresholds are set;
      - a statistics pass (row positive counts under mining, hard-negative normalisers, softmax
        log-sum-exps; column statistics ride home with their block), only when options need one;
      - a selection pass (running top-k of negative logits per row) for hard/easy negative masking;
      - the main pass: loss and closed-form gradients, text gradients riding home with their block.
    Beyond O((n_images + n_texts) * d + tile^2), options hold: hard/easy masking a running top-k of
    n_images x (ratio * most positives of a row) logits; image-image/text-text mining the list of
    mined pairs (text-text mining gathers it from every process).
    """

    def __init__(self, ring, opts, image_sizes, text_sizes, image_ids, text_ids):
        self.ring, self.opts = ring, opts
        self.image_sizes, self.text_sizes = image_sizes, text_sizes
        self.image_offsets = [sum(image_sizes[:r]) for r in range(ring.world)]
        self.text_offsets = [sum(text_sizes[:r]) for r in range(ring.world)]
        self.n_images, self.n_texts = sum(image_sizes), sum(text_sizes)
        self.image_ids, self.text_ids = image_ids, text_ids

    def apply(self, image_embeds, text_embeds, logit_scale, logit_bias):
        inputs = (image_embeds, text_embeds, logit_scale, logit_bias)
        # without gradients (evaluation) only the logits product runs: a third of the work
        self.needs_grads = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        return _RingLoss.apply(*inputs, self)

    # plumbing ----------------------------------------------------------------------------------------
    def ring_pass(self, block, travel, visit, sizes=None):
        """Carry `block` (tensors with one row per item of its home process; `sizes` per process,
        default the text counts) round the ring, calling visit(src_rank, block, travel) at each stop;
        the `travel` accumulators ride along with their block and are returned once home."""
        ring, sizes = self.ring, sizes or self.text_sizes
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            n_next = sizes[(src - 1) % ring.world]
            if step < ring.world - 1:  # prefetch the next block while this one is computed
                next_block, wait_block = ring.start_shift(
                    block, [((n_next,) + tuple(t.shape[1:]), t.dtype) for t in block])
            visit(src, block, travel)
            if ring.world > 1 and travel:
                travel, wait_travel = ring.start_shift(
                    travel, [((n_next,) + tuple(t.shape[1:]), t.dtype) for t in travel])
                wait_travel()
            if step < ring.world - 1:
                wait_block()
                block = next_block
        return travel

    def tiles(self, n_rows, n_cols):
        size = self.opts.tile_size
        for c0 in range(0, n_cols, size):
            for r0 in range(0, n_rows, size):
                yield slice(r0, min(r0 + size, n_rows)), slice(c0, min(c0 + size, n_cols))

    # forward -----------------------------------------------------------------------------------------
    def run(self, image_embeds, text_embeds, logit_scale, logit_bias):
        opts = self.opts
        with torch.autocast(device_type=image_embeds.device.type, enabled=False):
            self.x = image_embeds.detach().float()
            self.y = text_embeds.detach().float()
            self.t = logit_scale.detach().float().reshape(())
            self.b = logit_bias.detach().float().reshape(())
            if opts.loss_type == "softmax":
                self.b = torch.zeros_like(self.b)  # a bias cancels in a softmax
            self.x_scaled = self.x * self.t
            self.targets = (None if opts.positive_targets is None
                            else opts.positive_targets.detach().to(self.x.device, torch.float32))
            self.teacher = None
            if opts.teacher is not None:  # scaled teacher images, teacher texts (they travel), bias
                t_images, t_texts, t_scale, t_bias = [v.detach().to(self.x.device, torch.float32)
                                                      for v in opts.teacher]
                self.teacher = (t_images * t_scale.reshape(()), t_texts, t_bias.reshape(()))
            self.mine_pairs()
            self.needs_cosine = (opts.mine_image_text is not None or opts.hard_negative_beta is not None)
            self.general = (opts.normalize == "row" or self.targets is not None or self.teacher is not None
                            or opts.negative_ratio is not None
                            or opts.hard_negative_beta is not None or opts.mine_image_text is not None
                            or opts.loss_type == "softmax")
            self.statistics()
            if opts.negative_ratio is not None and opts.negative_selection != "random":
                self.selection_thresholds()
            return self.main_pass()

    def block_of(self, y):
        block = [y, self.text_ids]
        if self.targets is not None:
            block.append(self.targets)
        if self.teacher is not None:
            block.append(self.teacher[1])
        return block

    # positives ---------------------------------------------------------------------------------------
    def mine_pairs(self):
        """Sparse lists of pairs mined through image-image and text-text similarity."""
        opts, device = self.opts, self.x.device
        self.image_mined = self.text_mined = None
        if opts.mine_image_image is not None:
            # image i meets every text carrying the id of an image i' with cos(x_i, x_i') >= threshold
            found = []

            def visit(src, block, travel):
                x_block, ids_block = block
                for rows, cols in self.tiles(self.x.shape[0], x_block.shape[0]):
                    hit = ((self.x[rows] @ x_block[cols].T) >= opts.mine_image_image).nonzero()
                    found.append((hit[:, 0] + rows.start, ids_block[cols][hit[:, 1]]))

            self.ring_pass([self.x, self.image_ids], [], visit, sizes=self.image_sizes)
            rows = torch.cat([f[0] for f in found])
            ids = torch.cat([f[1] for f in found])
            pairs = torch.unique(torch.stack([rows, ids], 1), dim=0)
            self.image_mined = (pairs[:, 0], pairs[:, 1])
        if opts.mine_text_text is not None:
            # image i meets text j when j resembles a text carrying i's id: list (id of j', global j)
            found = []

            def visit(src, block, travel):
                (y_block,) = block
                for rows, cols in self.tiles(self.y.shape[0], y_block.shape[0]):
                    hit = ((self.y[rows] @ y_block[cols].T) >= opts.mine_text_text).nonzero()
                    found.append(torch.stack([self.text_ids[rows][hit[:, 0]],
                                              hit[:, 1] + cols.start + self.text_offsets[src]], 1))

            self.ring_pass([self.y], [], visit)
            local = torch.unique(torch.cat(found), dim=0)
            counts = self.ring.all_gather_ints([local.shape[0]], device)[:, 0].tolist()
            every = torch.stack([self.ring.all_gather_padded(local[:, k].contiguous(), counts)
                                 for k in range(2)], 1)
            image_rows, pair_index = matching_pairs(self.image_ids, every[:, 0])
            self.text_mined = (image_rows, every[pair_index, 1])

    def block_pairs(self, src, ids_block):
        """(row, col) of every positive pair between the local images and text block `src`, except
        those found by image-text similarity (a tile-local test)."""
        n_block = ids_block.shape[0]
        rows, cols = matching_pairs(self.image_ids, ids_block)
        if self.image_mined is None and self.text_mined is None:
            return rows, cols
        rows, cols = [rows], [cols]
        if self.image_mined is not None:
            mined_rows, mined_ids = self.image_mined
            pair, col = matching_pairs(mined_ids, ids_block)
            rows.append(mined_rows[pair])
            cols.append(col)
        if self.text_mined is not None:
            mined_rows, mined_cols = self.text_mined
            offset = self.text_offsets[src]
            inside = (mined_cols >= offset) & (mined_cols < offset + n_block)
            rows.append(mined_rows[inside])
            cols.append(mined_cols[inside] - offset)
        return _unique_pairs(torch.cat(rows), torch.cat(cols), n_block)

    def tile(self, rows, cols, y_tile, pairs):
        """Logits, cosines (when options need them) and the dense positive mask of one tile."""
        cosine = None
        if self.needs_cosine:
            cosine = self.x[rows] @ y_tile.T
            logits = cosine * self.t + self.b
        else:
            logits = torch.addmm(self.b, self.x_scaled[rows], y_tile.T)
        pair_rows, pair_cols = pairs
        inside = ((pair_rows >= rows.start) & (pair_rows < rows.stop)
                  & (pair_cols >= cols.start) & (pair_cols < cols.stop))
        positive = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        positive[pair_rows[inside] - rows.start, pair_cols[inside] - cols.start] = True
        if self.opts.mine_image_text is not None:
            positive |= cosine >= self.opts.mine_image_text
        return logits, cosine, positive

    # extra passes ------------------------------------------------------------------------------------
    def statistics(self):
        """Per-row (and, for softmax, per-text) statistics some options need before the main pass."""
        opts, n_rows, device = self.opts, self.x.shape[0], self.x.device
        softmax = opts.loss_type == "softmax"
        self.row_positives = None
        needs_counts = opts.normalize == "row" or opts.negative_ratio is not None
        counts_by_ids = needs_counts and not (opts.mining or softmax)
        if counts_by_ids:  # cheap: positives by ids only, from the gathered text ids
            all_text_ids = self.ring.all_gather_padded(self.text_ids, self.text_sizes)
            self.row_positives = row_positive_counts(self.image_ids, all_text_ids).double()
        needs_pass = softmax or opts.hard_negative_beta is not None or (opts.mining and needs_counts)
        if not needs_pass:
            return
        neg_inf = -float("inf")
        row = {"positives": torch.zeros(n_rows, dtype=torch.float64, device=device),
               "targets": torch.zeros(n_rows, dtype=torch.float64, device=device),
               "hard_lse": torch.full((n_rows,), neg_inf, device=device),
               "lse": torch.full((n_rows,), neg_inf, device=device)}
        travel = []
        if softmax:  # per text: positives, target sum, log-sum-exp over all images
            travel = [torch.zeros(self.y.shape[0], 3, dtype=torch.float64, device=device)]
            travel[0][:, 2] = neg_inf

        def visit(src, block, travel):
            y_block, ids_block = block[0], block[1]
            pairs = self.block_pairs(src, ids_block)
            for rows, cols in self.tiles(n_rows, y_block.shape[0]):
                logits, cosine, positive = self.tile(rows, cols, y_block[cols], pairs)
                row["positives"][rows] += positive.sum(1).double()
                if opts.hard_negative_beta is not None:
                    scores = (opts.hard_negative_beta * cosine).masked_fill(positive, neg_inf)
                    row["hard_lse"][rows] = torch.logaddexp(row["hard_lse"][rows], scores.logsumexp(1))
                if softmax:
                    target = positive.float()
                    if self.targets is not None:
                        target = target * block[2][None, cols]
                    row["targets"][rows] += target.sum(1).double()
                    row["lse"][rows] = torch.logaddexp(row["lse"][rows], logits.logsumexp(1))
                    col = travel[0][cols]
                    col[:, 0] += positive.sum(0).double()
                    col[:, 1] += target.sum(0).double()
                    col[:, 2] = torch.logaddexp(col[:, 2], logits.logsumexp(0).double())

        travel = self.ring_pass(self.block_of(self.y), travel, visit)
        if self.row_positives is None:
            self.row_positives = row["positives"]
        self.row_stats = row
        if softmax:
            self.column_stats = travel[0]

    def selection_thresholds(self):
        """Per row, the quota-th highest (hard) or lowest (easy) negative logit: a running top-k."""
        opts, n_rows = self.opts, self.x.shape[0]
        self.quota = (opts.negative_ratio * self.row_positives).floor().long()
        k = max(1, min(int(self.quota.max()), self.n_texts))
        sign = 1.0 if opts.negative_selection == "hard" else -1.0
        best = torch.full((n_rows, k), -float("inf"), device=self.x.device)

        def visit(src, block, travel):
            y_block, ids_block = block[0], block[1]
            pairs = self.block_pairs(src, ids_block)
            for rows, cols in self.tiles(n_rows, y_block.shape[0]):
                logits, _, positive = self.tile(rows, cols, y_block[cols], pairs)
                candidates = torch.cat([best[rows], (sign * logits).masked_fill(positive, -float("inf"))], 1)
                best[rows] = candidates.topk(k, dim=1).values

        self.ring_pass(self.block_of(self.y), [], visit)
        quota_index = (self.quota - 1).clamp(min=0, max=k - 1)
        threshold = best.gather(1, quota_index[:, None])[:, 0]
        threshold = torch.where(self.quota > 0, threshold, torch.full_like(threshold, float("inf")))
        self.threshold = sign * threshold  # in logit units; keep sign * logit >= sign * threshold

    # main pass ---------------------------------------------------------------------------------------
    def main_pass(self):
        opts, ring, x, t, b = self.opts, self.ring, self.x, self.t, self.b
        n_rows = x.shape[0]
        softmax = opts.loss_type == "softmax"
        grad_x = torch.zeros_like(x)  # sum_j coef_ij y_j (without t and the final scale)
        totals = torch.zeros(2, dtype=torch.float64, device=x.device)  # loss sum, coef sum
        row_index = torch.arange(n_rows, device=x.device) + self.image_offsets[ring.rank]
        if opts.negative_ratio is not None and opts.negative_selection == "random":
            quota = (opts.negative_ratio * self.row_positives).floor()
            keep_prob = (quota / (self.n_texts - self.row_positives).clamp(min=1)).clamp(max=1.0)
        if opts.hard_negative_beta is not None:
            n_negatives = (self.n_texts - self.row_positives).float()
        if softmax:
            row_positives = self.row_stats["positives"].clamp(min=1).float()
            row_target_share = (self.row_stats["targets"] / self.row_stats["positives"].clamp(min=1)).float()
            row_lse = self.row_stats["lse"]
        elif opts.normalize == "row":
            row_weight = (1.0 / self.row_positives.clamp(min=1)).float()

        block = self.block_of(self.y)
        if softmax:
            stats = self.column_stats
            block.append(torch.stack([stats[:, 0].clamp(min=1), stats[:, 1] / stats[:, 0].clamp(min=1),
                                      stats[:, 2]], 1).float())

        def visit(src, block, travel):
            y_block, ids_block = block[0], block[1]
            grad_y = travel[0] if travel else None
            pairs = self.block_pairs(src, ids_block)
            col_index = torch.arange(y_block.shape[0], device=x.device) + self.text_offsets[src]
            for rows, cols in self.tiles(n_rows, y_block.shape[0]):
                y_tile = y_block[cols]
                if not self.general:
                    # the plain loss: positives are sparse, touch them by index instead of a dense tile
                    logits = torch.addmm(b, self.x_scaled[rows], y_tile.T)
                    pair_rows, pair_cols = pairs
                    inside = ((pair_rows >= rows.start) & (pair_rows < rows.stop)
                              & (pair_cols >= cols.start) & (pair_cols < cols.stop))
                    tile_rows, tile_cols = pair_rows[inside] - rows.start, pair_cols[inside] - cols.start
                    loss = F.softplus(logits).sum() - logits[tile_rows, tile_cols].sum()
                    if grad_y is None:
                        totals[0] += loss.double()
                        continue
                    coef = logits.sigmoid_()
                    coef[tile_rows, tile_cols] -= 1.0
                else:
                    logits, cosine, positive = self.tile(rows, cols, y_tile, pairs)
                    target = positive.float()
                    if self.targets is not None:
                        target = target * block[2][None, cols]
                    if self.teacher is not None:
                        teacher_images, _, teacher_bias = self.teacher
                        teacher_texts = block[3 if self.targets is not None else 2]
                        teacher_logits = torch.addmm(teacher_bias, teacher_images[rows], teacher_texts[cols].T)
                        target = torch.lerp(target, torch.sigmoid(teacher_logits), opts.teacher_weight)
                    if softmax:
                        loss, coef = self.softmax_terms(logits, target, rows, cols, block[-1],
                                                        row_positives, row_target_share, row_lse)
                    else:
                        weight = torch.ones_like(logits)
                        if opts.hard_negative_beta is not None:
                            hard = torch.exp(opts.hard_negative_beta * cosine
                                             - self.row_stats["hard_lse"][rows, None]) * n_negatives[rows, None]
                            weight = torch.where(positive, weight, hard)
                        if opts.negative_ratio is not None:
                            if opts.negative_selection == "random":
                                draw = uniform_hash(row_index[rows], col_index[cols], opts.seed)
                                keep = draw < keep_prob[rows, None]
                            elif opts.negative_selection == "hard":
                                keep = logits >= self.threshold[rows, None]
                            else:
                                keep = logits <= self.threshold[rows, None]
                            weight = weight * (positive | keep).float()
                        if opts.normalize == "row":
                            weight = weight * row_weight[rows, None]
                        loss = (weight * (F.softplus(logits) - target * logits)).sum()
                        coef = weight * (torch.sigmoid(logits) - target)
                totals[0] += loss.double()
                totals[1] += coef.sum().double()
                if grad_y is not None:
                    grad_x[rows].addmm_(coef, y_tile)
                    grad_y[cols].addmm_(coef.T, x[rows])

        travel = self.ring_pass(block, [torch.zeros_like(self.y)] if self.needs_grads else [], visit)
        grad_y_home = travel[0] if travel else torch.zeros_like(self.y)
        if softmax:
            scale = ring.world  # the 1 / (2N) factors are inside coef
            bias_grad = torch.zeros((), device=x.device)
        else:
            scale = ring.world / (self.n_texts if opts.normalize == "text" else self.n_images)
            bias_grad = (totals[1] * scale).float()
        loss = (totals[0] * scale).float()
        grads = (grad_x * (t * scale), grad_y_home * (t * scale),
                 ((x * grad_x).sum().double() * scale).float(), bias_grad)
        return loss, grads

    def softmax_terms(self, logits, target, rows, cols, column_stats, row_positives, row_target_share, row_lse):
        """Symmetric InfoNCE through ids: loss share and d loss / d logits of one tile (with the
        1 / (2 N_images) and 1 / (2 N_texts) factors)."""
        col_positives, col_target_share, col_lse = column_stats[cols].unbind(1)
        row_factor = 0.5 / self.n_images
        col_factor = 0.5 / self.n_texts
        row_soft = torch.exp(logits - row_lse[rows, None])
        col_soft = torch.exp(logits - col_lse[None, :])
        loss = (row_factor * (target / row_positives[rows, None] * (row_lse[rows, None] - logits)).sum()
                + col_factor * (target / col_positives[None, :] * (col_lse[None, :] - logits)).sum())
        coef = (row_factor * (row_target_share[rows, None] * row_soft - target / row_positives[rows, None])
                + col_factor * (col_target_share[None, :] * col_soft - target / col_positives[None, :]))
        return loss, coef

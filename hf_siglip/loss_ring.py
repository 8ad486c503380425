"""The ring engine behind `hf_siglip.loss.sigmoid_loss`: process-group plumbing (`RingContext`) and `Engine`,
which runs the loss terms (`loss_terms`) tile by tile round the ring of processes inside one autograd Function.

Passes (each carries every text block once round the ring, with its ids and per-text inputs):
  - mining pre-passes (image-image: images travel; text-text: texts travel), only when those thresholds are set;
  - one statistics pass per stage of the statistics the active terms need (column statistics ride home with
    their block); positive counts without mining come from the gathered ids instead;
  - for differentiable statistics (softmax normalisers), a pass summing the loss's gradient with respect to each;
  - the main pass: per tile, the loss term and its gradient with respect to the tile's logits (the sigmoid loss
    in closed form, fused, in buffers reused from tile to tile; other losses by autograd, plus each
    differentiable statistic's gradient times the sum above), turned into embedding, t and b gradients by two
    matrix products; text gradients ride home with their block.
Backward only scales the saved gradients, so no collective runs inside autograd's backward. Memory per process is
O((n_images + n_texts) * d + tile^2) plus what options hold (hard/easy masking: a running top-k of
n_images x (ratio * most positives of a row) values; image-image/text-text mining: the mined pairs), independent
of the number of processes.

Imports torch only (copied beside the modeling file for `trust_remote_code` loading).
"""

import torch
import torch.distributed as dist

from .loss_terms import (
    Tile,
    finish,
    initial_value,
    reduce_tile,
    statistic_gradient,
    tile_loss,
    tile_loss_and_gradient,
)
from .positives import id_pairs, pairs_in_tile, similar_pairs

_COUNTED_BY_IDS = {"positives": "row", "col_positives": "col"}  # without mining, ids alone give these counts


class RingContext:
    """Where this process sits in the ring: rank/world in `group` and its two neighbours (global ranks)."""

    def __init__(self, group=None):
        initialised = dist.is_available() and dist.is_initialized()
        if group is not None and not initialised:
            raise ValueError("sigmoid_loss: a process group was given but torch.distributed is not initialised")
        self.group, self.rank, self.world, self.left, self.right = None, 0, 1, 0, 0
        if not initialised:
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
        padded = tensor.new_zeros(max(sizes))
        padded[: tensor.shape[0]] = tensor
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return torch.cat([part[:size] for part, size in zip(out, sizes)])

    def all_reduce_sum(self, tensor):
        if self.world > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

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


class Workspace:
    """Scratch tensors reused from tile to tile: one flat buffer per name, as large as the largest shape asked for,
    viewed at each shape (no allocation, and no fresh pages to fault in, per tile)."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.buffers = dtype, device, {}

    def view(self, name, shape):
        numel = shape[0] * shape[1]
        if name not in self.buffers or self.buffers[name].numel() < numel:
            self.buffers[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self.buffers[name][:numel].view(shape)


def row_positive_counts(image_ids, all_text_ids):
    """How many texts (of the whole batch) carry each image's id."""
    sorted_ids, image_ids = torch.sort(all_text_ids).values, image_ids.contiguous()
    return (torch.searchsorted(sorted_ids, image_ids, right=True)
            - torch.searchsorted(sorted_ids, image_ids, right=False))


class _RingLoss(torch.autograd.Function):
    """Forward computes the loss and all its gradients in one ring; backward only scales them."""

    @staticmethod
    def forward(fn_ctx, image_embeds, text_embeds, logit_scale, logit_bias, engine):
        loss, grads, statistics = engine.run()
        fn_ctx.save_for_backward(*grads, engine.embedding_scale)
        fn_ctx.dtypes = (image_embeds.dtype, text_embeds.dtype, logit_scale.dtype, logit_bias.dtype)
        fn_ctx.shapes = (logit_scale.shape, logit_bias.shape)
        engine.statistics = statistics
        return loss

    @staticmethod
    def backward(fn_ctx, grad_output):
        gx, gy, gt, gb, embedding_scale = fn_ctx.saved_tensors
        dx, dy, dt, db = fn_ctx.dtypes
        go = grad_output.to(gx.dtype)
        embedding_go = go * embedding_scale  # one pass over each embedding gradient
        return ((gx * embedding_go).to(dx), (gy * embedding_go).to(dy), (gt * go).reshape(fn_ctx.shapes[0]).to(dt),
                (gb * go).reshape(fn_ctx.shapes[1]).to(db), None)


class Engine:
    """One call of the loss: the ring, sizes, ids, the compute-dtype inputs and the active terms.

    `run()` returns (loss share, (d image, d text, d t, d b), summed statistics): see `hf_siglip.loss` for the
    scaling convention. The embedding gradients come divided by `embedding_scale` (t times the world size), which
    backward applies with the incoming gradient in one pass.
    """

    def __init__(self, ring, config, terms, image_sizes, text_sizes, image_ids, text_ids, embeddings, inputs,
                 needs_grads, wants_statistics, mining_image_embeds=None):
        self.ring, self.config, self.terms = ring, config, terms
        self.image_sizes, self.text_sizes = image_sizes, text_sizes
        self.image_offsets = [sum(image_sizes[:r]) for r in range(ring.world)]
        self.text_offsets = [sum(text_sizes[:r]) for r in range(ring.world)]
        self.n_images, self.n_texts = sum(image_sizes), sum(text_sizes)
        self.image_ids, self.text_ids = image_ids, text_ids
        self.x, self.y, self.t, self.b = embeddings  # detached, compute dtype; t and b 0-d
        if not terms.uses_bias:
            self.b = torch.zeros_like(self.b)
        self.x_scaled = self.x * self.t
        self.image_inputs, self.text_inputs, self.constants = inputs
        # what the mining rules compare: these embeddings, or the teacher's (loss_config.mine_with), whose text
        # embeddings already travel with each text block as the teacher's input
        self.mines_elsewhere = mining_image_embeds is not None
        self.mining_text_key = "teacher_text_embeds" if self.mines_elsewhere else "embeds"
        self.mining_x = mining_image_embeds if self.mines_elsewhere else self.x
        self.mining_y = self.text_inputs[self.mining_text_key] if self.mines_elsewhere else self.y
        self.mines_positives = bool(config.mining) and not config.ignores_mined_pairs
        self.global_rows = torch.arange(self.x.shape[0], device=self.x.device) + self.image_offsets[ring.rank]
        self.needs_grads, self.wants_statistics = needs_grads, wants_statistics
        self.statistics = None  # set by the autograd Function after the run
        self.embedding_scale = None  # set by the run

    # plumbing ----------------------------------------------------------------------------------------
    def ring_pass(self, block, travel, visit, sizes=None):
        """Carry `block` (named tensors with one row per item of its home process; `sizes` per process, default
        the text counts) round the ring, calling visit(src_rank, block, travel) at each stop; the `travel`
        accumulators (named) ride along with their block and are returned once home."""
        ring, sizes = self.ring, sizes or self.text_sizes
        names, travel_names = sorted(block), sorted(travel)
        for step in range(ring.world):
            src = (ring.rank - step) % ring.world
            n_next = sizes[(src - 1) % ring.world]
            if step < ring.world - 1:  # prefetch the next block while this one is computed
                tensors = [block[name] for name in names]
                received, wait_block = ring.start_shift(
                    tensors, [((n_next,) + tuple(t.shape[1:]), t.dtype) for t in tensors])
            visit(src, block, travel)
            if ring.world > 1 and travel:
                tensors = [travel[name] for name in travel_names]
                moved, wait_travel = ring.start_shift(
                    tensors, [((n_next,) + tuple(t.shape[1:]), t.dtype) for t in tensors])
                wait_travel()
                travel = dict(zip(travel_names, moved))
            if step < ring.world - 1:
                wait_block()
                block = dict(zip(names, received))
        return travel

    def tiles(self, n_rows, n_cols):
        size = self.config.tile_size
        for c0 in range(0, n_cols, size):
            for r0 in range(0, n_rows, size):
                yield slice(r0, min(r0 + size, n_rows)), slice(c0, min(c0 + size, n_cols))

    def text_block(self, col_stats=None):
        """The local texts as a travelling block: embeddings, ids, per-text inputs and column statistics."""
        return {"embeds": self.y, "ids": self.text_ids, **self.text_inputs,
                **{f"col/{name}": value for name, value in (col_stats or {}).items()}}

    def tile(self, rows, cols, src, block, pairs_and_mined, row_stats, requires_grad=False, workspace=None):
        """The tile of the local images `rows` against the block's texts `cols`; with a `workspace`, its logits are
        written into the workspace's "logits" buffer."""
        pairs, mined = pairs_and_mined  # positive pairs of the block; mined_pairs="ignore": the mined ones apart
        y_tile = block["embeds"][cols]
        out = None if workspace is None else workspace.view("logits", (rows.stop - rows.start, y_tile.shape[0]))
        cosine = None
        if self.terms.uses_cosine:
            cosine = self.x[rows] @ y_tile.T
            logits = torch.mul(cosine, self.t, out=out).add_(self.b)
        else:
            logits = torch.addmm(self.b, self.x_scaled[rows], y_tile.T, out=out)
        col_index = torch.arange(cols.start, cols.stop, device=self.x.device) + self.text_offsets[src]
        return Tile(logits.requires_grad_(requires_grad), pairs_in_tile(rows, cols, pairs), self.global_rows[rows],
                    col_index, self.n_images, self.n_texts, positive_logits_leaf=requires_grad,
                    row={name: value[rows, None] for name, value in row_stats.items()},
                    col={name[4:]: value[None, cols] for name, value in block.items() if name.startswith("col/")},
                    images={name: value[rows] for name, value in self.image_inputs.items()},
                    texts={name: block[name][cols] for name in self.text_inputs},
                    constants=self.constants, cosine=cosine,
                    mine_image_text=self.config.mine_image_text if mined is None else None,
                    mining_cosine=(self.mining_x[rows] @ block[self.mining_text_key][cols].T
                                   if self.mines_elsewhere and self.config.mine_image_text is not None else None),
                    mined_index=None if mined is None else pairs_in_tile(rows, cols, mined),
                    mined_image_text=self.config.mine_image_text)

    def visit_tiles(self, pairs_of, row_stats, on_tile, requires_grad=False, workspace=None):
        """A ring-pass visit calling on_tile(rows, cols, tile, block, travel) for every tile of the local images
        against the visiting block; each tile is gone before the next is built (memory holds one)."""
        def visit(src, block, travel):
            pairs = pairs_of(src, block["ids"])
            for rows, cols in self.tiles(self.x.shape[0], block["embeds"].shape[0]):
                tile = self.tile(rows, cols, src, block, pairs, row_stats, requires_grad, workspace)
                on_tile(rows, cols, tile, block, travel)
        return visit

    # forward -----------------------------------------------------------------------------------------
    def run(self):
        with torch.no_grad(), torch.autocast(device_type=self.x.device.type, enabled=False):
            image_mined, text_mined = self.mine()

            def pairs_of(src, ids_block):
                """(positive pairs, pairs mining found or None) of the local images and a text block."""
                found = id_pairs(self.image_ids, ids_block, image_mined, text_mined, self.text_offsets[src])
                if self.config.ignores_mined_pairs:
                    return id_pairs(self.image_ids, ids_block), found
                return found, None

            row_stats, col_stats = self.compute_statistics(pairs_of)
            statistic_grads = None
            if self.needs_grads and self.terms.differentiable:
                statistic_grads = self.statistic_gradients(pairs_of, row_stats, col_stats)
            return self.main_pass(pairs_of, row_stats, col_stats, statistic_grads)

    def mine(self):
        """Pairs mined through image-image similarity as (local image, id) and through text-text similarity as
        (id, global text index), gathered from every process (None when off)."""
        config, image_mined, text_mined = self.config, None, None
        if config.mine_image_image is not None:
            found = []

            def visit(src, block, travel):
                for rows, cols in self.tiles(self.x.shape[0], block["embeds"].shape[0]):
                    row, other = similar_pairs(self.mining_x[rows], block["embeds"][cols], config.mine_image_image)
                    found.append(torch.stack([row + rows.start, block["ids"][cols][other]], 1))

            self.ring_pass({"embeds": self.mining_x, "ids": self.image_ids}, {}, visit, sizes=self.image_sizes)
            pairs = torch.unique(torch.cat(found), dim=0)
            image_mined = (pairs[:, 0], pairs[:, 1])
        if config.mine_text_text is not None:
            found = []

            def visit(src, block, travel):
                for rows, cols in self.tiles(self.y.shape[0], block["embeds"].shape[0]):
                    row, other = similar_pairs(self.mining_y[rows], block["embeds"][cols], config.mine_text_text)
                    found.append(torch.stack([self.text_ids[rows][row],
                                              other + cols.start + self.text_offsets[src]], 1))

            self.ring_pass({"embeds": self.mining_y}, {}, visit)
            local = torch.unique(torch.cat(found), dim=0)
            counts = self.ring.all_gather_ints([local.shape[0]], self.x.device)[:, 0].tolist()
            every = [self.ring.all_gather_padded(local[:, k].contiguous(), counts) for k in range(2)]
            text_mined = (every[0], every[1])
        return image_mined, text_mined

    def compute_statistics(self, pairs_of):
        """Row statistics of the local images and column statistics of the local texts, stage by stage."""
        row_stats, col_stats = {}, {}
        for stage in self.terms.statistics:
            pending = []
            for stat in stage:
                if stat.name in _COUNTED_BY_IDS and not self.mines_positives:
                    self.count_by_ids(stat, row_stats, col_stats)
                else:
                    pending.append(stat)
            if pending:
                self.statistics_pass(pending, pairs_of, row_stats, col_stats)
        return row_stats, col_stats

    def statistics_pass(self, pending, pairs_of, row_stats, col_stats):
        """One ring pass reducing the `pending` statistics into `row_stats` / `col_stats` (which hold the earlier
        stages' ones, that these may read)."""
        config, dtype, device = self.config, self.x.dtype, self.x.device
        kept = {stat.name: stat.k(row_stats, config) for stat in pending if stat.reduce == "top_k"}
        row_running = {stat.name: initial_value(stat, self.x.shape[0], dtype, device,
                                                max(1, min(int(kept[stat.name].max()), self.n_texts))
                                                if stat.name in kept else 1)
                       for stat in pending if stat.axis == "row"}
        col_running = {stat.name: initial_value(stat, self.y.shape[0], dtype, device)
                       for stat in pending if stat.axis == "col"}

        def on_tile(rows, cols, tile, block, travel):
            for stat in pending:
                values = stat.values(tile, config)
                if stat.axis == "row":
                    row_running[stat.name][rows] = reduce_tile(stat, row_running[stat.name][rows], values)
                else:
                    travel[stat.name][cols] = reduce_tile(stat, travel[stat.name][cols], values)

        col_running = self.ring_pass(self.text_block(col_stats), col_running,
                                     self.visit_tiles(pairs_of, row_stats, on_tile))
        for stat in pending:
            if stat.axis == "row":
                row_stats[stat.name] = finish(stat, row_running[stat.name], kept.get(stat.name))
            else:
                col_stats[stat.name] = col_running[stat.name]

    def row_id_positives(self):
        """Per local image: the texts of the global batch that carry its id."""
        all_text_ids = self.ring.all_gather_padded(self.text_ids, self.text_sizes)
        return row_positive_counts(self.image_ids, all_text_ids)

    def count_by_ids(self, stat, row_stats, col_stats):
        dtype = self.x.dtype
        if _COUNTED_BY_IDS[stat.name] == "row":
            row_stats[stat.name] = self.row_id_positives().to(dtype)
        else:
            all_image_ids = self.ring.all_gather_padded(self.image_ids, self.image_sizes)
            col_stats[stat.name] = row_positive_counts(self.text_ids, all_image_ids).to(dtype)

    def statistic_gradients(self, pairs_of, row_stats, col_stats):
        """d loss / d statistic for each differentiable statistic: per local image row and per local text."""
        config, differentiable = self.config, self.terms.differentiable
        row_grads = {s.name: torch.zeros_like(row_stats[s.name]) for s in differentiable if s.axis == "row"}
        col_grads = {f"grad/{s.name}": torch.zeros_like(col_stats[s.name])
                     for s in differentiable if s.axis == "col"}

        def on_tile(rows, cols, tile, block, travel):
            for stat in differentiable:
                side = tile.row if stat.axis == "row" else tile.col
                side[stat.name] = side[stat.name].detach().requires_grad_()
            leaves = [(tile.row if s.axis == "row" else tile.col)[s.name] for s in differentiable]
            with torch.enable_grad():
                loss, _ = tile_loss(tile, config, self.terms)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            for stat, grad in zip(differentiable, grads):
                if grad is None:
                    continue
                if stat.axis == "row":
                    row_grads[stat.name][rows] += grad[:, 0]
                else:
                    travel[f"grad/{stat.name}"][cols] += grad[0]

        col_grads = self.ring_pass(self.text_block(col_stats), col_grads,
                                   self.visit_tiles(pairs_of, row_stats, on_tile))
        return row_grads, col_grads

    @staticmethod
    def logits_gradient(tile, outputs, grad_outputs):
        """d outputs / d tile logits by autograd, with the gradient of a separately read `positive_logits` added at
        the positives."""
        sparse = tile.positive_logits_leaf
        inputs = [tile.logits] if sparse is None else [tile.logits, sparse]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
        coef = torch.zeros_like(tile.logits) if grads[0] is None else grads[0]
        if sparse is not None and grads[1] is not None:
            coef.index_put_(tile.positive_index, grads[1], accumulate=True)
        return coef

    def autograd_coefficients(self, tile, loss, chain, rows, cols, block, row_grads):
        """d loss / d tile logits by autograd, with each differentiable statistic's gradient times d loss / d
        statistic (from `statistic_gradients`) added."""
        outputs, grad_outputs = [loss], [torch.ones_like(loss)]
        for stat in chain:  # the statistic's gradient times d loss / d statistic
            value = (tile.row if stat.axis == "row" else tile.col)[stat.name]
            loss_grad = (row_grads[stat.name][rows, None] if stat.axis == "row"
                         else block[f"grad/{stat.name}"][None, cols])
            with torch.enable_grad():
                values = stat.values(tile, self.config)
            outputs.append(values)
            grad_outputs.append(loss_grad * statistic_gradient(stat, values.detach(), value))
        return self.logits_gradient(tile, outputs, grad_outputs)

    def main_pass(self, pairs_of, row_stats, col_stats, statistic_grads):
        config, ring, x, t = self.config, self.ring, self.x, self.t
        needs_grads = self.needs_grads
        grad_x = torch.zeros_like(x)  # sum_j coef_ij y_j (without t and the final scale)
        # loss, d loss / d b, then the statistics: positives, their logits' sum, all logits' sum, weighted pairs,
        # positives by ids alone, pairs mining added beyond the ids'
        totals = torch.zeros(8, dtype=torch.float64, device=x.device)
        block = self.text_block(col_stats)
        chain = ()
        if statistic_grads is not None:
            block.update(statistic_grads[1])
            chain = self.terms.differentiable
        statistics = self.wants_statistics
        if statistics and self.config.mining:
            totals[6] = self.row_id_positives().sum().double()
        # a loss term with a closed-form gradient (the sigmoid loss) needs no autograd, and its tiles live in
        # buffers reused from tile to tile
        fused = needs_grads and not chain and self.terms.loss.gradient is not None
        workspace = Workspace(x.dtype, x.device) if fused else None

        def on_tile(rows, cols, tile, block, travel):
            y_tile = block["embeds"][cols]
            if statistics:  # read before a fused loss overwrites the logits; the sum of the tile's logits is
                # (sum_i x_i) . (sum_j y_j) t + b r c
                totals[2] += tile.positive_index[0].shape[0]
                totals[3] += tile.positive_logits.detach().sum().double()
                totals[4] += (t * (x[rows].sum(0) @ y_tile.sum(0)) + self.b * tile.logits.numel()).double()
            scale = 1.0
            if fused:
                loss, weight, coef, scale = tile_loss_and_gradient(tile, config, self.terms, workspace.view)
            else:
                with torch.set_grad_enabled(needs_grads):
                    loss, weight = tile_loss(tile, config, self.terms)
            totals[0] += loss.detach().double()
            if statistics:
                totals[5] += (tile.logits.numel() if isinstance(weight, float)
                              else torch.count_nonzero(weight.expand(tile.logits.shape)))
                if self.config.ignores_mined_pairs:
                    totals[7] += tile.mined.sum()
            if not needs_grads:
                return
            if not fused:
                coef = self.autograd_coefficients(tile, loss, chain, rows, cols, block, row_grads)
            totals[1] += coef.sum().double() * scale
            grad_x[rows].addmm_(coef, y_tile, alpha=scale)
            travel["grad"][cols].addmm_(coef.T, x[rows], alpha=scale)

        row_grads = statistic_grads[0] if statistic_grads is not None else None
        travel = self.ring_pass(block, {"grad": torch.zeros_like(self.y)} if needs_grads else {},
                                self.visit_tiles(pairs_of, row_stats, on_tile, needs_grads and not fused, workspace))
        grad_y = travel["grad"] if needs_grads else torch.zeros_like(self.y)
        scale = ring.world  # each process's share times the world: DDP's average is the global loss
        loss = (totals[0] * scale).to(x.dtype)
        bias_grad = (totals[1] * scale).to(x.dtype) if self.terms.uses_bias else torch.zeros((), dtype=x.dtype,
                                                                                               device=x.device)
        self.embedding_scale = t * scale
        grads = (grad_x, grad_y, torch.dot(x.reshape(-1), grad_x.reshape(-1)) * scale, bias_grad)
        if statistics and not self.config.mining:
            totals[6] = totals[2]  # every positive is one by ids
        if statistics and not self.config.ignores_mined_pairs:
            totals[7] = totals[2] - totals[6]  # the mined pairs are the positives beyond the ids'
        return loss, grads, (totals[2:] if statistics else None)

"""Process-group plumbing for the ring sigmoid loss: group resolution, a metadata handshake that makes
every process raise the same error instead of hanging, and neighbour shifts of tensor lists.

Imports torch only (copied beside the modeling file for `trust_remote_code` loading).
"""

import torch
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

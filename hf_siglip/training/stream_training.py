"""Training on a stream (a ``datasets.IterableDataset``, e.g. webdataset tar shards): epochs that end together on
every process, and resuming mid-epoch.

Each process reads its own shards (accelerate's ``IterableDataset.shard`` path; ``SiglipTrainer`` turns batch
dispatching off so process 0 does not decode everyone's images), so processes can run out of rows at different
batches. A process that leaves the epoch while the others go on would hang their next collective. So every batch
fetch is agreed: each process says whether it got a batch, and when one did not, the epoch ends on all of them;
the batches the others had fetched are counted (``train/batches_dropped_at_uneven_epoch_end``) and their rows come
back next epoch. A partial gradient-accumulation window at an epoch's end is dropped the same way (it would
otherwise add its gradients to the next epoch's first step). The same agreement carries a data failure (an
``HfSiglipError`` from the stream: a bad shard with ``bad_shards="fail"``, met by one process in its own shards):
every process raises it, so none is left waiting for a peer that has gone.

The Trainer cannot place a stream's epochs (it has no length): :class:`StreamPosition` records the stream epoch
and the batches fetched in it, in every checkpoint's ``trainer_state.json``; on resume :class:`StreamEpochs`
sets that epoch (the shard order, shuffle buffer and caption sampling depend on it) and skips the batches the
run had already trained on, instead of the Trainer's own skipping (which assumes epoch 0 for a stream).
"""

from __future__ import annotations

import json
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..errors import HfSiglipError


class StreamPosition(TrainerCallback, ExportableState):
    """Where the training stream stands: its epoch and the batches (micro-batches) fetched in that epoch."""

    def __init__(self):
        self.epoch = 0
        self.batches = 0

    def state(self) -> dict:
        return {"args": {}, "attributes": {"epoch": self.epoch, "batches": self.batches}}

    def restore(self, checkpoint: str) -> None:
        """Take the position saved in `checkpoint` (the Trainer restores callbacks only with
        `restore_callback_states_from_checkpoint`, which also rebuilds every other callback)."""
        with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
            saved = json.load(handle).get("stateful_callbacks", {}).get(type(self).__name__)
        if saved is None:
            raise ValueError(f"{checkpoint} holds no stream position: it was not written by a run over a stream "
                             "(a dataset read as a Dataset and one read as a stream cannot resume each other)")
        for name, value in saved["attributes"].items():
            setattr(self, name, value)


class StreamEpochs:
    """The prepared DataLoader of a stream, iterated at the epoch :class:`StreamPosition` holds.

    ``position`` is a callable returning the current :class:`StreamPosition` (the Trainer replaces the callback
    object when it restores a checkpoint). The first iteration after a resume skips the batches trained on.
    """

    def __init__(self, dataloader, position, collator=None):
        self.dataloader = dataloader
        self.position = position
        self.collator = collator
        self._skip_on_next_iteration = True

    def set_epoch(self, _trainer_epoch: int) -> None:
        """Ignored: the stream counts its own epochs (the Trainer's count restarts at 0 when a stream resumes)."""

    def __iter__(self):
        position = self.position()
        if hasattr(self.collator, "set_epoch"):  # before the iterator starts: DataLoader workers copy the collator
            self.collator.set_epoch(position.epoch)
        self.dataloader.set_epoch(position.epoch)
        iterator = iter(self.dataloader)
        skip, self._skip_on_next_iteration = (position.batches if self._skip_on_next_iteration else 0), False
        try:
            for _ in range(skip):
                next(iterator)
        except HfSiglipError as error:  # a bad shard with bad_shards="fail": raised at the next, agreed, fetch
            iterator = _raising(error)
        position.batches = skip
        return iterator

    def __getattr__(self, name):
        return getattr(self.dataloader, name)


def _raising(error: Exception):
    raise error
    yield  # a generator: raises when the first batch is asked for


def every_process_has(has_batch: bool, accelerator, failure: HfSiglipError | None = None) -> bool:
    """True when every process has a batch (one small all-reduce; a single process answers alone). When some
    process's data failed (``failure``: a bad shard with ``bad_shards="fail"``, met by one process in its own
    shards), every process raises that failure's message, so none is left waiting for a peer that is gone."""
    if accelerator.num_processes == 1:
        if failure is not None:
            raise failure
        return has_batch
    flags = torch.tensor([1 if has_batch else 0, 1 if failure is not None else 0], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    if flags[1].item():
        from accelerate.utils import gather_object

        messages = [message for message in gather_object([str(failure) if failure is not None else None])
                    if message is not None]
        raise failure if failure is not None else HfSiglipError(f"another process: {messages[0]}")
    return bool(flags[0].item() == accelerator.num_processes)


def _next_batch(iterator):
    """(batch or None at the end, None) or (None, the data's HfSiglipError): raised by the stream, or a bad shard
    noted as fatal by this process or its DataLoader workers, in this batch or in any read before (a start-up
    summary or a data step on the main process alone)."""
    from ..data.shards import ShardError, pending_shard_failure

    try:
        batch = next(iterator, None)
    except HfSiglipError as error:
        return None, error
    failure = pending_shard_failure()
    return (batch, None) if failure is None else (None, ShardError(failure))


def fetch_agreed_batches(iterator, count: int, accelerator, position: StreamPosition) -> tuple[list, list]:
    """``(batches, [])``: up to ``count`` batches, agreed across processes; or ``([], left)`` when the epoch ended on
    some process: the whole window is dropped on all (``left``: what this process had fetched of it) and the
    position moves to the next epoch. A data failure on any process is raised on every one."""
    batches = []
    for _ in range(count):
        batch, failure = _next_batch(iterator)
        if not every_process_has(batch is not None, accelerator, failure):
            position.epoch += 1
            position.batches = 0
            return [], batches + ([batch] if batch is not None else [])
        batches.append(batch)
    position.batches += len(batches)
    return batches, []

"""Deterministic, resumable, distributed batching.

Every run sees its data in an order fixed by ``(seed, epoch)`` alone, and every image gets an
augmentation fixed by ``(seed, epoch, index)`` alone. So a run stopped at any step and resumed gives
exactly the batches (and crops) of the uninterrupted run, whatever the number of loader workers, and
``N`` ranks with batch ``b`` see exactly the images a single process with batch ``N*b`` sees:

    perm   = randperm(len(dataset), generator seeded with seed * 100_003 + epoch)
    step s, rank r:  perm[s*N*b + r*b : s*N*b + (r+1)*b]

The sampler yields ``(epoch, index)`` pairs; :class:`SeededDataset` turns each into a sample with its
transform run with torch's, Python's and NumPy's global generators seeded from ``sample_seed(seed, epoch, index)``
(timm's transforms draw from all three) and restored afterwards, so augmentation never disturbs (nor
depends on) the training process's own random state.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler



class ShardedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Micro-batches of ``(epoch, index)`` for one rank; ``start`` skips already-consumed micro-batches."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        if num_samples <= 0:
            raise ValueError("dataset is empty")
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_samples // global_batch
        return -(-self.num_samples // global_batch)

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self._order().tolist()
        g = self.batch_size * self.world_size
        for step in range(self.start, len(self)):
            chunk = order[step * g:(step + 1) * g]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if mine:
                yield [(self.epoch, i) for i in mine]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing (seed, epoch, index) so neighbouring samples get unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


class SeededDataset(Dataset):
    """Wraps a dataset whose ``__getitem__`` applies random transforms; indexed by ``(epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def make_loader(dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool, rank: int = 0,
                world_size: int = 1, num_workers: int = 0, drop_last: bool = True,
                pin_memory: bool = False) -> tuple[torch.utils.data.DataLoader, ShardedBatchSampler]:
    """A DataLoader over ``SeededDataset(dataset)`` batched by a :class:`ShardedBatchSampler`."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, rank=rank,
                                  world_size=world_size, drop_last=drop_last)
    # The loader's own generator: starting an iteration draws a base seed from it, which would otherwise
    # come from the global torch RNG and shift drop path / mixup after a resume (the data never needs it).
    loader = torch.utils.data.DataLoader(SeededDataset(dataset, seed), batch_sampler=sampler,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         persistent_workers=num_workers > 0,
                                         worker_init_fn=shield_loader_worker,
                                         generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def shield_loader_worker(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Leave the stop to the main process. Schedulers (SLURM, ``kill -- -PGID``) often signal the whole
    process group, DataLoader workers included. A worker ended by that SIGTERM, or by SIGUSR1 (whose default
    action also ends a process), makes the main process fail at its next batch ("DataLoader worker ... is
    killed by signal") instead of finishing its step and saving.

    So a worker ignores SIGUSR1 and obeys a SIGTERM only from its parent (the DataLoader's shutdown of a
    worker that does not join in time, and multiprocessing's clean-up at exit, both send one): SIGTERM is
    blocked in the worker and a small thread takes each one with its sender (``sigwaitinfo``). On its
    parent's SIGTERM the worker exits with status 0: ended by the signal itself, it would make the
    DataLoader's watch in the main process print a traceback at exit after a clean stop. Workers still end
    with the main process: the DataLoader stops them, and they watch their parent. Where the platform has no
    ``sigwaitinfo`` (macOS), only SIGUSR1 is shielded."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def obey_only_the_parent() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=obey_only_the_parent, name="sigterm-from-parent", daemon=True).start()

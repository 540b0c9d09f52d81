"""The sampler's promises: order fixed by (seed, epoch); ranks together see what one process with the
combined batch sees; a resumed epoch continues exactly; augmentation fixed by (seed, epoch, index)."""
from __future__ import annotations

import random

import numpy as np
import torch
from hypothesis import given, strategies as st
from torch.utils.data import Dataset

from fd_ref.data.sampler import SeededDataset, ShardedBatchSampler, make_loader, sample_seed


def batches(n, b, seed, epoch, rank=0, world=1, start=0, drop_last=True):
    s = ShardedBatchSampler(n, b, seed=seed, rank=rank, world_size=world, drop_last=drop_last)
    s.set_epoch(epoch, start)
    return [[i for _, i in batch] for batch in s]


@given(n=st.integers(4, 60), b=st.integers(1, 6), seed=st.integers(0, 5), epoch=st.integers(0, 3))
def test_ranks_together_equal_single_process(n, b, seed, epoch):
    world = 2
    single = batches(n, b * world, seed, epoch)
    per_rank = [batches(n, b, seed, epoch, rank=r, world=world) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single)
    for step, combined in enumerate(single):
        assert per_rank[0][step] + per_rank[1][step] == combined


@given(n=st.integers(4, 60), b=st.integers(1, 6), seed=st.integers(0, 5), start=st.integers(0, 5))
def test_resume_continues_exactly(n, b, seed, start):
    full = batches(n, b, seed, 1)
    assert batches(n, b, seed, 1, start=start) == full[start:]


@given(n=st.integers(2, 60), b=st.integers(1, 6))
def test_epoch_is_a_permutation_and_depends_on_epoch(n, b):
    flat = [i for batch in batches(n, b, 0, 0, drop_last=False) for i in batch]
    assert sorted(flat) == list(range(n))
    if n >= 8:
        assert batches(n, 1, 0, 0) != batches(n, 1, 0, 1)


class RandomItem(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(3), i


def test_augmentation_fixed_by_seed_epoch_index_and_isolated():
    ds = SeededDataset(RandomItem(), seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = ds[(2, 5)][0]
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG is untouched
    assert torch.equal(a, ds[(2, 5)][0])
    assert not torch.equal(a, ds[(3, 5)][0]) and not torch.equal(a, ds[(2, 6)][0])
    assert sample_seed(0, 0, 1) != sample_seed(0, 1, 0)


class HostRandomItem(Dataset):
    """Draws from Python's and NumPy's global generators, as timm's transforms do."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([random.random(), float(np.random.rand())]), i


def test_python_and_numpy_randomness_fixed_and_isolated():
    ds = SeededDataset(HostRandomItem(), seed=3)
    random.seed(0)
    np.random.seed(0)
    py_before, np_before = random.getstate(), np.random.get_state()
    a = ds[(2, 5)][0]
    assert random.getstate() == py_before  # the training process's generators are untouched
    np_after = np.random.get_state()
    assert np.array_equal(np_after[1], np_before[1]) and np_after[2] == np_before[2]
    assert torch.equal(a, ds[(2, 5)][0])
    assert not torch.equal(a, ds[(3, 5)][0]) and not torch.equal(a, ds[(2, 6)][0])


def test_loader_same_data_with_and_without_workers():
    def run(workers):
        loader, sampler = make_loader(RandomItem(), 4, seed=1, shuffle=True, num_workers=workers)
        sampler.set_epoch(2)
        return torch.cat([x for x, _ in loader])
    assert torch.equal(run(0), run(1))


@given(n=st.integers(1, 50), b=st.integers(1, 5), world=st.integers(1, 4), drop_last=st.booleans(),
       shuffle=st.booleans(), seed=st.integers(0, 3), epoch=st.integers(0, 2))
def test_every_world_size_and_drop_last(n, b, world, drop_last, shuffle, seed, epoch):
    """World sizes 1-4, both drop_last settings: step s of rank r holds positions [s*N*b + r*b, s*N*b + (r+1)*b)
    of the epoch's order (randperm seeded with seed * 100_003 + epoch, or 0..n-1 unshuffled). drop_last: only
    full steps (every rank a full batch); without it: every image exactly once, the last step short."""
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
             if shuffle else list(range(n)))
    g = b * world
    steps = n // g if drop_last else -(-n // g)
    per_rank = []
    for r in range(world):
        s = ShardedBatchSampler(n, b, seed=seed, shuffle=shuffle, rank=r, world_size=world, drop_last=drop_last)
        s.set_epoch(epoch)
        assert len(s) == steps
        per_rank.append([[i for e, i in batch if e == epoch] for batch in s])
    for r in range(world):
        expected = [order[k * g + r * b:k * g + (r + 1) * b] for k in range(steps)]
        assert per_rank[r] == [x for x in expected if x]
    seen = sorted(i for rank in per_rank for batch in rank for i in batch)
    if drop_last:
        assert seen == sorted(order[:steps * g]) and all(len(x) == b for rank in per_rank for x in rank)
    else:
        assert seen == list(range(n))

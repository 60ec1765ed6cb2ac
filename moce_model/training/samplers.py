"""Training-order samplers whose order depends on seed + epoch only, so that a resumed run replays it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class EpochSeededLengthGroupedSampler(torch.utils.data.Sampler):
    """Length-grouped order (mega-batches sorted by length, less padding) drawn from seed + epoch only.

    The order of an epoch must not depend on the global RNG: a resumed run rebuilds the dataloader with
    a different RNG state, and would otherwise skip the right number of batches of a different order.
    """

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int):
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


class EpochSeededRandomSampler(EpochSeededLengthGroupedSampler):
    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())



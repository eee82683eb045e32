"""DataModules for the examples: scikit-learn's bundled digits, and a synthetic token task.

Nothing is downloaded: digits ships inside scikit-learn, the token task is generated from a seed.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

from examples.resume import EpochShuffleSampler, ResumableDataLoader

#: The number of scikit-learn's digits (fixed: the data ships with scikit-learn).
DIGITS_SAMPLES = 1797


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """How many of ``n`` samples go to training, validation and test."""
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


class _SplitDataModule(pl.LightningDataModule):
    """Seeded train/val/test split of one in-memory dataset; subclasses provide ``make_dataset``."""

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def make_dataset(self) -> TensorDataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        dataset = self.make_dataset()
        sizes = split_sizes(len(dataset), self.val_fraction, self.test_fraction)
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set, self.test_set = random_split(dataset, sizes, generator=generator)

    def train_dataloader(self) -> ResumableDataLoader:
        assert self.train_set is not None
        sampler = EpochShuffleSampler(self.train_set, seed=self.seed)  # resumes in the same order
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's 1797 8x8 handwritten digits, scaled to [0, 1]; flat vectors or 1x8x8 images."""

    def __init__(self, as_images: bool = False, **kwargs: float | int) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.as_images = as_images

    def make_dataset(self) -> TensorDataset:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError(
                "The digits examples need scikit-learn, which ships the data. Install it with: "
                "pip install scikit-learn  "
                "(or, from the repository: pip install -c constraints.txt -e '.[examples]')"
            ) from None
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        if self.as_images:
            x = x.view(-1, 1, 8, 8)
        return TensorDataset(x, torch.tensor(digits.target, dtype=torch.long))


class MajorityTokenDataModule(_SplitDataModule):
    """Synthetic token sequences; the label says whether most tokens lie in the upper half of the vocab."""

    def __init__(
        self, num_samples: int = 4096, seq_len: int = 15, vocab_size: int = 16, **kwargs: float | int
    ):
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.vocab_size = vocab_size

    def make_dataset(self) -> TensorDataset:
        generator = torch.Generator().manual_seed(self.seed)
        tokens = torch.randint(0, self.vocab_size, (self.num_samples, self.seq_len), generator=generator)
        labels = ((tokens >= self.vocab_size // 2).sum(dim=1) * 2 > self.seq_len).long()
        return TensorDataset(tokens, labels)

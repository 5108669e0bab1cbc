"""Deterministic, resumable loading: batches are a function of (seed, epoch, position), so a resumed run
sees exactly the batches and views the uninterrupted run would have seen, with any number of workers."""

import logging
import signal
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.data.datasets import ArrayImages, FileImages
from distill.data.filelists import readable_name
from distill.data.images import describe_error
from distill.data.views import uint8_tensor
from distill.errors import InputError
from distill.memory import keep_freed_memory
from distill.seeds import Stream, derived_generator

logger = logging.getLogger(__name__)


class EpochBatchSampler(Sampler):
    """Batches of indices for one epoch: a permutation of (seed, epoch), split across ranks, from `start`.

    Yields (epoch, batch number, indices). drop_last keeps every batch full (and every rank in step).

    With repeats > 1 (DeiT's repeated augmentation) the indices come from timm's RepeatAugSampler: each image
    `repeats` times in a row, dealt round-robin to the ranks so that each rank augments its own copy, and an
    epoch as long as the dataset (so it shows about 1 / repeats of the images, each `repeats` times).
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, repeats: int = 0) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0
        self._repeat_sampler = None
        if repeats > 1:
            from timm.data.distributed_sampler import RepeatAugSampler

            self._repeat_sampler = RepeatAugSampler(range(size), num_replicas=world_size, rank=rank,
                                                    shuffle=shuffle, num_repeats=repeats)
            self.per_rank = len(self._repeat_sampler)
        else:
            self.per_rank = size // world_size

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return max(0, full + (0 if self.drop_last or not rest else 1) - self.start)

    @property
    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else -(-self.per_rank // self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        if self._repeat_sampler is not None:
            # timm seeds its permutation with the epoch alone: fold the run's seed in (same on every rank).
            mixed = int(derived_generator(self.seed, epoch).initial_seed())
            self._repeat_sampler.set_epoch(mixed)
            return torch.tensor(list(iter(self._repeat_sampler)), dtype=torch.long)
        if self.shuffle:
            order = torch.randperm(self.size, generator=derived_generator(self.seed, epoch))
        else:
            order = torch.arange(self.size)
        # Each global batch (batch_size x world_size) is the one a single process with that batch would see,
        # dealt to the ranks in slices: the run is the same computation on any number of processes.
        per_rank, width = self.size // self.world_size, self.batch_size * self.world_size
        full = per_rank // self.batch_size
        head = order[: full * width].view(full, self.world_size, self.batch_size)[:, self.rank].reshape(-1)
        rest = per_rank - full * self.batch_size
        tail = order[full * width : full * width + rest * self.world_size]
        return torch.cat([head, tail[self.rank * rest : (self.rank + 1) * rest]])

    def __iter__(self) -> Iterator[Tuple[int, int, List[int]]]:
        indices = self.epoch_indices(self.epoch)
        for number in range(self.start, self.batches_per_epoch):
            batch = indices[number * self.batch_size : (number + 1) * self.batch_size]
            yield self.epoch, number, batch.tolist()


class _ArrayBatches(Dataset):
    """Whole batches of in-memory images, augmented in one go."""

    def __init__(self, source: ArrayImages, views, seed: int, rank: int) -> None:
        self.source, self.views, self.seed, self.rank = source, views, seed, rank

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: Tuple[int, int, List[int]]) -> Dict[str, Any]:
        epoch, number, indices = key
        index = torch.as_tensor(indices, dtype=torch.long)
        generator = derived_generator(self.seed, epoch, number, self.rank, Stream.BATCH_VIEWS)
        batch = {"crops": self.views.array_batch(self.source.images[index], generator), "indices": index}
        batch["labels"] = self.source.labels[index] if self.source.labels is not None else None
        batch["unreadable"] = []  # in memory: every image reads
        return batch


class _FileSamples(Dataset):
    """One decoded, cropped file per item. A file that fails to decode is replaced by the next readable one in
    training (substitute=True: batches stay full), and reported as unreadable otherwise (evaluation, pictures: a
    row must come from the image it names, so nothing takes its place).

    Views that draw their crop boxes apart from cutting them (multi-crop: `draw`, `reduction`, `file_sample`)
    have them drawn on the full image's size before decoding, so that a JPEG is decoded at the size they need
    (unless the source's decode_at_crop_size is off); the draws are those image_sample would make."""

    def __init__(self, source: FileImages, views, seed: int, channels: int, substitute: bool = True) -> None:
        self.source, self.views, self.seed, self.substitute = source, views, seed, substitute
        self.mode = "L" if channels == 1 else "RGB"
        self._warned: set = set()
        self.at_crop_size = getattr(source, "decode_at_crop_size", False) and hasattr(views, "file_sample")

    def __len__(self) -> int:
        return len(self.source)

    def _skip(self, candidate: int, error: Exception) -> None:
        path = self.source.paths[candidate]
        if path not in self._warned:
            self._warned.add(path)
            logger.warning("skipping unreadable image %s (%s)", readable_name(path), describe_error(error))

    def _decode(self, index: int) -> Tuple[int, Optional[torch.Tensor]]:
        for attempt in range(len(self.source) if self.substitute else 1):
            candidate = (index + attempt) % len(self.source)
            try:
                image = self.source.load(candidate, self.mode, self.views.min_image_size)
            except Exception as error:  # a file damaged or removed after the start-up check
                self._skip(candidate, error)
                continue
            return candidate, uint8_tensor(image)
        if self.substitute:
            raise InputError(f"no readable image left in {self.source.name}")
        return index, None

    def _decode_at_crop_size(self, epoch: int, index: int) -> Tuple[int, Optional[Dict[str, Any]]]:
        """_decode and image_sample in one: the boxes drawn from the file's header size, then the file decoded
        as small as they allow. Each attempt draws from a fresh generator, as image_sample after _decode would."""
        for attempt in range(len(self.source) if self.substitute else 1):
            candidate = (index + attempt) % len(self.source)
            drawn: List[Any] = []

            def reduction(width: int, height: int) -> float:
                generator = derived_generator(self.seed, epoch, index, Stream.IMAGE_VIEWS)
                drawn.append(self.views.draw(height, width, generator))
                return self.views.reduction(drawn[-1])

            try:
                image, frame = self.source.load_at_crop_size(candidate, self.mode, self.views.min_image_size,
                                                             reduction)
            except Exception as error:  # a file damaged or removed after the start-up check
                self._skip(candidate, error)
                continue
            return candidate, self.views.file_sample(image, frame, drawn[-1])
        if self.substitute:
            raise InputError(f"no readable image left in {self.source.name}")
        return index, None

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, Any]:
        epoch, index = key
        if self.at_crop_size:
            used, sample = self._decode_at_crop_size(epoch, index)
        else:
            used, image = self._decode(index)
            sample = None if image is None else self.views.image_sample(
                image, derived_generator(self.seed, epoch, index, Stream.IMAGE_VIEWS))
        if sample is None:
            return {"index": used, "unreadable": True}
        sample["index"] = used
        sample["label"] = int(self.source.labels[used]) if self.source.labels is not None else -1
        return sample


class _PerSampleKeys(Sampler):
    """Turns the epoch batch sampler's batches into lists of (epoch, index) for per-sample decoding."""

    def __init__(self, batches: EpochBatchSampler) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for epoch, _, indices in self.batches:
            yield [(epoch, index) for index in indices]


class _Collate:
    def __init__(self, views, labelled: bool) -> None:
        self.views, self.labelled = views, labelled

    def __call__(self, samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """{"crops", "indices", "labels"} of the readable samples, and "unreadable": the indices of the others (an
        evaluation loader's batch may hold none that is readable: then "crops" is None)."""
        kept = [s for s in samples if not s.get("unreadable")]
        return {
            "crops": self.views.collate(kept) if kept else None,
            "indices": torch.tensor([s["index"] for s in kept], dtype=torch.long),
            "labels": torch.tensor([s["label"] for s in kept], dtype=torch.long) if self.labelled else None,
            "unreadable": [s["index"] for s in samples if s.get("unreadable")],
        }


def _worker_init(_worker_id: int) -> None:
    """Each worker keeps the memory it frees (a batch's decoded images, crops and float copies come back at the
    same sizes every batch), whether or not the training process set that before forking it (a GPU run
    does not): about a fifth fewer page faults per batch of photos.

    Workers also ignore the stop signals the trainer checkpoints on (SIGTERM, SIGUSR1, SIGUSR2, and Ctrl-C's
    SIGINT): scancel, timeout, container runtimes and a terminal signal every process of a job, and a worker that
    died of it would fail the step that ends in the checkpoint. A worker still ends when its loader closes or its
    parent process dies."""
    keep_freed_memory()
    for stop in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)


def build_loader(
    source, views, batch_size: int, seed: int, num_workers: int = 0, rank: int = 0, world_size: int = 1,
    shuffle: bool = True, drop_last: bool = True, repeats: int = 0, substitute: bool = True,
) -> Tuple[DataLoader, EpochBatchSampler]:
    """A DataLoader of batch dicts {"crops", "labels", "indices"} and its sampler (set_epoch before iterating).

    repeats > 1: DeiT's repeated augmentation (timm's RepeatAugSampler). substitute=False: an unreadable file is
    left out of its batch and named in the batch's "unreadable" list instead of replaced by another image."""
    sampler = EpochBatchSampler(len(source), batch_size, seed, shuffle, rank, world_size, drop_last, repeats)
    # Its own generator: a DataLoader iterator otherwise draws its base seed from the global RNG, and a resumed
    # run (which starts an iterator mid-epoch) would see different drop-path noise from then on.
    common = dict(num_workers=num_workers, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                  generator=torch.Generator().manual_seed(seed))
    if num_workers:
        common["prefetch_factor"] = 4
        common["worker_init_fn"] = _worker_init
    if isinstance(source, ArrayImages):
        loader = DataLoader(_ArrayBatches(source, views, seed, rank), sampler=sampler, batch_size=None, **common)
    else:
        channels = views.channels
        loader = DataLoader(_FileSamples(source, views, seed, channels, substitute),
                            batch_sampler=_PerSampleKeys(sampler),
                            collate_fn=_Collate(views, source.labels is not None), **common)
    return loader, sampler


def build_eval_loader(source, view, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Every image once, in order, through an evaluation view: unreadable files are left out and named per batch
    (never replaced), so each row is the image its index says."""
    loader, _ = build_loader(source, view, batch_size, seed=0, num_workers=num_workers, shuffle=False,
                             drop_last=False, substitute=False)
    return loader

"""Data of `polyglu pretrain`: documents from anywhere, packed into fixed-length rows, and the embedded corpus.

* Sources (:func:`load_documents`): the embedded corpus `python-stdlib` (this interpreter's standard-library `.py`
  files, found through `sysconfig`, so every machine has it offline), a local JSONL/JSON/text file or directory, or a
  Hub dataset (optionally streamed). Documents are the `text` field (`--text_field`).
* Held-out evaluation data: the source's validation/test split if it has one, otherwise the head of a fixed
  (seed-independent) order of the training documents, removed from training. Every seed and variant evaluates on the
  same rows.
* Packing (:func:`pack_documents`): each document becomes `[bos] + tokens + [eos]`; documents are concatenated into
  rows of exactly `max_length` tokens; position ids restart at 0 where a document starts (and at each row start, where
  a document continued from the previous row becomes a new segment). Rows carry no attention mask, so transformers
  builds a block-diagonal causal mask from the position ids (no attention across documents with eager/sdpa/flex, the
  varlen path with flash attention) and PolyGLU's causal pooling restarts per document. The first token of each
  segment is not a target (`labels = -100`): nothing before it in the row belongs to its document.
* :class:`PackedRowStream` — the training rows as an endless torch IterableDataset: epoch e visits the documents in
  the order seeded by (seed, e), so the same seed gives every variant the same data order.
"""

import random
import string
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

EMBEDDED_DATASET = "python-stdlib"
HELD_OUT_ORDER_SEED = 0  # fixed: the evaluation documents do not depend on the run's seed
EVAL_SPLIT_NAMES = ("validation", "test", "eval")
_SKIPPED_STDLIB_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_TOKENIZE_CHUNK = 4  # documents per tokenizer call (few: the first row is ready soon)


def stdlib_source_files() -> list[Path]:
    """This interpreter's standard-library `.py` files (tests and installed packages excluded), in a sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        path for path in root.rglob("*.py") if not _SKIPPED_STDLIB_PARTS.intersection(path.relative_to(root).parts)
    )
    if not files:
        raise ValueError(
            f"The embedded corpus {EMBEDDED_DATASET!r} needs the standard library's .py sources, and {root} has none; "
            "pass --dataset with a local file or a Hub dataset."
        )
    return files


def build_ascii_tokenizer():
    """A character tokenizer over printable ASCII (ids 0..3 are <pad>, <bos>, <eos>, <unk>), built locally."""
    from ..char_tokenizer import build_char_tokenizer

    return build_char_tokenizer([string.printable])


def _read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


class ListDocuments:
    """Documents held as a list of texts or of files read on demand."""

    def __init__(self, items: list, read=None):
        self.items, self.read = items, read or (lambda item: item)

    def ordered(self) -> Iterator[str]:
        return (self.read(item) for item in self.items)

    def without_head(self, count: int) -> "ListDocuments":
        return ListDocuments(self.items[count:], self.read)

    def fixed_shuffle(self, seed: int) -> "ListDocuments":
        items = list(self.items)
        random.Random(seed).shuffle(items)
        return ListDocuments(items, self.read)

    def epoch(self, seed: int, epoch: int) -> Iterator[str]:
        order = list(range(len(self.items)))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        return (self.read(self.items[index]) for index in order)


class DatasetDocuments:
    """Documents of a `datasets.Dataset` (map-style) or `datasets.IterableDataset` (streaming) text column."""

    def __init__(self, dataset, text_field: str):
        columns = dataset.column_names
        if columns is not None and text_field not in columns:
            raise ValueError(f"The dataset has no {text_field!r} column (columns: {', '.join(columns)}); pass --text_field NAME.")
        self.dataset, self.text_field = dataset, text_field
        self.streaming = not hasattr(dataset, "__len__")

    def ordered(self) -> Iterator[str]:
        return self._texts(self.dataset)

    def _texts(self, dataset) -> Iterator[str]:
        for example in dataset:
            text = example[self.text_field]
            if not isinstance(text, str):
                raise ValueError(f"The {self.text_field!r} field must hold strings; found {type(text).__name__}.")
            yield text

    def without_head(self, count: int) -> "DatasetDocuments":
        if self.streaming:
            return DatasetDocuments(self.dataset.skip(count), self.text_field)
        return DatasetDocuments(self.dataset.select(range(count, len(self.dataset))), self.text_field)

    def fixed_shuffle(self, seed: int) -> "DatasetDocuments":
        if self.streaming:
            return self  # a stream's held-out documents are simply its first ones
        return DatasetDocuments(self.dataset.shuffle(seed=seed), self.text_field)

    def epoch(self, seed: int, epoch: int) -> Iterator[str]:
        if self.streaming:
            stream = self.dataset.shuffle(seed=seed, buffer_size=10_000)
            stream.set_epoch(epoch)
            return self._texts(stream)
        return self._texts(self.dataset.shuffle(seed=seed * 1_000_003 + epoch))


def _local_data_files(path: Path) -> tuple[str, dict]:
    """(datasets builder, {split: files}) of a local file or directory of .jsonl/.json or .txt files."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    by_builder = {"json": [p for p in files if p.suffix in (".json", ".jsonl")], "text": [p for p in files if p.suffix == ".txt"]}
    builders = [name for name, found in by_builder.items() if found]
    if len(builders) != 1:
        what = "both JSON and .txt files" if builders else "no .jsonl, .json or .txt files"
        raise ValueError(f"{path}: {what}; give one file or a directory of one kind.")
    splits = {}
    for file in by_builder[builders[0]]:
        split = "validation" if file.stem in EVAL_SPLIT_NAMES else "train"
        splits.setdefault(split, []).append(str(file))
    if "train" not in splits:
        raise ValueError(f"{path}: only evaluation files ({', '.join(EVAL_SPLIT_NAMES)}); add training files.")
    return builders[0], splits


def load_documents(name: str, config_name: Optional[str] = None, text_field: str = "text", streaming: bool = False):
    """(train documents, evaluation documents or None) of the embedded corpus, a local path or a Hub dataset.

    Text files give one document per paragraph (blank-line separated). Without an evaluation split the caller holds
    out the head of `train.fixed_shuffle(...)`.
    """
    if name == EMBEDDED_DATASET and not Path(name).exists():
        return ListDocuments(stdlib_source_files(), _read_source), None
    from datasets import load_dataset

    path = Path(name)
    if path.exists():
        builder, data_files = _local_data_files(path)
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        dataset = load_dataset(builder, data_files=data_files, streaming=streaming, **options)
    else:
        try:
            dataset = load_dataset(name, name=config_name, streaming=streaming)
        except (ConnectionError, FileNotFoundError) as error:  # offline, or no such dataset
            raise ValueError(f"Cannot load the dataset {name!r} ({error}); give an existing local path, a reachable "
                             f"Hub dataset, or {EMBEDDED_DATASET!r}.") from None
    if "train" not in dataset:
        raise ValueError(f"{name} has no 'train' split (splits: {', '.join(dataset)}).")
    evaluation = next((split for split in EVAL_SPLIT_NAMES if split in dataset), None)
    return (
        DatasetDocuments(dataset["train"], text_field),
        DatasetDocuments(dataset[evaluation], text_field) if evaluation else None,
    )


def document_token_ids(texts: list[str], tokenizer) -> list[list[int]]:
    """`[bos] + tokens + [eos]` per text (bos only where the tokenizer has one)."""
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    suffix = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [prefix + ids + suffix for ids in encoded]


def positions_from_starts(starts: list[bool]) -> list[int]:
    """Position ids of one row: 0 at the row start and wherever a segment starts, +1 otherwise."""
    positions, current = [], -1
    for index, start in enumerate(starts):
        current = 0 if (start or index == 0) else current + 1
        positions.append(current)
    return positions


def pack_documents(token_lists: Iterable[list[int]], max_length: int, truncate: bool = False) -> Iterator[dict]:
    """Rows of exactly `max_length` tokens: {"input_ids", "position_ids", "labels"} as lists (see the module doc).

    `truncate` keeps only each document's first `max_length` tokens (evaluation: many documents, not one long one).
    The final partial row is dropped.
    """
    buffer_ids: list[int] = []
    buffer_starts: list[bool] = []
    for ids in token_lists:
        if truncate:
            ids = ids[:max_length]
        if not ids:
            continue
        buffer_ids.extend(ids)
        buffer_starts.extend([True] + [False] * (len(ids) - 1))
        while len(buffer_ids) >= max_length:
            row_ids, row_starts = buffer_ids[:max_length], buffer_starts[:max_length]
            del buffer_ids[:max_length], buffer_starts[:max_length]
            positions = positions_from_starts(row_starts)
            labels = [-100 if position == 0 else token for token, position in zip(row_ids, positions)]
            yield {"input_ids": row_ids, "position_ids": positions, "labels": labels}


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenized(texts: Iterable[str], tokenizer) -> Iterator[list[int]]:
    for chunk in _chunks(texts, _TOKENIZE_CHUNK):
        yield from document_token_ids(chunk, tokenizer)


def as_tensors(row: dict) -> dict:
    return {key: torch.tensor(value, dtype=torch.long) for key, value in row.items()}


def held_out_rows(documents, tokenizer, max_length: int, num_rows: int) -> tuple[list[dict], int]:
    """(up to `num_rows` evaluation rows packed from truncated documents, number of documents they used)."""
    rows, used = [], 0

    def token_lists():
        nonlocal used
        for text in documents.ordered():  # one document at a time: `used` counts exactly those in the rows
            used += 1
            yield document_token_ids([text], tokenizer)[0]

    for row in pack_documents(token_lists(), max_length, truncate=True):
        rows.append(as_tensors(row))
        if len(rows) == num_rows:
            break
    return rows, used


class PackedRowStream(torch.utils.data.IterableDataset):
    """Endless packed training rows; epoch e reads the documents in the order seeded by (seed, e)."""

    def __init__(self, documents, tokenizer, max_length: int, seed: int):
        self.documents, self.tokenizer, self.max_length, self.seed = documents, tokenizer, max_length, seed

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        shard, shards = (worker.id, worker.num_workers) if worker else (0, 1)
        epoch, index = 0, 0
        while True:
            produced = False
            rows = pack_documents(_tokenized(self.documents.epoch(self.seed, epoch), self.tokenizer), self.max_length)
            for row in rows:
                produced = True
                if index % shards == shard:  # DataLoader workers split the rows instead of repeating them
                    yield as_tensors(row)
                index += 1
            if not produced:
                raise ValueError(f"The training documents do not fill a single row of {self.max_length} tokens.")
            epoch += 1

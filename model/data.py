"""Training data: corpus discovery, reading, train/validation split, token streams and batches.

Batches are a pure function of (seed, epoch, position), so a resumed run sees exactly the batches
an uninterrupted one would, and data-parallel ranks take disjoint slices of one global batch.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.tokenizer import Tokenizer

DEFAULT_EXTENSIONS = (".py", ".txt", ".md")
MIN_FILES_FOR_HASH_SPLIT = 10


class DataError(ValueError):
    """Training data that cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def stdlib_files() -> list[Path]:
    """The Python standard library's own source: a corpus every machine already has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def _decode(path: Path) -> str | None:
    """The file's text, or None when it is binary (has NUL bytes) or not UTF-8."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_corpus(specs: list[str] | None, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS) -> list[Document]:
    """Read files, directories (walked for `extensions`) and globs; None means the stdlib source.

    A file named explicitly must be UTF-8 text; files found by walking a directory that are
    binary or not UTF-8 are skipped, since real trees hold a few (the stdlib has test fixtures).
    """
    named: list[Path] = []
    walked: list[tuple[Path, Path]] = []
    if specs is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        walked = [(root, p) for p in stdlib_files()]
    for spec in specs or []:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in extensions)
            if not found:
                raise DataError(f"{spec}: directory has no files ending in {', '.join(extensions)}")
            walked += [(path, p) for p in found]
        elif path.is_file():
            named.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{spec}: no such file or directory, and no file matches it as a glob")
            named += matches
    docs: list[Document] = []
    for path in named:
        text = _decode(path)
        if text is None:
            raise DataError(f"{path}: binary or not UTF-8 text")
        if text.strip():
            docs.append(Document(str(path), text))
    for root, path in walked:
        text = _decode(path)
        if text is not None and text.strip():
            docs.append(Document(str(path.relative_to(root)), text))
    if not docs:
        raise DataError(f"no text found in {', '.join(specs) if specs else 'the standard library'}")
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split: whole files by name hash when there are many, else the tail of each."""
    if len(docs) >= MIN_FILES_FOR_HASH_SPLIT:
        train, val = [], []
        for doc in docs:
            bucket = int.from_bytes(hashlib.sha256(doc.name.encode()).digest()[:8], "big") / 2**64
            (val if bucket < val_fraction else train).append(doc)
        if val and train:
            return train, val
    train, val = [], []
    for doc in docs:
        cut = len(doc.text) - max(1, int(len(doc.text) * val_fraction))
        train.append(Document(doc.name, doc.text[:cut]))
        val.append(Document(doc.name, doc.text[cut:]))
    return train, val


def sample_prompt(docs: list[Document], max_chars: int = 100) -> str:
    """The opening of the first document, cut after its last whole line within `max_chars`: a prompt
    in the training data's own style for the sample a run prints at its end."""
    head = docs[0].text.lstrip()[:max_chars]
    cut = head.rfind("\n") + 1
    return head[:cut] if cut > 0 else head


def token_stream(docs: list[Document], tokenizer: Tokenizer) -> Tensor:
    """All documents as one int32 stream, each preceded by the end-of-text token that separates them."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-text token to separate documents")
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode_batch([d.text for d in docs])
    return torch.cat([torch.tensor([eos, *doc_ids], dtype=torch.int32) for doc_ids in ids])


class Batches:
    """Non-overlapping windows of `seq_len + 1` tokens, reshuffled each epoch from the seed.

    One optimizer step consumes `global_batch` windows; rank r of a data-parallel group takes the
    r-th slice of each micro-step, so the union over ranks is what one process would have used.
    """

    def __init__(self, stream: Tensor, seq_len: int, global_batch: int, seed: int) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < global_batch:
            raise DataError(
                f"training data has {len(stream)} tokens: too few for a batch of {global_batch} "
                f"sequences of {seq_len} tokens; use less --batch-size/--grad-accum/--seq-len or more data"
            )
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.num_windows, generator=gen)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()

    def next_step(self, rank: int, world_size: int, micro_batch: int) -> list[tuple[Tensor, Tensor]]:
        """This rank's (inputs, targets) micro-batches for the next optimizer step."""
        if self.position + self.global_batch > self.num_windows:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        window = self._order[self.position : self.position + self.global_batch]
        self.position += self.global_batch
        starts = window * self.seq_len
        offsets = torch.arange(self.seq_len + 1)
        chunks = self.stream[starts[:, None] + offsets].long()
        out = []
        per_micro = micro_batch * world_size
        for m in range(self.global_batch // per_micro):
            mine = chunks[m * per_micro + rank * micro_batch : m * per_micro + (rank + 1) * micro_batch]
            out.append((mine[:, :-1], mine[:, 1:]))
        return out


def eval_windows(stream: Tensor, seq_len: int) -> list[tuple[Tensor, Tensor]]:
    """Every token after the first predicted exactly once, in windows of at most `seq_len`."""
    out = []
    for start in range(0, len(stream) - 1, seq_len):
        chunk = stream[start : start + seq_len + 1].long()
        out.append((chunk[:-1], chunk[1:]))
    return out

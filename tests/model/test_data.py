"""Corpus discovery, splits, token streams and resumable, rank-sliced batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.data import (
    Batches,
    DataError,
    Document,
    eval_windows,
    read_corpus,
    split_documents,
    stdlib_files,
    token_stream,
)
from model.tokenizer import Tokenizer


def _tree(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("print('a')\n")
    (root / "pkg" / "b.md").write_text("# b\n")
    (root / "pkg" / "c.bin").write_bytes(b"\x00\x01")
    (root / "pkg" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "pkg" / "empty.txt").write_text("  \n")
    return root


def test_directories_are_walked_for_extensions_and_skip_undecodable(tmp_path: Path) -> None:
    docs = read_corpus([str(_tree(tmp_path))])
    assert [d.name for d in docs] == ["pkg/a.py", "pkg/b.md"]
    assert read_corpus([str(tmp_path)], extensions=(".md",))[0].text == "# b\n"


def test_files_and_globs(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert [d.text for d in read_corpus([str(tmp_path / "pkg" / "a.py")])] == ["print('a')\n"]
    assert len(read_corpus([str(tmp_path / "**" / "*.py"), str(tmp_path / "pkg" / "b.md")])) == 2


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("c.bin", "binary or not UTF-8"),
        ("latin1.txt", "binary or not UTF-8"),
        ("empty.txt", "no text found"),
        ("missing.txt", "no such file or directory"),
    ],
)
def test_bad_named_files_are_errors(tmp_path: Path, name: str, message: str) -> None:
    _tree(tmp_path)
    with pytest.raises(DataError, match=message):
        read_corpus([str(tmp_path / "pkg" / name)])


def test_directory_without_matching_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no files ending in"):
        read_corpus([str(tmp_path)])


def test_stdlib_corpus_excludes_site_packages() -> None:
    files = stdlib_files()
    assert len(files) > 500
    assert any(f.name == "textwrap.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_split_by_file_hash_is_deterministic_and_whole_files() -> None:
    docs = [Document(f"f{i}.py", f"text {i}") for i in range(200)]
    train, val = split_documents(docs, 0.1)
    assert 5 < len(val) < 40
    assert sorted(d.name for d in train + val) == sorted(d.name for d in docs)
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))


def test_split_of_one_file_takes_the_tail() -> None:
    train, val = split_documents([Document("one.txt", "abcdefghij" * 10)], 0.1)
    assert train[0].text + val[0].text == "abcdefghij" * 10
    assert len(val[0].text) == 10


def test_token_stream_separates_documents_with_eos(tiny_checkpoint: Path) -> None:
    tok = Tokenizer.load(tiny_checkpoint)
    stream = token_stream([Document("a", "hello"), Document("b", "world")], tok)
    eos = tok.eos_token_id
    assert stream.dtype == torch.int32
    assert stream.tolist() == [eos, *tok.encode("hello"), eos, *tok.encode("world")]


def test_batches_are_resumable_and_cover_an_epoch_once() -> None:
    stream = torch.arange(1 + 10 * 4, dtype=torch.int32)  # 10 windows of 4 tokens
    a = Batches(stream, seq_len=4, global_batch=3, seed=7)
    ((inputs, targets),) = a.next_step(rank=0, world_size=1, micro_batch=3)
    assert torch.equal(targets, inputs + 1)
    state = a.state_dict()
    expected = [a.next_step(0, 1, 3)[0][0] for _ in range(4)]
    b = Batches(stream, seq_len=4, global_batch=3, seed=7)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_step(0, 1, 3)[0][0]) for x in expected)
    assert b.state_dict() == {"epoch": 1, "position": 6}  # 3 steps fit in an epoch of 10 windows
    starts = [inputs[:, 0]] + [x[:, 0] for x in expected[:2]]
    assert sorted(torch.cat(starts).tolist()) == sorted(set(torch.cat(starts).tolist()))


def test_ranks_take_disjoint_slices_of_the_single_process_batch() -> None:
    stream = torch.arange(1 + 64 * 8, dtype=torch.int32)
    single = Batches(stream, 8, global_batch=8, seed=1).next_step(0, 1, micro_batch=2)
    ranks = [Batches(stream, 8, global_batch=8, seed=1).next_step(r, 2, micro_batch=2) for r in range(2)]
    assert len(single) == 4 and all(len(r) == 2 for r in ranks)
    for m in range(2):  # micro-step m of the 2 ranks = micro-steps 2m, 2m+1 of one process
        assert torch.equal(ranks[0][m][0], single[2 * m][0])
        assert torch.equal(ranks[1][m][0], single[2 * m + 1][0])


def test_too_little_data_for_a_batch() -> None:
    with pytest.raises(DataError, match="too few for a batch"):
        Batches(torch.arange(20, dtype=torch.int32), seq_len=8, global_batch=4, seed=0)


def test_eval_windows_predict_every_token_once() -> None:
    stream = torch.arange(23)
    windows = eval_windows(stream, 5)
    assert [len(x) for x, _ in windows] == [5, 5, 5, 5, 2]
    assert torch.cat([y for _, y in windows]).tolist() == list(range(1, 23))

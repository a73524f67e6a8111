"""Incremental text: split characters held back, stop strings never leaked, pieces add up."""

from __future__ import annotations

from server.engine.detokenizer import IncrementalDetokenizer

EMOJI = "😀".encode()  # four bytes
TOKENS = [b"Hi ", EMOJI[:2], EMOJI[2:], b" \xe4\xbd", b"\xa0\xe5\xa5\xbd", b" END", b"ING", b" tail"]


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], str | None]:
    pieces: list[str] = []
    for i in ids:
        stop = detok.add(i)
        if stop is not None:
            detok.finish()
            pieces.append(detok.delta(final=True))
            return pieces, stop
        pieces.append(detok.delta(final=False))
    detok.finish()
    pieces.append(detok.delta(final=True))
    return pieces, None


def test_split_characters_are_held_back_until_complete() -> None:
    pieces, stop = stream(IncrementalDetokenizer(TOKENS, ()), list(range(len(TOKENS))))
    assert stop is None
    assert pieces[1] == "" and pieces[2] == "😀"
    assert pieces[3] == " " and pieces[4] == "你好"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == b"".join(TOKENS).decode()


def test_stop_string_spanning_tokens_is_cut_and_never_leaked() -> None:
    pieces, stop = stream(IncrementalDetokenizer(TOKENS, ("ENDING", "zzz")), list(range(len(TOKENS))))
    assert stop == "ENDING"
    assert "".join(pieces) == "Hi 😀 你好 "
    assert not any("END" in p for p in pieces)


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    pieces, stop = stream(IncrementalDetokenizer(TOKENS, ("ENDX",)), list(range(len(TOKENS))))
    assert stop is None
    assert pieces[5] == " " and pieces[6] == "ENDING"  # "END" waited one token, then went out
    assert "".join(pieces) == b"".join(TOKENS).decode()


def test_truncated_character_at_the_end_becomes_a_replacement_like_a_full_decode() -> None:
    pieces, _ = stream(IncrementalDetokenizer(TOKENS, ()), [0, 1])
    assert "".join(pieces) == (b"Hi " + EMOJI[:2]).decode(errors="replace")

"""text: vocabulary, contiguous split, window targets, compact storage, encode/decode."""

from __future__ import annotations

import pytest
import torch

from singlestep.data.text import build_text, decode, encode
from singlestep.errors import DataError

CPU = torch.device("cpu")
CORPUS = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


def test_vocab_is_the_sorted_distinct_characters(corpus_file):
    bundle = build_text(CPU, path=str(corpus_file), block_size=8)
    meta = bundle.meta
    assert meta.extras["vocab"] == sorted(set(CORPUS))
    assert (meta.task, meta.input_shape, meta.block_size) == ("lm", (8,), 8)
    assert meta.vocab_size == len(set(CORPUS)) == meta.extras["vocab_size"]
    assert meta.extras["level"] == "char" and meta.extras["block_size"] == 8
    assert bundle.test is None
    assert bundle.train.tokens.dtype == torch.uint8  # 256 or fewer symbols: one byte per token


def test_split_is_contiguous_at_the_val_fraction(corpus_file):
    bundle = build_text(CPU, path=str(corpus_file), block_size=8, val_fraction=0.25)
    n = len(CORPUS)
    n_val = round(n * 0.25)
    extras = bundle.meta.extras
    assert decode(bundle.train.tokens.tolist(), extras) == CORPUS[: n - n_val]
    assert decode(bundle.val.tokens.tolist(), extras) == CORPUS[n - n_val :]
    assert len(bundle.train) == n - n_val - 8  # every offset
    assert len(bundle.val) == (n_val - 1) // 8  # windows end to end, each with its next-token target


def test_validation_windows_do_not_overlap(corpus_file):
    bundle = build_text(CPU, path=str(corpus_file), block_size=8, val_fraction=0.25)
    val_text = decode(bundle.val.tokens.tolist(), bundle.meta.extras)
    x, y = bundle.val.get(torch.arange(len(bundle.val)))
    seen = "".join(decode(row.tolist(), bundle.meta.extras) for row in x)
    assert seen == val_text[: len(seen)] and len(val_text) - len(seen) <= 8
    assert decode(y[-1].tolist(), bundle.meta.extras) == val_text[len(seen) - 7 : len(seen) + 1]


def test_windows_and_targets_are_offset_by_one(corpus_file):
    bundle = build_text(CPU, path=str(corpus_file), block_size=10, val_fraction=0.0)
    assert bundle.val is None
    idx = torch.tensor([0, 7, len(bundle.train) - 1])
    x, y = bundle.train.get(idx)
    assert x.shape == y.shape == (3, 10) and x.dtype == y.dtype == torch.int64
    extras = bundle.meta.extras
    for row, i in enumerate(idx.tolist()):
        assert decode(x[row].tolist(), extras) == CORPUS[i : i + 10]
        assert decode(y[row].tolist(), extras) == CORPUS[i + 1 : i + 11]


def test_encode_decode_round_trip_and_unknown_characters(corpus_file):
    extras = build_text(CPU, path=str(corpus_file), block_size=8).meta.extras
    ids = encode("the mind", extras)
    assert ids == [extras["vocab"].index(c) for c in "the mind"]
    assert decode(ids, extras) == "the mind"
    with pytest.raises(ValueError, match=r"'Z', '!'"):
        encode("Zt!Z", extras)


def test_large_vocab_uses_wider_tokens(tmp_path):
    text = "".join(chr(0x400 + i) for i in range(300)) * 2  # 300 distinct Cyrillic-and-beyond chars
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    bundle = build_text(CPU, path=str(path), block_size=4)
    assert bundle.meta.vocab_size == 300
    assert bundle.train.tokens.dtype == torch.int16
    assert decode(bundle.train.tokens[:5].tolist(), bundle.meta.extras) == text[:5]


def test_globs_and_lists_join_files_on_line_boundaries(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")  # no final newline
    (tmp_path / "skip.md").write_text("not matched", encoding="utf-8")
    globbed = build_text(CPU, path=str(tmp_path / "*.txt"), block_size=4, val_fraction=0.0)
    assert decode(globbed.train.tokens.tolist(), globbed.meta.extras) == "first file\nsecond file\n"
    listed = build_text(CPU, path=[str(tmp_path / "b.txt"), str(tmp_path / "a.txt")], block_size=4, val_fraction=0.0)
    assert decode(listed.train.tokens.tolist(), listed.meta.extras) == "second file\nfirst file"


def test_byte_level_reads_any_bytes(tmp_path):
    path = tmp_path / "raw.bin"
    data = bytes([0, 255, 7, 7, 128]) * 10
    path.write_bytes(data)
    bundle = build_text(CPU, path=str(path), block_size=4, level="byte", val_fraction=0.0)
    assert bundle.meta.extras["vocab"] == [0, 7, 128, 255]
    x, _ = bundle.train.get(torch.tensor([1]))
    assert [bundle.meta.extras["vocab"][i] for i in x[0].tolist()] == list(data[1:5])
    text_path = tmp_path / "utf8.txt"
    text_path.write_text("héllo héllo héllo", encoding="utf-8")
    extras = build_text(CPU, path=str(text_path), block_size=4, level="byte", val_fraction=0.0).meta.extras
    assert decode(encode("hé", extras), extras) == "hé"


def test_char_level_refuses_non_utf8_naming_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as err:
        build_text(CPU, path=str(path), block_size=2)
    assert str(path) in str(err.value) and "level: byte" in str(err.value)


def test_bad_paths_and_values(tmp_path, corpus_file):
    with pytest.raises(DataError, match="no such file"):
        build_text(CPU, path=str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="matches no files"):
        build_text(CPU, path=str(tmp_path / "*.nothing"))
    with pytest.raises(DataError, match="is a folder"):
        build_text(CPU, path=str(tmp_path))
    with pytest.raises(ValueError, match="level"):
        build_text(CPU, path=str(corpus_file), level="word")
    with pytest.raises(ValueError, match="val_fraction"):
        build_text(CPU, path=str(corpus_file), val_fraction=1.0)
    with pytest.raises(ValueError, match="validation tokens"):
        build_text(CPU, path=str(corpus_file), block_size=64, val_fraction=0.1)
    with pytest.raises(DataError, match=r"block_size \+ 1 = 10001"):  # the data's fault, not a setting's
        build_text(CPU, path=str(corpus_file), block_size=10_000)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        build_text(CPU, path=str(empty))

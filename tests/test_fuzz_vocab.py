"""Property-based fuzzing of the char and word tokenizers: encode/decode round trips hold, and any
text gets ids, a skip, <unk>, or UnknownTokensError naming the symbols, never anything else
(lstmgen/text.py `encode`, through Vocab.encode)."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstmgen.vocab import EOS, UnknownTokensError, Vocab

FUZZ = settings(max_examples=int(os.environ.get("LSTMGEN_FUZZ_EXAMPLES", "200")), deadline=None, database=None)
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
corpus = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=300)


@FUZZ
@given(train=corpus, data=st.data())
def test_char_round_trip(train, data):
    v = Vocab.build("char", [train])
    ids = data.draw(st.lists(st.integers(0, len(v) - 1), max_size=100))
    assert v.encode(v.decode(ids)) == ids
    text = data.draw(st.text(st.sampled_from(v.tokens), max_size=100))
    assert v.decode(v.encode(text)) == text


@FUZZ
@given(train=corpus, text=texts)
def test_char_unknown_policies(train, text):
    v = Vocab.build("char", [train])
    unknown = [ch for ch in text if ch not in v.stoi]
    kept = v.encode(text, skip_unknown=True)
    assert v.decode(kept) == "".join(ch for ch in text if ch in v.stoi)
    if unknown:
        with pytest.raises(UnknownTokensError) as e:
            v.encode(text)
        assert e.value.unknown == list(dict.fromkeys(unknown))
    else:
        assert v.encode(text) == kept


@FUZZ
@given(train=corpus, data=st.data())
def test_word_round_trip(train, data):
    v = Vocab.build("word", [train])
    ids = data.draw(st.lists(st.integers(0, len(v) - 1), max_size=50))
    assert v.encode(v.decode(ids)) == ids  # " w" pieces and "\n" for <eos> split back the same way


@FUZZ
@given(train=corpus, text=texts, with_unk=st.booleans())
def test_word_any_text(train, text, with_unk):
    v = Vocab.build("word", [train + (" <unk>" if with_unk else "")])
    for skip in (True, False):
        try:
            ids = v.encode(text, skip_unknown=skip)
        except UnknownTokensError as e:
            assert not skip and v.unk_id is None  # <unk> stands for every unknown word when there is one
            assert e.unknown and all(w not in v.stoi for w in e.unknown)
            continue
        assert all(0 <= i < len(v) for i in ids)
        assert ids.count(v.stoi[EOS]) >= text.count("\n")  # a literal "<eos>" word is a line end too (PTB)
        assert v.encode(v.decode(ids), skip_unknown=skip) == ids  # decoding normalises whitespace only

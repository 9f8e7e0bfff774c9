"""lstmgen.vocab: building, encoding and decoding at char and word level (torch-free); the encoder
itself is lstmgen/text.py's (tests/test_text_pipeline.py)."""
from __future__ import annotations

import pytest

from lstmgen.text import encode
from lstmgen.vocab import EOS, UNK, UnknownTokensError, Vocab


def test_char_round_trip():
    text = "Hello, world!\n\tcafé ☃\n"
    v = Vocab.build("char", [text])
    assert list(v.tokens) == sorted(set(text))
    assert v.decode(v.encode(text)) == text
    assert encode(v, text, lines=True).ids.tolist() == v.encode(text)  # a file's text: no <eos> at char level
    assert v.eos_id is None and v.unk_id is None


def test_build_is_deterministic_across_text_order():
    a = Vocab.build("word", ["b a\n", "c a\n"])
    b = Vocab.build("word", ["c a\n", "b a\n"])
    assert a == b and EOS in a.tokens


def test_word_encode_adds_eos_per_line_and_decodes():
    v = Vocab.build("word", ["the cat sat\nthe dog\n"])
    ids = encode(v, "the cat sat\nthe dog", lines=True).ids.tolist()  # a file's last line ends in <eos>
    assert [v.tokens[i] for i in ids] == ["the", "cat", "sat", EOS, "the", "dog", EOS]
    assert v.decode(ids) == " the cat sat\n the dog\n"
    # encode() marks every newline; text without a final newline gets no final <eos>
    assert [v.tokens[i] for i in v.encode("the dog\nthe")] == ["the", "dog", EOS, "the"]


def test_word_unknown_maps_to_unk_when_present():
    v = Vocab.build("word", [f"a b {UNK}\n"])
    ids = v.encode("a zebra b")
    assert [v.tokens[i] for i in ids] == ["a", UNK, "b"]
    assert v.encode("a zebra b", skip_unknown=True) == ids  # <unk> stands for it: nothing to skip


def test_unknown_symbols_raise_and_are_named():
    v = Vocab.build("word", ["a b\n"])
    with pytest.raises(UnknownTokensError) as e:
        v.encode("a zebra yak zebra")  # no <unk> in this vocab
    assert e.value.unknown == ["zebra", "yak"] and "'zebra'" in str(e.value)
    assert "2 word(s) not in the vocabulary, which has no <unk>" in str(e.value)
    assert [v.tokens[i] for i in v.encode("a zebra b", skip_unknown=True)] == ["a", "b"]
    c = Vocab.build("char", ["abc"])
    with pytest.raises(UnknownTokensError, match="1 character\\(s\\) not in the vocabulary: 'z'"):
        c.encode("abz")


def test_dict_round_trip_and_validation():
    v = Vocab.build("word", ["x y\n"])
    assert Vocab.from_dict(v.to_dict()) == v
    with pytest.raises(ValueError):
        Vocab("char", ("ab",))
    with pytest.raises(ValueError):
        Vocab("word", ("a", "a"))
    with pytest.raises(ValueError):
        Vocab("byte", ("a",))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Vocab("char", ())


def test_piece():
    v = Vocab.build("word", ["hi\n"])
    assert v.piece(v.stoi["hi"]) == " hi" and v.piece(v.stoi[EOS]) == "\n"

from lstmgen.serve.stopping import FinishReason, StopChecker


def feed(checker, pieces):
    out, reason = [], None
    for i, p in enumerate(pieces):
        text, reason = checker.add(i, p)
        out.append(text)
        if reason:
            break
    return "".join(out), reason


def test_length():
    text, reason = feed(StopChecker(3), list("abcdef"))
    assert (text, reason) == ("abc", FinishReason.LENGTH)


def test_stop_sequence_cut_and_never_leaked():
    c = StopChecker(100, stop=("END",))
    released = []
    for i, p in enumerate("abEN"):
        released.append(c.add(i, p)[0])
    assert "".join(released) == "ab"  # "EN" held back: it may become "END"
    text, reason = c.add(4, "D")
    assert reason is FinishReason.STOP_SEQUENCE and text == "" and c.matched == "END"


def test_held_back_text_released_when_match_fails():
    text, reason = feed(StopChecker(100, stop=("END",)), list("abENx") + ["y"] * 3)
    assert reason is None and text == "abENxyyy"


def test_stop_across_multichar_pieces_and_earliest_wins():
    c = StopChecker(100, stop=("cat", "at the"))
    text, reason = feed(c, [" the", " cat", " sat"])
    assert reason is FinishReason.STOP_SEQUENCE and text == " the " and c.matched == "cat"


def test_length_flushes_held_back_text():
    text, reason = feed(StopChecker(3, stop=("xyz",)), list("axy"))
    assert (text, reason) == ("axy", FinishReason.LENGTH)


def test_end_of_text_token():
    c = StopChecker(10, eot_id=99)
    assert c.add(1, "a") == ("a", None)
    assert c.add(99, "\x03") == ("", FinishReason.END_OF_TEXT)


def test_stop_literal_not_regex():
    text, reason = feed(StopChecker(100, stop=(".*",)), list("ab.c.*d"))
    assert reason is FinishReason.STOP_SEQUENCE and text == "ab.c"

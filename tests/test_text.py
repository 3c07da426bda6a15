"""Stop handling and streaming text."""

from fakes import CharTokenizer
from tokenrecycle.text import OutputAssembler

PIECES = ["<eos>", "Hel", "lo", " wor", "ld", "!", "\n", "##", "#", "END", "x"]


def assembler(stop=(), max_new=100):
    return OutputAssembler(CharTokenizer(PIECES), eos_ids={0}, stop_strings=list(stop), max_new_tokens=max_new)


def test_max_new_tokens_is_exact_within_one_step():
    a = assembler(max_new=3)
    a.add([1, 2, 3, 4, 5])
    assert a.tokens == [1, 2, 3] and a.stop_reason == "length" and a.text == "Hello wor"


def test_eos_is_kept_in_ids_not_in_text():
    a = assembler()
    a.add([1, 2, 0, 3])
    assert a.tokens == [1, 2, 0] and a.text == "Hello" and a.stop_reason == "eos"


def test_stop_string_spanning_two_tokens():
    a = assembler(stop=["lo w"])
    shown = a.add([1, 2]) + a.add([3, 4])
    assert a.tokens == [1, 2, 3]  # ends with the token that completed the stop string
    assert a.text == "Hel" and shown == "Hel" and a.stop_reason == "stop"


def test_stop_string_inside_one_step_stops_at_the_completing_token():
    a = assembler(stop=["###"])
    a.add([1, 7, 8, 10, 10])
    assert a.tokens == [1, 7, 8] and a.text == "Hel" and a.stop_reason == "stop"


def test_text_that_may_begin_a_stop_string_is_held_back():
    a = assembler(stop=["!\nEND"])
    assert a.add([1, 2]) == "Hello"
    assert a.add([5]) == ""  # "!" might start the stop string
    assert a.add([6]) == ""
    assert a.add([3]) == "!\n wor"  # it did not
    assert not a.done


def test_streamed_pieces_add_up_to_the_text():
    a = assembler(stop=["ld!"], max_new=50)
    pieces = [a.add([t]) for t in [1, 2, 3, 4, 6, 3, 4, 5, 1]]
    assert "".join(pieces) == a.text == "Hello world\n wor"
    assert a.stop_reason == "stop"

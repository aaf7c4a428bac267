"""The text of a streamed completion, token by token (`CompletionText`): its pieces concatenate to the text a whole
completion gets, which is cut at the first stop sequence to appear, after EOS, or at the last token; nothing sent is
ever taken back, and nothing is held back longer than an unfinished character or a possible stop."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from k2_workers.serve.openai_response import CompletionText, Output, text_pieces
from k2_workers.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
EOS = TOKENIZER.eos_id
# bytes that make ASCII, two- and three-byte UTF-8 characters, stray continuation bytes, and EOS
tokens = st.lists(
    st.one_of(st.sampled_from([*b"ab .", 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0x80, EOS]), st.integers(0, 255)), max_size=40
)
stops = st.lists(st.text(alphabet="ab .é€", min_size=1, max_size=4), max_size=4)


def reference(ids: list[int], stop_sequences: list[str]) -> Output:
    """The completion by its definition: the first prefix in which a stop appears, else up to EOS or the end."""
    shown = ids[: ids.index(EOS)] if EOS in ids else ids
    for k in range(1, len(shown) + 1):
        text = TOKENIZER.decode(shown[:k])
        cuts = [i for i in (text.find(s) for s in stop_sequences) if i >= 0]
        if cuts:
            return Output(text[: min(cuts)], k, "stop")
    counted = len(shown) + 1 if EOS in ids else len(shown)
    return Output(TOKENIZER.decode(shown), counted, "stop" if EOS in ids else "length")


@settings(max_examples=400, deadline=None)
@given(tokens, stops)
def test_the_pieces_concatenate_to_the_completion_cut_where_it_ends(ids: list[int], stop_sequences: list[str]) -> None:
    text = CompletionText(TOKENIZER.decode, EOS, stop_sequences)
    pieces = list(text_pieces(ids, text))
    output, expected = text.output(), reference(ids, stop_sequences)
    assert "".join(pieces) == output.text == expected.text
    assert (output.completion_tokens, output.finish_reason) == (expected.completion_tokens, expected.finish_reason)
    assert all(pieces) and tuple(pieces) == output.pieces


def test_each_token_of_whole_characters_is_sent_at_once_and_a_partial_one_waits() -> None:
    text = CompletionText(TOKENIZER.decode, EOS, [])
    sent = [text.push(t) for t in TOKENIZER.encode("ab é€")]
    assert sent == ["a", "b", " ", "", "é", "", "", "€"]


def test_a_tail_that_may_start_a_stop_waits_and_is_sent_when_it_does_not() -> None:
    text = CompletionText(TOKENIZER.decode, EOS, ["b."])
    sent = [text.push(t) for t in TOKENIZER.encode("ab a")]
    assert sent == ["a", "", "b ", "a"] and not text.done
    stopped = CompletionText(TOKENIZER.decode, EOS, ["b."])
    assert [stopped.push(t) for t in TOKENIZER.encode("ab.")] == ["a", "", ""] and stopped.done
    assert stopped.rest() == "" and stopped.output().text == "a"

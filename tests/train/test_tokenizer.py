import base64
from pathlib import Path

from k2_workers.tokenizer import ByteTokenizer, TiktokenTokenizer, load_tokenizer


def _write_tiktoken_model(directory: Path, merges: list[bytes]) -> None:
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    lines += [f"{base64.b64encode(m).decode()} {256 + j}" for j, m in enumerate(merges)]
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n")


def test_byte_tokenizer_round_trips_utf8() -> None:
    tok = ByteTokenizer()
    text = "Ada found the red kite. Ünïcödé ✓"
    ids = tok.encode(text)
    assert ids[:3] == [ord("A"), ord("d"), ord("a")]
    assert max(ids) < 256 and tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert tok.vocab_size == 258


def test_without_tiktoken_model_the_byte_tokenizer_serves(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_tiktoken_model_in_checkpoint_dir_is_loaded_offline(tmp_path: Path) -> None:
    _write_tiktoken_model(tmp_path, [b"th", b"he", b"the", b"at"])
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, TiktokenTokenizer)
    ids = tok.encode("the hat")
    assert ids[0] == 258  # "the" is one merged token
    assert tok.decode(ids) == "the hat"
    # 260 base ranks + 256 reserved specials; [BOS] and [EOS] are the first two specials
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (516, 260, 261)
    assert tok.encode("[BOS]") != [tok.bos_id]  # specials in plain text are not special

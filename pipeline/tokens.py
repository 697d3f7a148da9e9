"""Readable token text for the tables.

Tokenizers store tokens in their own alphabet: byte-level BPE writes a space as "Ġ"
and splits an emoji's UTF-8 bytes over several tokens, SentencePiece writes "▁" and
byte-fallback tokens such as "<0xE2>". The tables show what the token means instead:
each token's raw bytes are recovered and decoded as a UTF-8 stream. A character whose
bytes span several tokens is shown in full on each of them, so no token is blank.
"""

import codecs
import re
from functools import cache

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_level_decoder() -> dict[str, int]:
    """Map byte-level BPE's printable stand-ins back to the bytes they encode.

    Byte-level BPE keeps printable Latin-1 bytes as themselves and shifts the other
    bytes to code points from 256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(byte): byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes(tokenizer, token: str, special: frozenset[str]) -> bytes:
    """Recover the bytes a token stands for in the tokenizer's own scheme."""
    if token in special:
        return token.encode()
    if _is_byte_level(tokenizer):
        table = _byte_level_decoder()
        if all(char in table for char in token):
            return bytes(table[char] for char in token)
    match = _BYTE_FALLBACK.match(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode()


def readable_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """Return display text for each token of one sequence, in order."""
    special = frozenset(getattr(tokenizer, "all_special_tokens", []) or [])
    pieces = [token_bytes(tokenizer, token, special) for token in tokens]

    characters = _character_spans(b"".join(pieces))

    texts = []
    start = 0
    for piece in pieces:
        end = start + len(piece)
        texts.append("".join(char for char_start, char_end, char in characters if char_start < end and char_end > start))
        start = end
    return texts


def _character_spans(data: bytes) -> list[tuple[int, int, str]]:
    """Decode UTF-8 and return each character with the byte range it came from."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    spans = []
    char_start = 0
    for offset in range(len(data)):
        for char in decoder.decode(data[offset : offset + 1]):
            spans.append((char_start, offset + 1, char))
            char_start = offset + 1
    for char in decoder.decode(b"", final=True):
        spans.append((char_start, len(data), char))
    return spans

"""Every token of a vocabulary as the bytes it stands for, and the lookups the aligner
needs: which tokens could start at a given byte of a host's answer.

A host returns text, not tokens. To ask the reference how likely that text was we
must find the tokens the host most plausibly emitted; that starts with knowing, for
each position in the text, the tokens whose bytes match the text there.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes of every token id; special (control) tokens map to b""."""
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.all_special_ids)
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special:
            special.add(idx)
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_level_decoder()
    out: list[bytes] = []
    for idx, piece in enumerate(pieces):
        if piece is None or idx in special:
            out.append(b"")
        elif byte_level:
            try:
                out.append(bytes(decoder[ch] for ch in piece))
            except KeyError:  # an added, non-byte-level token: its text is literal
                out.append(piece.encode("utf-8"))
        else:  # SentencePiece: "▁" is a space, <0xNN> a raw byte
            m = _BYTE_FALLBACK.match(piece)
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8"))
    return out


class Candidate(NamedTuple):  # a tuple: the aligner builds thousands per answer
    token: int
    consumed: int  # bytes of the answer this token covers (0 for whitespace the API stripped)


class TokenTable:
    def __init__(self, tokenizer, eos_ids: list[int]):
        self.bytes = token_bytes(tokenizer)
        self.eos_ids = list(eos_ids)
        self.exact: dict[bytes, list[int]] = {}
        self.after_space: dict[bytes, list[int]] = {}  # " Hello" filed under b"Hello"
        self.before_space: dict[bytes, list[int]] = {}  # ".\n" filed under b"."
        self.whitespace: list[int] = []
        for idx, b in enumerate(self.bytes):
            if not b:
                continue
            self.exact.setdefault(b, []).append(idx)
            stripped_left, stripped_right = b.lstrip(), b.rstrip()
            if not stripped_left:
                self.whitespace.append(idx)
                continue
            if stripped_left != b:
                self.after_space.setdefault(stripped_left, []).append(idx)
            if stripped_right != b:
                self.before_space.setdefault(stripped_right, []).append(idx)
        self.max_len = max(len(b) for b in self.bytes)
        # Every prefix of a token's bytes (plain or after a space): a scan of the text
        # stops at the first piece no token starts with, instead of at max_len bytes
        # (runs of whitespace make max_len long, most pieces die within a few bytes).
        self.prefixes = {key[:n] for table in (self.exact, self.after_space)
                         for key in table for n in range(1, len(key) + 1)}

    def candidates(self, text: bytes, pos: int, *, lead: bool, trail: bool) -> list[Candidate]:
        """Tokens that can be emitted with `pos` bytes of `text` already covered.

        lead: the answer may have lost leading whitespace here (nothing covered yet);
        trail: it may have lost trailing whitespace (the rest of the text may be followed
        by whitespace the API stripped).
        """
        out: list[Candidate] = []
        rest = text[pos : pos + self.max_len]
        for n in range(1, len(rest) + 1):
            piece = rest[:n]
            if piece not in self.prefixes:
                break
            for t in self.exact.get(piece, ()):
                out.append(Candidate(t, n))
            if lead:
                for t in self.after_space.get(piece, ()):
                    out.append(Candidate(t, n))
        if trail and pos + len(rest) == len(text) and rest:
            for t in self.before_space.get(rest, ()):
                out.append(Candidate(t, len(rest)))
        if lead or (trail and pos == len(text)):
            out.extend(Candidate(t, 0) for t in self.whitespace)
        return out

    def fewest_tokens(self, text: bytes, into_last_char: bool = False) -> int:
        """The fewest tokens any segmentation of `text` needs (a host claiming this
        model cannot have produced the text in fewer). With `into_last_char`: the fewest
        that reach into the text's last UTF-8 character, however far they end inside it
        (an engine stopped by max_tokens mid-character may add the tokens that finish
        it: llama-cpp-python holds an incomplete character back and generates on)."""
        inf = len(text) + 1
        best = [0] + [inf] * len(text)
        for start in range(len(text)):
            if best[start] >= inf:
                continue
            for end in range(start + 1, min(start + self.max_len, len(text)) + 1):
                piece = text[start:end]
                if piece not in self.prefixes:
                    break
                if best[start] + 1 < best[end] and piece in self.exact:
                    best[end] = best[start] + 1
        if into_last_char and text:
            last = len(text) - 1
            while last > max(0, len(text) - 4) and text[last] & 0xC0 == 0x80:  # at most 3 continuation bytes
                last -= 1
            return min(best[last + 1 :])
        return best[-1]

    def segment(self, text: bytes) -> list[int] | None:
        """A segmentation with the fewest tokens, preferring long tokens first; None if
        some byte has no token (cannot happen with byte-level or byte-fallback vocabularies)."""
        inf = len(text) + 1
        best = [0] + [inf] * len(text)
        back = [0] * (len(text) + 1)
        for end in range(1, len(text) + 1):
            for n in range(min(self.max_len, end), 0, -1):
                if best[end - n] + 1 < best[end] and text[end - n : end] in self.exact:
                    best[end] = best[end - n] + 1
                    back[end] = n
        if best[-1] >= inf:
            return None
        out, end = [], len(text)
        while end:
            n = back[end]
            out.append(self.exact[text[end - n : end]][0])
            end -= n
        return out[::-1]

"""CLIP byte-level BPE tokenizer with the vocabulary bundled in the package.

Produces the same ids as OpenAI's CLIP tokenizer (and open_clip's default one), so that
prompts fed to converted CLIP weights mean what they meant in training:

    >>> tokenize("a photo of a cat.")[0, :8].tolist()
    [49406, 320, 1125, 539, 320, 2368, 269, 49407]

Vocabulary (49408 ids): the 256 byte symbols, the same 256 with the end-of-word marker
``</w>``, the first 48894 merges of ``assets/bpe_simple_vocab_16e6.txt.gz`` (MIT, OpenAI CLIP;
see ``assets/NOTICE_bpe_vocab.md``), then ``<|startoftext|>`` and ``<|endoftext|>``.

One deliberate difference from OpenAI's code: the strings ``<|startoftext|>`` and
``<|endoftext|>`` typed inside a text are tokenized as ordinary characters, never as the special
ids. The text feature is read at the first end-of-text id (argmax of the ids), so a class name
must never be able to inject one.
"""

from __future__ import annotations

import functools
import gzip
import html
import pathlib
from collections.abc import Iterable

import ftfy
import numpy as np
import regex

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
SOT_TOKEN = 49406  # <|startoftext|>
EOT_TOKEN = 49407  # <|endoftext|>
PAD_TOKEN = 0  # rows are padded with 0 after the end token, as in OpenAI's tokenize()

_END_OF_WORD = "</w>"
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: CLIP uses only the head of the merges file
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
DEFAULT_BPE_PATH = pathlib.Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# Pre-tokenization as in CLIP: a few English contractions, runs of letters, single digits
# (so numbers are spelled digit by digit), runs of other non-space symbols. IGNORECASE
# matters only for rare letters such as U+017F that stay "upper" after str.lower().
_WORD_PATTERN = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE
)
# Size of the per-word BPE cache: prompts reuse a small set of words, and each entry is tiny.
_BPE_CACHE_SIZE = 1 << 16


def _byte_symbols() -> list[str]:
    """Return the printable character that stands for each byte value 0..255.

    Byte-level BPE works on strings, so each byte gets a visible character: bytes that are
    printable Latin-1 characters stand for themselves, the other 68 (controls, space, NBSP,
    soft hyphen) take the code points 256, 257, ... in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    symbols, next_extra = [], 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_extra))
            next_extra += 1
    return symbols


def clean_text(text: str) -> str:
    """Normalize text the way CLIP did before tokenizing.

    Repairs mojibake, straightens curly quotes and normalizes to NFC (ftfy, which also
    unescapes HTML entities once when the text holds no literal "<"), resolves HTML entities
    twice more (doubly escaped input such as ``&amp;amp;``), collapses every run of whitespace
    to one space, strips, and lowercases.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Byte-level BPE tokenizer with CLIP's vocabulary, merges and text cleanup.

    Use `get_tokenizer()` for the shared instance rather than building new ones: loading the
    merges takes about a tenth of a second and each instance has its own word cache.
    """

    def __init__(self, bpe_path: str | pathlib.Path = DEFAULT_BPE_PATH):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a version header; CLIP keeps the first _NUM_MERGES merge rules after it.
        merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{bpe_path} is not a CLIP BPE merges file (need {_NUM_MERGES} merge pairs)")

        self._byte_symbols = _byte_symbols()
        # The base alphabet is ordered by code point: printable bytes (self-mapped, < 256)
        # come first, then the remapped ones (256+), which is CLIP's id order.
        alphabet = sorted(self._byte_symbols, key=ord)
        tokens = alphabet + [s + _END_OF_WORD for s in alphabet]
        tokens += [a + b for a, b in merges]
        tokens += list(_SPECIAL_TOKENS)
        self._id_to_token: list[str] = tokens
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        if len(self._token_to_id) != VOCAB_SIZE:
            raise ValueError(f"{bpe_path} gave {len(self._token_to_id)} distinct tokens, expected {VOCAB_SIZE}")
        self._merge_rank: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}

        # str.translate table from a Latin-1 view of UTF-8 bytes to the byte symbols, and back.
        self._to_symbols = {b: s for b, s in enumerate(self._byte_symbols)}
        self._from_symbols = {s: b for b, s in enumerate(self._byte_symbols)}
        # Per-instance cache of word -> ids (the BPE merge loop is the costly part).
        self._word_ids = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._bpe_word)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def sot_token(self) -> int:
        return self._token_to_id[_SPECIAL_TOKENS[0]]

    @property
    def eot_token(self) -> int:
        return self._token_to_id[_SPECIAL_TOKENS[1]]

    def _bpe_word(self, word: str) -> tuple[int, ...]:
        """Return the ids of one pre-tokenized word (a regex match, not yet byte-mapped).

        Starts from one symbol per UTF-8 byte, the last carrying ``</w>``, and repeatedly
        applies the lowest-ranked merge present, joining all its non-overlapping occurrences
        from left to right, until no adjacent pair is a known merge.
        """
        mapped = word.encode("utf-8").decode("latin-1").translate(self._to_symbols)
        symbols = list(mapped[:-1]) + [mapped[-1] + _END_OF_WORD]
        rank = self._merge_rank
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: rank.get(pair, _NUM_MERGES))
            if best not in rank:
                break
            first, second = best
            merged, i, n = [], 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(self._token_to_id[s] for s in symbols)

    def encode(self, text: str) -> list[int]:
        """Return the ids of `text` after CLIP's cleanup, without start/end tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}: {text!r}")
        ids: list[int] = []
        for word in _WORD_PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of `ids`: each end-of-word marker becomes a space, ends are stripped.

        Lowercase words separated by single spaces decode to themselves; punctuation comes
        back as a separate word ("cat." -> "cat ."). Special ids decode to their names, padding
        id 0 to "!", so cut a tokenized row to its real tokens first. Invalid UTF-8 (a
        multi-byte character cut in half) becomes U+FFFD.
        """
        pieces = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            pieces.append(self._id_to_token[i])
        raw = bytes(self._from_symbols[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()

    def __call__(self, texts: str | Iterable[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """Same as the module-level `tokenize`, with this tokenizer."""
        if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
            raise TypeError(f"context_length must be an int >= 2, got {context_length!r}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for start and end tokens), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        elif isinstance(texts, (bytes, bytearray)):
            raise TypeError("texts must be str or a sequence of str, got bytes; decode them first")
        texts = list(texts)
        rows = np.full((len(texts), context_length), PAD_TOKEN, dtype=np.int32)
        max_inner = context_length - 2
        for r, text in enumerate(texts):
            # Truncate the inner ids so that the row still ends with the end token: the text
            # feature is read there.
            ids = self.encode(text)[:max_inner]
            rows[r, 0] = self.sot_token
            rows[r, 1 : 1 + len(ids)] = ids
            rows[r, 1 + len(ids)] = self.eot_token
        return rows


@functools.cache
def get_tokenizer() -> ClipTokenizer:
    """Return the shared tokenizer built from the bundled vocabulary (loaded on first call)."""
    return ClipTokenizer()


def tokenize(texts: str | Iterable[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """Tokenize text(s) into an int32 array of shape [N, context_length].

    Each row is ``[SOT_TOKEN, *ids, EOT_TOKEN, 0, 0, ...]``. Text longer than
    ``context_length - 2`` ids is cut so that EOT_TOKEN sits at the last position. A single
    string gives N = 1; an empty sequence gives shape [0, context_length].

    Raises:
      ValueError: context_length < 2.
      TypeError: a text is not a str.
    """
    return get_tokenizer()(texts, context_length)

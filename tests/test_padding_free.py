"""The padding-free BERT forward computes what the padded Hugging Face forward computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from harness import InProcessServer, bytes_vectors, serving
from support.bert import reference_bert_embed, right_padded, tiny_bert
from torch import nn
from transformers import Qwen3Config, Qwen3Model, RobertaConfig, RobertaModel

from embedserve.service.engine.runner import BatchRunner
from embedserve.service.models.base import DeviceSpec, gather_last_token, mean_pool
from embedserve.service.models.options import ModelOptions
from embedserve.service.models.packed_bert import PackedBertEncoder, unsupported_reason
from embedserve.service.models.packed_qwen3 import PackedQwen3Decoder
from embedserve.service.models.packed_qwen3 import unsupported_reason as qwen3_unsupported_reason
from embedserve.service.models.packing import (
    MIN_SHARED_PREFIX,
    rounded_token_count,
    rounds_tokens,
    shared_prefix,
)
from embedserve.service.models.qwen3 import Qwen3Embedder, Qwen3Reranker
from embedserve.service.models.sentence_transformer import SentenceTransformerEmbedder
from embedserve.service.models.tokenization import Truncation
from embedserve.v1 import common_pb2, embed_service_pb2, info_service_pb2

CPU = DeviceSpec(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("round_tokens", [False, True], ids=["exact", "rounded"])
@pytest.mark.parametrize("by_length", [True, False], ids=["runs-of-one-length", "padded"])
@pytest.mark.parametrize(
    "lengths",
    [[3, 17, 9, 1, 17, 12], [5], [8, 8, 8]],
    ids=["unequal", "one-sequence", "no-padding"],
)
def test_packed_hidden_states_and_poolings_match_the_padded_model(
    lengths: list[int], by_length: bool, round_tokens: bool
) -> None:
    model = tiny_bert(seed=len(lengths))
    ids, mask = right_padded(lengths, model.config.vocab_size, seed=sum(lengths))
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = PackedBertEncoder(model, by_length=by_length, round_tokens=round_tokens)(ids, mask)
    # The packed rows may be in another order than the batch's; the poolings may not.
    order = packed.order if packed.order is not None else torch.arange(len(lengths))
    assert packed.hidden.shape == (sum(lengths), model.config.hidden_size)
    assert packed.lengths.tolist() == [lengths[row] for row in order.tolist()]
    torch.testing.assert_close(
        packed.hidden, hidden[order][mask[order].bool()], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(packed.mean(), mean_pool(hidden, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.first(), hidden[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.last(), gather_last_token(hidden, mask), atol=1e-5, rtol=1e-5)


def test_on_the_cpu_rows_of_one_length_attend_together_without_padding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_bert(seed=3)
    lengths = [3, 17, 9, 1, 17, 12, 3]
    ids, mask = right_padded(lengths, model.config.vocab_size, seed=3)
    attended: list[tuple[int, int, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        rows, _, width, _ = q.shape
        attended.append((rows, width, kwargs.get("attn_mask") is not None))
        return sdpa(q, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.inference_mode():
        PackedBertEncoder(model)(ids, mask)
    runs = [(1, 1, False), (2, 3, False), (1, 9, False), (1, 12, False), (2, 17, False)]
    assert attended == runs * model.config.num_hidden_layers


def test_fusing_the_projections_leaves_the_model_unchanged_and_shares_its_weights() -> None:
    model = tiny_bert(seed=7)
    ids, mask = right_padded([4, 11, 7], model.config.vocab_size, seed=7)
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        encoder = PackedBertEncoder(model)
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    attention = model.encoder.layer[0].attention.self
    qkv = encoder._layers[0].qkv
    assert isinstance(qkv, nn.Linear)
    fused = qkv.weight
    for part, projection in enumerate((attention.query, attention.key, attention.value)):
        assert projection.weight.data_ptr() == fused[part * 32].data_ptr()


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            lambda: RobertaModel(
                RobertaConfig(
                    hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
                )
            ),
            "RobertaModel is not a BertModel",
        ),
        (lambda: tiny_bert(seed=1, position_embedding_type="relative_key"), "relative_key"),
        (lambda: tiny_bert(seed=1, is_decoder=True), "decoder"),
    ],
    ids=["roberta", "relative-positions", "decoder"],
)
def test_models_it_cannot_run_are_named_and_refused(model: object, reason: str) -> None:
    built = model()  # type: ignore[operator]
    found = unsupported_reason(built)
    assert found is not None and reason in found
    with pytest.raises(ValueError, match="cannot run packed"):
        PackedBertEncoder(built)
    assert unsupported_reason(tiny_bert(seed=1)) is None


def test_minilm_padding_free_and_padded_adapters_agree(minilm_folder: Path) -> None:
    texts = [
        "hi",
        "The quick brown fox jumps over the lazy dog.",
        "Embedding services turn text into vectors that retrieval systems can search, "
        "and rerankers order the candidates that a first stage found for a query.",
        " ".join(["retrieval"] * 300),  # truncated to the model's 256 tokens
    ]
    outputs = {}
    for padding_free in (True, False):
        options = ModelOptions(folder=minilm_folder, name="m", padding_free=padding_free)
        adapter = SentenceTransformerEmbedder(options, CPU)
        assert adapter.padding_free is padding_free
        batch = [t.ids for t in adapter.tokenize(texts, "", Truncation.END)]
        assert len({len(ids) for ids in batch}) == len(texts)  # a batch with padding
        outputs[padding_free] = torch.from_numpy(BatchRunner(adapter).run(batch))
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=1e-5)


def test_server_info_says_which_models_run_padding_free(
    minilm_server: InProcessServer,
    qwen3_server: InProcessServer,
    cross_encoder_folder: Path,
    qwen3_reranker_folder: Path,
) -> None:
    def padding_free(server: InProcessServer) -> dict[str, bool]:
        info = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=30)
        return {m.name: m.padding_free for m in info.models}

    # A similarity reranker is its embedding model.
    assert set(padding_free(minilm_server).values()) == {True}
    assert padding_free(qwen3_server) == {"qwen3-embedding-tiny": True, "qwen3-reranker-tiny": True}
    with serving(reranker=cross_encoder_folder, reranker_name="cross") as server:
        assert padding_free(server)["cross"] is False
    # --padding-free false reaches the reranker as well as the embedder.
    with serving(reranker=qwen3_reranker_folder, reranker_name="r", padding_free=False) as server:
        assert padding_free(server) == {"all-MiniLM-L6-v2": False, "r": False}


def test_the_offline_bert_stand_in_serves_what_sentence_transformers_computes(
    bert_embedder_folder: Path,
) -> None:
    """The CUDA tests' BERT embedder: on the CPU it must be served padding-free and agree
    with sentence-transformers, so that a mismatch on CUDA is the device's."""
    texts = ["hi", "a short text", "a somewhat longer text about retrieval and ranking"]
    with serving(model=bert_embedder_folder) as server:
        info = server.stubs.info.GetServerInfo(info_service_pb2.GetServerInfoRequest())
        assert [
            m.padding_free for m in info.models if m.kind == info_service_pb2.MODEL_KIND_EMBEDDING
        ] == [True]
        reply = server.stubs.embed.Embed(
            embed_service_pb2.EmbedRequest(inputs=texts, encoding=common_pb2.ENCODING_FLOAT32_BYTES)
        )
    served = torch.from_numpy(bytes_vectors(reply))
    torch.testing.assert_close(
        served, reference_bert_embed(bert_embedder_folder, texts), atol=1e-5, rtol=1e-4
    )


# --- Qwen3 (packed_qwen3.py) ---------------------------------------------------------------


def tiny_qwen3(**overrides: Any) -> Any:
    """A small random Qwen3Model: grouped-query attention, and a head size that is not
    hidden / heads, as in the real checkpoints."""
    fields: dict[str, Any] = {
        "vocab_size": 120,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "max_position_embeddings": 128,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    }
    torch.manual_seed(5)
    model = Qwen3Model(Qwen3Config(**{**fields, **overrides}))
    return model.eval()  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("round_tokens", [False, True], ids=["exact", "rounded"])
@pytest.mark.parametrize("by_length", [True, False], ids=["runs-of-one-length", "padded"])
@pytest.mark.parametrize(
    "lengths",
    [[3, 17, 9, 1, 17, 12], [5], [8, 8, 8]],
    ids=["unequal", "one-sequence", "no-padding"],
)
def test_packed_qwen3_matches_the_padded_decoder(
    lengths: list[int], by_length: bool, round_tokens: bool
) -> None:
    model = tiny_qwen3()
    ids, mask = right_padded(lengths, model.config.vocab_size, seed=sum(lengths))
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = PackedQwen3Decoder(model, by_length=by_length, round_tokens=round_tokens)(
            ids, mask
        )
    order = packed.order if packed.order is not None else torch.arange(len(lengths))
    torch.testing.assert_close(
        packed.hidden, hidden[order][mask[order].bool()], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(packed.last(), gather_last_token(hidden, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (
            {"layer_types": ["full_attention", "sliding_attention", "full_attention"]},
            "sliding-window",
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}},
            "rope type 'linear'",
        ),
    ],
    ids=["sliding-window", "scaled-rope"],
)
def test_qwen3_models_the_packed_forward_would_get_wrong_are_named_and_refused(
    overrides: dict[str, Any], reason: str
) -> None:
    assert qwen3_unsupported_reason(tiny_qwen3()) is None
    model = tiny_qwen3(**overrides)
    found = qwen3_unsupported_reason(model)
    assert found is not None and reason in found
    with pytest.raises(ValueError, match="cannot run packed"):
        PackedQwen3Decoder(model)
    assert "is not a Qwen3Model" in (qwen3_unsupported_reason(tiny_bert(seed=1)) or "")


def test_qwen3_padding_free_and_padded_adapters_agree(
    qwen3_embedding_folder: Path, qwen3_reranker_folder: Path
) -> None:
    texts = ["hi", "a short text", "a somewhat longer text about retrieval", "yes " * 40]
    embeddings, scores = {}, {}
    for padding_free in (True, False):
        embed_options = ModelOptions(
            folder=qwen3_embedding_folder, name="e", padding_free=padding_free
        )
        embedder = Qwen3Embedder(embed_options, CPU)
        assert embedder.padding_free is padding_free
        batch = [t.ids for t in embedder.tokenize(texts, "", Truncation.END)]
        assert len({len(ids) for ids in batch}) == len(texts)  # a batch with padding
        embeddings[padding_free] = torch.from_numpy(BatchRunner(embedder).run(batch))
        rerank_options = ModelOptions(
            folder=qwen3_reranker_folder, name="r", padding_free=padding_free
        )
        reranker = Qwen3Reranker(rerank_options, CPU)
        assert reranker.padding_free is padding_free
        pairs = [t.ids for t in reranker.tokenize_pairs("query", texts, "", Truncation.END)]
        scores[padding_free] = torch.from_numpy(BatchRunner(reranker).run(pairs))
    torch.testing.assert_close(embeddings[True], embeddings[False], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[True], scores[False], atol=1e-5, rtol=1e-5)


def with_shared_prefix(
    prefix: int, own_lengths: list[int], vocab: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch whose rows start with the same ``prefix`` tokens."""
    ids, mask = right_padded([prefix + n for n in own_lengths], vocab, seed=seed)
    ids[:, :prefix] = ids[0, :prefix]
    return ids, mask


@pytest.mark.parametrize("round_tokens", [False, True], ids=["exact", "rounded"])
@pytest.mark.parametrize("own_lengths", [[3, 17, 9, 1, 17, 12], [4, 4]], ids=["unequal", "equal"])
def test_a_prefix_every_row_shares_is_computed_once_and_changes_nothing(
    own_lengths: list[int], round_tokens: bool
) -> None:
    model = tiny_qwen3()
    ids, mask = with_shared_prefix(20, own_lengths, model.config.vocab_size, seed=9)
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        shared = PackedQwen3Decoder(model, round_tokens=round_tokens)(ids, mask)
        unshared = PackedQwen3Decoder(model, share_prefix=False)(ids, mask)
    assert (shared.prefix, unshared.prefix) == (20, 0)
    # The prefix's 20 tokens are held once, not once a row.
    assert shared.hidden.shape[0] == 20 + sum(own_lengths)
    torch.testing.assert_close(shared.last(), gather_last_token(hidden, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.mean(), mean_pool(hidden, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.first(), hidden[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.last(), unshared.last(), atol=1e-5, rtol=1e-5)


def test_the_shared_prefix_is_what_every_row_has_in_common_short_of_its_last_token() -> None:
    vocab = 120
    ids, mask = with_shared_prefix(12, [5, 1, 9], vocab, seed=3)
    assert shared_prefix(ids, mask) == 12
    ids[2, 7] = (ids[0, 7] + 1) % vocab  # one row departs at position 7
    assert shared_prefix(ids, mask) == 7
    same = ids[:1].repeat(3, 1)
    assert shared_prefix(same, mask[:1].repeat(3, 1)) == int(mask[0].sum()) - 1
    # Below MIN_SHARED_PREFIX it is not worth sharing: the rows are packed whole.
    model = tiny_qwen3()
    ids, mask = with_shared_prefix(MIN_SHARED_PREFIX - 1, [5, 9], model.config.vocab_size, 4)
    with torch.inference_mode():
        assert PackedQwen3Decoder(model)(ids, mask).prefix == 0


def test_bert_never_shares_a_prefix() -> None:
    """Its attention runs both ways: a prefix's states depend on what follows it."""
    model = tiny_bert(seed=2)
    ids, mask = with_shared_prefix(20, [3, 9], model.config.vocab_size, seed=2)
    with torch.inference_mode():
        assert PackedBertEncoder(model)(ids, mask).prefix == 0


def test_rounded_token_counts_are_few_and_cost_at_most_a_thirty_second() -> None:
    budget = 8192  # the default --max-batch-tokens
    counts = [rounded_token_count(tokens) for tokens in range(1, budget + 1)]
    assert all(c >= t for t, c in zip(range(1, budget + 1), counts, strict=True))
    assert counts == sorted(counts)
    assert all(c % 16 == 0 for c in counts)
    # Past the smallest step (16 tokens), no more than 1/32 of the count is padding.
    assert all(c - t <= t / 32 for t, c in enumerate(counts, start=1) if t >= 512)
    assert len(set(counts)) == 160
    assert [rounded_token_count(t) for t in (1, 16, 17, 1100, 4097)] == [16, 16, 32, 1120, 4224]


@pytest.mark.parametrize(
    ("device", "rounds"),
    [
        (DeviceSpec(torch.device("cpu"), torch.bfloat16), True),
        (DeviceSpec(torch.device("cpu"), torch.float16), True),
        (DeviceSpec(torch.device("cpu"), torch.float32, int8_linears=True), True),
        (CPU, False),
        (DeviceSpec(torch.device("cuda"), torch.bfloat16), False),
    ],
    ids=["cpu-bfloat16", "cpu-float16", "cpu-int8", "cpu-float32", "cuda"],
)
def test_token_counts_are_rounded_where_onednn_runs_the_linear_layers(
    device: DeviceSpec, rounds: bool
) -> None:
    assert rounds_tokens(device) is rounds


def test_the_linear_layers_see_the_rounded_token_count_and_the_pooling_the_real_one() -> None:
    model = tiny_bert(seed=4)
    lengths = [3, 17, 9, 1, 17, 12]  # 59 tokens
    ids, mask = right_padded(lengths, model.config.vocab_size, seed=4)
    rows_seen: list[int] = []
    model.encoder.layer[0].intermediate.dense.register_forward_pre_hook(
        lambda _module, args: rows_seen.append(args[0].shape[0])
    )
    with torch.inference_mode():
        exact = PackedBertEncoder(model)(ids, mask)
        rounded = PackedBertEncoder(model, round_tokens=True)(ids, mask)
    assert rows_seen == [59, rounded_token_count(59)] == [59, 64]
    assert rounded.hidden.shape == exact.hidden.shape
    torch.testing.assert_close(rounded.mean(), exact.mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dtype", "rounded"), [(torch.bfloat16, True), (torch.float32, False)])
def test_the_minilm_adapter_rounds_its_token_count_in_bfloat16_only(
    minilm_folder: Path, dtype: torch.dtype, rounded: bool
) -> None:
    embedder = SentenceTransformerEmbedder(
        ModelOptions(folder=minilm_folder, name="m", padding_free=True),
        DeviceSpec(torch.device("cpu"), dtype),
    )
    batch = [t.ids for t in embedder.tokenize(["hi", "a short text"], "", Truncation.END)]
    tokens = sum(len(ids) for ids in batch)
    rows_seen: list[int] = []
    layer = embedder.thread_checkpoints()[0]  # called once a layer with the packed rows
    layer.register_forward_pre_hook(lambda _module, args: rows_seen.append(args[0].shape[0]))
    vectors = BatchRunner(embedder).run(batch)
    assert vectors.shape == (2, embedder.dimensions)
    assert rows_seen == [rounded_token_count(tokens) if rounded else tokens]

"""Real architectures from libraries we do not write, tiny and randomly initialised (nothing downloaded).

Each is a :class:`~tests.helpers.conformance.Case`: the network, a batch of ``n`` samples, a per-sample
mean loss, and an explicit two-device ``model_split`` placement. From ``transformers``: GPT-2 (``lm_head``
tied to the input embedding), BERT for sequence classification, Llama; and, marked slow: T5
(encoder-decoder, embedding tied four ways), Mixtral (mixture of experts), ViT (vision), Whisper (speech,
``proj_out`` tied to the decoder's embedding); eager attention, dropout 0, two layers of width 32.
From torch: ``nn.TransformerEncoder``, ``nn.MultiheadAttention``, ``nn.LSTM``, a ResNet-style block
(``bias=False`` convs, BatchNorm), weight-norm and spectral-norm layers, an ``nn.Embedding`` with
``padding_idx``, and a module whose output projection is tied to its embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from tests.helpers.conformance import Batch, Case

VOCAB, WIDTH, LENGTH, CLASSES = 48, 32, 6, 3


def tokens(n: int, g: torch.Generator) -> Batch:
    return {"tokens": torch.randint(1, VOCAB, (n, LENGTH), generator=g)}


def labelled_tokens(n: int, g: torch.Generator) -> Batch:
    return {
        "tokens": torch.randint(1, VOCAB, (n, LENGTH), generator=g),
        "y": torch.randint(0, CLASSES, (n,), generator=g),
    }


def padded_tokens(n: int, g: torch.Generator) -> Batch:
    """Token 0 is padding: every sample has some."""
    batch = labelled_tokens(n, g)
    batch["tokens"][:, -2:] = 0
    return batch


def sequences(n: int, g: torch.Generator) -> Batch:
    x = torch.randn(n, LENGTH, 5, generator=g, dtype=torch.float64)
    return {"x": x, "y": torch.randint(0, CLASSES, (n,), generator=g)}


def images(n: int, g: torch.Generator) -> Batch:
    x = torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)
    return {"x": x, "y": torch.randint(0, CLASSES, (n,), generator=g)}


def features(n: int, g: torch.Generator) -> Batch:
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    return {"x": x, "y": torch.randint(0, CLASSES, (n,), generator=g)}


TARGET = 5  #: decoder tokens per sample (teacher forcing: 4 inputs, 4 labels)


def source_and_target(n: int, g: torch.Generator) -> Batch:
    return {
        "tokens": torch.randint(1, VOCAB, (n, LENGTH), generator=g),
        "target": torch.randint(1, VOCAB, (n, TARGET), generator=g),
    }


def audio_and_target(n: int, g: torch.Generator) -> Batch:
    """8 mel bins x 16 frames (Whisper's 2 x max_source_positions) per sample."""
    features = torch.randn(n, 8, 16, generator=g, dtype=torch.float64)
    return {"features": features, "target": torch.randint(1, VOCAB, (n, TARGET), generator=g)}


def pixels(n: int, g: torch.Generator) -> Batch:
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)
    return {"x": x, "y": torch.randint(0, CLASSES, (n,), generator=g)}


def target_loss(logits: Tensor, batch: Batch) -> Tensor:
    """Mean over every sample's ``TARGET - 1`` predicted decoder tokens (computed here in float64:
    transformers' own loss casts logits to float32)."""
    return F.cross_entropy(logits.flatten(0, 1), batch["target"][:, 1:].flatten())


def seq2seq(model: nn.Module, batch: Batch) -> Tensor:
    out = model(input_ids=batch["tokens"], decoder_input_ids=batch["target"][:, :-1])
    return target_loss(out.logits, batch)


def speech_to_text(model: nn.Module, batch: Batch) -> Tensor:
    out = model(input_features=batch["features"], decoder_input_ids=batch["target"][:, :-1])
    return target_loss(out.logits, batch)


def image_classifier(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(pixel_values=batch["x"]).logits, batch["y"])


def next_token_loss(logits: Tensor, batch: Batch) -> Tensor:
    """Mean over every sample's ``LENGTH - 1`` predictions (the same count per sample)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["tokens"][:, 1:].flatten())


def causal_lm(model: nn.Module, batch: Batch) -> Tensor:
    return next_token_loss(model(input_ids=batch["tokens"]).logits, batch)


def token_lm(model: nn.Module, batch: Batch) -> Tensor:
    return next_token_loss(model(batch["tokens"]), batch)


def classify_tokens(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch["tokens"]), batch["y"])


def classify(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def sequence_classifier(model: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(model(input_ids=batch["tokens"]).logits, batch["y"])


# -- transformers ----------------------------------------------------------------------------------------

TINY: dict[str, Any] = dict(attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=WIDTH,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **TINY,
    )
    return GPT2LMHeadModel(config)


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        num_labels=CLASSES,
        **TINY,
    )
    return BertForSequenceClassification(config)


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        attention_dropout=0.0,
        **TINY,
    )
    return LlamaForCausalLM(config)


def t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=WIDTH,
        d_kv=WIDTH // 2,
        d_ff=2 * WIDTH,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
        **TINY,
    )
    return T5ForConditionalGeneration(config)


def mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=16,
        experts_implementation="eager",  # the grouped-matmul kernel takes no float64
        **TINY,
    )
    return MixtralForCausalLM(config)


def vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return ViTForImageClassification(config)


def whisper() -> nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=8,
        d_model=WIDTH,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * WIDTH,
        decoder_ffn_dim=2 * WIDTH,
        max_source_positions=8,
        max_target_positions=16,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        decoder_start_token_id=1,
        **TINY,
    )
    return WhisperForConditionalGeneration(config)


# -- torch --------------------------------------------------------------------------------------------------


class MeanPool(nn.Module):
    """Mean over the sequence dimension (dim 1)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` as self-attention with a residual connection."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(WIDTH, 4, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return x + out


class LastHidden(nn.Module):
    """A two-layer ``nn.LSTM``; returns the last time step's output."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, WIDTH, num_layers=2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return out[:, -1]


class BasicBlock(nn.Module):
    """ResNet's basic block: two ``bias=False`` 3x3 convs with BatchNorm, and the identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH), encoder, MeanPool(), nn.Linear(WIDTH, CLASSES))


def multihead_attention() -> nn.Module:
    return nn.Sequential(nn.Linear(5, WIDTH), SelfAttention(), MeanPool(), nn.Linear(WIDTH, CLASSES))


def lstm() -> nn.Module:
    return nn.Sequential(LastHidden(), nn.Linear(WIDTH, CLASSES))


def resnet_block() -> nn.Module:
    stem = [nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES)]
    return nn.Sequential(*stem, BasicBlock(8), BasicBlock(8), *head)


def normed_layers() -> nn.Module:
    return nn.Sequential(
        parametrizations.weight_norm(nn.Linear(5, WIDTH)),
        nn.Tanh(),
        parametrizations.spectral_norm(nn.Linear(WIDTH, WIDTH)),
        nn.Tanh(),
        nn.Linear(WIDTH, CLASSES),
    )


def padded_embedding() -> nn.Module:
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH, padding_idx=0), MeanPool(), nn.Linear(WIDTH, CLASSES))


def tied_embedding() -> nn.Module:
    net = nn.Sequential(
        nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, VOCAB, bias=False)
    )
    net[3].weight = net[0].weight
    return net


SPLIT = {"model.0-1": 0, "model.2-3": 1}

CASES = [
    Case(
        "gpt2",
        gpt2,
        tokens,
        causal_lm,
        {  # lm_head is tied to wte: both on position 0
            "model.transformer.wte": 0,
            "model.transformer.wpe": 0,
            "model.transformer.h.0": 0,
            "model.transformer.h.1": 1,
            "model.transformer.ln_f": 1,
            "model.lm_head": 0,
        },
    ),
    Case(
        "bert",
        bert,
        labelled_tokens,
        sequence_classifier,
        {
            "model.bert.embeddings": 0,
            "model.bert.encoder.layer.0": 0,
            "model.bert.encoder.layer.1": 1,
            "model.bert.pooler": 1,
            "model.classifier": 1,
        },
    ),
    Case(
        "llama",
        llama,
        tokens,
        causal_lm,
        {
            "model.model.embed_tokens": 0,
            "model.model.rotary_emb": 0,
            "model.model.layers.0": 0,
            "model.model.layers.1": 1,
            "model.model.norm": 1,
            "model.lm_head": 1,
        },
    ),
    Case(
        "t5",
        t5,
        source_and_target,
        seq2seq,
        {  # every holder of the tied embedding on position 0 (the split refusal's suggestion)
            "model.shared": 0,
            "model.encoder": 0,
            "model.decoder.embed_tokens": 0,
            "model.decoder.block": 1,
            "model.decoder.final_layer_norm": 1,
            "model.lm_head": 0,
        },
        slow=True,
    ),
    Case(
        "mixtral",
        mixtral,
        tokens,
        causal_lm,
        {
            "model.model.embed_tokens": 0,
            "model.model.rotary_emb": 0,
            "model.model.layers.0": 0,
            "model.model.layers.1": 1,
            "model.model.norm": 1,
            "model.lm_head": 1,
        },
        slow=True,
    ),
    Case(
        "vit",
        vit,
        pixels,
        image_classifier,
        {
            "model.vit.embeddings": 0,
            "model.vit.layers.0": 0,
            "model.vit.layers.1": 1,
            "model.vit.layernorm": 1,
            "model.classifier": 1,
        },
        slow=True,
    ),
    Case(
        "whisper",
        whisper,
        audio_and_target,
        speech_to_text,
        {"model.model.encoder": 0, "model.model.decoder": 1, "model.proj_out": 1},  # proj_out: tied
        slow=True,
    ),
    Case("transformer_encoder", transformer_encoder, labelled_tokens, classify_tokens, SPLIT, chain=True),
    Case("multihead_attention", multihead_attention, sequences, classify, SPLIT, chain=True),
    Case("lstm", lstm, sequences, classify, {"model.0": 0, "model.1": 1}, chain=True),
    Case(
        "resnet_block",
        resnet_block,
        images,
        classify,
        {"model.0-3": 0, "model.4-7": 1},
        chain=True,
        sharded_under=frozenset({"dp", "pipeline"}),  # BatchNorm normalises each shard on its own statistics
    ),
    Case(
        "weight_and_spectral_norm",
        normed_layers,
        features,
        classify,
        {"model.0-1": 0, "model.2-4": 1},
        chain=True,
        sharded_under=frozenset(
            {"pipeline"}
        ),  # one power iteration per micro-batch, as per call on one device
    ),
    Case(
        "padding_idx_embedding",
        padded_embedding,
        padded_tokens,
        classify_tokens,
        {"model.0": 0, "model.1-2": 1},
        chain=True,
    ),
    Case(
        "tied_embedding",
        tied_embedding,
        tokens,
        token_lm,
        {"model.0": 0, "model.1-2": 1, "model.3": 0},
        chain=True,
    ),
]

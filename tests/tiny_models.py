"""Tiny random-weight encoders saved as HF model directories (safetensors + a matching tokenizer).

Each stands in for a real model family: BERT (bidirectional, token types), CLIP's text
encoder (causal, final layer norm, 77 positions) and GPT-2 (causal decoder, no pad token).
Weights are seeded, so a directory built twice holds the same model. The initializer range
is larger than the usual 0.02 so attention is far from uniform and a wrong mask or wrong
position ids shows up as a visible difference.
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_tokenizers
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    GPT2Config,
    GPT2Model,
)

HIDDEN = 32
INIT_RANGE = 0.2


def _vocab(model_dir: Path) -> tuple[int, object]:
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return len(tok), tok


def _save(model: torch.nn.Module, model_dir: Path) -> Path:
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return model_dir


def build_tiny_bert(model_dir: Path, seed: int = 0) -> Path:
    """BertModel: hidden 32, 2 layers, 2 heads, 64 positions, with the tiny WordPiece tokenizer."""
    model_dir = tiny_tokenizers.train_wordpiece(Path(model_dir))
    vocab, tok = _vocab(model_dir)
    config = BertConfig(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    return _save(BertModel(config).eval(), model_dir)


def _clip_text_config(tok, vocab: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=HIDDEN, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=INIT_RANGE,
    )


def build_tiny_clip_text(model_dir: Path, seed: int = 0) -> Path:
    """CLIPTextModel: hidden 32, 2 layers, 77 positions, CLIP-style BPE (bos/eos/pad ids from it)."""
    model_dir = tiny_tokenizers.train_clip_style_bpe(Path(model_dir))
    vocab, tok = _vocab(model_dir)
    torch.manual_seed(seed)
    return _save(CLIPTextModel(_clip_text_config(tok, vocab)).eval(), model_dir)


def build_tiny_clip_full(model_dir: Path, seed: int = 0) -> Path:
    """A whole CLIPModel (text + a tiny vision tower), as Stable Diffusion repos' text encoders sometimes are."""
    model_dir = tiny_tokenizers.train_clip_style_bpe(Path(model_dir))
    vocab, tok = _vocab(model_dir)
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16, projection_dim=HIDDEN)
    config = CLIPConfig(text_config=_clip_text_config(tok, vocab).to_dict(), vision_config=vision,
                        projection_dim=HIDDEN)
    torch.manual_seed(seed)
    return _save(CLIPModel(config).eval(), model_dir)


def build_tiny_gpt2(model_dir: Path, seed: int = 0) -> Path:
    """GPT2Model: 64 positions, byte-level BPE without a pad token (the config pads with end-of-text)."""
    model_dir = tiny_tokenizers.train_byte_level_bpe(Path(model_dir))
    vocab, tok = _vocab(model_dir)
    config = GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=HIDDEN, n_layer=2, n_head=2, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, initializer_range=INIT_RANGE,
    )
    torch.manual_seed(seed)
    return _save(GPT2Model(config).eval(), model_dir)


def build_pickle_only(model_dir: Path, seed: int = 0) -> Path:
    """A tiny BERT whose weights exist only as a pickle checkpoint (pytorch_model.bin)."""
    model_dir = build_tiny_bert(Path(model_dir), seed)
    model = BertModel.from_pretrained(str(model_dir))
    (model_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    return model_dir


def build_remote_code(model_dir: Path, seed: int = 0) -> Path:
    """A tiny BERT whose config asks for remote code (``auto_map``)."""
    model_dir = build_tiny_bert(Path(model_dir), seed)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    config_path.write_text(json.dumps(config))
    return model_dir

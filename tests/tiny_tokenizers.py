"""Tiny tokenizers trained on the spot with `tokenizers`, saved as HF tokenizer directories.

Tests never download anything: these stand in for real tokenizers of each family
(BERT-style WordPiece with a pad token; GPT-2-style byte-level BPE without one;
a CLIP-style BPE with start/end tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Text with the shapes that trip tokenizers up: CJK, emoji (incl. ZWJ sequences),
# combining marks, right-to-left scripts, odd whitespace.
TRAINING_TEXTS = tuple([
    "The quick brown fox jumps over the lazy dog.",
    "Tokenizers split text into pieces; models read the pieces as integers.",
    "Padding, truncation and attention masks decide what a model sees.",
    "机器学习模型需要大量的训练数据。自然语言处理很有趣。",
    "日本語のテキストも含まれています。東京は大きな都市です。",
    "한국어 문장도 있습니다. 서울은 아름답습니다.",
    "مرحبا بالعالم، هذا نص باللغة العربية.",
    "שלום עולם, זה טקסט בעברית.",
    "Привет, мир! Это текст на русском языке.",
    "Ελληνικά γράμματα: αβγδε.",
    "नमस्ते दुनिया, यह हिंदी में पाठ है।",
    "Emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷🇯🇵 appear in chat logs.",
    "Combining marks: e\u0301 a\u0300 o\u0308 n\u0303 and café naïve résumé.",
    "Tabs\tand  double  spaces\nand newlines.",
    "Numbers 12345 67890 and symbols #@$%^&*() <html> </html>",
] * 20)


def _save(tokenizer: Tokenizer, out_dir: Path, **special) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(str(out_dir))
    return out_dir


def train_wordpiece(out_dir: Path, vocab_size: int = 400, model_max_length: int | None = 64,
                    texts: Sequence[str] = TRAINING_TEXTS) -> Path:
    """BERT-style: lowercasing normalizer, [CLS] x [SEP], a [PAD] token, token_type_ids."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return _save(
        tok, out_dir, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"], **extra,
    )


def train_byte_level_bpe(out_dir: Path, vocab_size: int = 500, model_max_length: int | None = 64,
                         texts: Sequence[str] = TRAINING_TEXTS) -> Path:
    """GPT-2-style: byte-level BPE, <|endoftext|> as bos/eos, and no pad token at all."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return _save(
        tok, out_dir, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"], **extra,
    )


def train_clip_style_bpe(out_dir: Path, vocab_size: int = 500, model_max_length: int = 77,
                         texts: Sequence[str] = TRAINING_TEXTS) -> Path:
    """CLIP-style: lowercased BPE with <|startoftext|> x <|endoftext|>, padded with <|endoftext|>."""
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"],
            end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bos, eos = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", pair="<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    return _save(
        tok, out_dir, bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=model_max_length,
        model_input_names=["input_ids", "attention_mask"],
    )

"""Build the small demo tokenizers that the worked example configs use.

    python tools/build_demo_tokenizers.py        # writes conf/tokenizers/{decoder-bpe,clip-bpe}

Both are trained with `tokenizers` on the shipped sample corpus, using the same
recipes as the tests' tiny tokenizers (tests/tiny_tokenizers.py):
decoder-bpe is GPT-2 style (byte-level BPE, <|endoftext|>, no pad token) and
clip-bpe is CLIP style (<|startoftext|> ... <|endoftext|>, model_max_length 77).
They stand in for real tokenizers so that every example runs offline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from tiny_tokenizers import train_byte_level_bpe, train_clip_style_bpe  # noqa: E402


def main() -> None:
    corpus = REPO / "pipeline" / "sample_data" / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    out = REPO / "conf" / "tokenizers"
    train_byte_level_bpe(out / "decoder-bpe", vocab_size=4000, model_max_length=1024, texts=texts)
    train_clip_style_bpe(out / "clip-bpe", vocab_size=4000, model_max_length=77, texts=texts)
    print(f"wrote {out}/decoder-bpe and {out}/clip-bpe")


if __name__ == "__main__":
    main()

"""pipeline/tokenize/settings.py: a cached tokenizer resolves a job exactly as a fresh load, without transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.tokenize.settings import TokenizerSettings, cached_settings, settings_key

REPO = Path(__file__).resolve().parent.parent


def test_cached_settings_equal_a_fresh_load_and_a_changed_file_is_a_new_key(tmp_path, monkeypatch, bpe_dir):
    from transformers import AutoTokenizer

    monkeypatch.setenv("EMBEDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "tok"
    copy.mkdir()
    for f in Path(bpe_dir).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    fresh = TokenizerSettings.of(AutoTokenizer.from_pretrained(str(copy)))
    loads = []

    def load():
        loads.append(1)
        return AutoTokenizer.from_pretrained(str(copy))

    assert cached_settings(copy, load) == fresh and len(loads) == 1
    assert cached_settings(copy, load) == fresh and len(loads) == 1  # the second comes from disk
    key = settings_key(copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["padding_side"] = "left" if fresh.padding_side == "right" else "right"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert settings_key(copy) != key
    assert cached_settings(copy, load).padding_side == config["padding_side"] and len(loads) == 2


def test_a_job_with_a_cached_tokenizer_imports_neither_transformers_nor_torch(tmp_path, minilm_dir):
    code = ("import sys\n"
            "from pipeline.config import validate_config\n"
            "from pipeline.tokenize.loading import load_tokenize_spec\n"
            "spec = load_tokenize_spec(validate_config({'input': {'path': 'x'}, 'tokenizer': {'max_length': 32},"
            " 'encoder': {'pooling': 'mean', 'normalize': True}}))\n"
            "print(spec.tokenizer_sha256, 'transformers' in sys.modules, 'torch' in sys.modules)\n")
    env = dict(os.environ, EMBEDPIPE_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    runs = [subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == runs[1][0]  # the same tokenizer, whichever path resolved it
    assert runs[0][1] == "True"  # cold: loaded with transformers
    assert runs[1][1:] == ["False", "False"], runs[1]

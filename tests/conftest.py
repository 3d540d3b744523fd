"""Shared fixtures: no network, one local Ray cluster per session, tiny tokenizers trained on the spot."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tokenizer settings cached by the tests' jobs (pipeline/tokenize/settings.py) stay out of the user's cache.
os.environ.setdefault("EMBEDPIPE_CACHE_DIR", tempfile.mkdtemp(prefix="embedpipe-test-cache-"))
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import tiny_tokenizers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the whole session (no dashboard)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from pipeline.tokenize.loading import resolve_alias

    return resolve_alias("minilm")


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory) -> str:
    return str(tiny_tokenizers.train_wordpiece(tmp_path_factory.mktemp("tok") / "wordpiece"))


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory) -> str:
    """GPT-2 style byte-level BPE: no pad token, <|endoftext|> as bos/eos."""
    return str(tiny_tokenizers.train_byte_level_bpe(tmp_path_factory.mktemp("tok") / "bpe"))


@pytest.fixture(scope="session")
def bpe_no_max_dir(tmp_path_factory) -> str:
    """A byte-level BPE whose model_max_length is transformers' 1e30 placeholder."""
    return str(tiny_tokenizers.train_byte_level_bpe(tmp_path_factory.mktemp("tok") / "bpe-nomax", model_max_length=None))


@pytest.fixture(scope="session")
def clip_tok_dir(tmp_path_factory) -> str:
    return str(tiny_tokenizers.train_clip_style_bpe(tmp_path_factory.mktemp("tok") / "clip"))


@pytest.fixture(scope="session")
def packed_output(ray_cluster, tmp_path_factory):
    """A finished packed (tokenizer.pack) tokens stage, built once: see tests/test_pack_verify.py's packed_job."""
    from test_pack_verify import packed_job

    return packed_job(tmp_path_factory.mktemp("packed"))

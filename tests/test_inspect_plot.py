"""`embedpipe inspect` and `embedpipe plot` on real outputs of the MiniLM job (tokens + embeddings)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from jobs.ops_commands import inspect as inspect_command
from jobs.ops_commands import plot as plot_command
from pipeline.config import validate_config
from pipeline.data.reader import arrow_to_tensor
from pipeline.ops.inspect import inspect_path
from pipeline.ops.inspect_format import display_width, fit
from pipeline.ops.plot import load_sample, pca_2d, spread_order
from pipeline.ops.plot_render import Fonts, label_text
from pipeline.output.shards import read_shard
from pipeline.run.driver import run_job

ENGLISH = ["A cat sits on the mat.", "Tokenizers turn text into numbers.", "The quick brown fox jumps.",
           "Embeddings place similar sentences close together.", "Short."]
MIXED = ["机器学习模型需要大量的训练数据。", "Emoji 😀 and accents: café, naïve.", "مرحبا بالعالم",
         "Привет, мир! Как дела?", "数据集 and 模型 side by side", "Ein kurzer deutscher Satz."]


def _write(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def _job(corpus: Path, out: Path, **encoder) -> None:
    config = validate_config({
        "input": {"path": str(corpus)},
        "output": {"path": str(out), "shard_rows": 40},
        "tokenizer": {"name": "minilm", "max_length": 64},
        "encoder": {"model": "minilm", "pooling": "mean", "normalize": True, **encoder},
    })
    run_job(config)


@pytest.fixture(scope="module")
def out(ray_cluster, tmp_path_factory) -> Path:
    """100 rows in two files (ids ``<file>:<line>``), 4 shards of at most 40 rows, pooled float32 vectors."""
    root = tmp_path_factory.mktemp("inspect")
    corpus = root / "corpus"
    corpus.mkdir()
    _write(corpus / "en.jsonl", [f"{t} Number {i}." if i >= len(ENGLISH) else t
                                 for i, t in enumerate((ENGLISH * 10)[:50])])
    _write(corpus / "mixed.jsonl", (MIXED * 9)[:50])
    _job(corpus, root / "out")
    return root / "out"


@pytest.fixture(scope="module")
def per_token_out(ray_cluster, tmp_path_factory) -> Path:
    """Per-token hidden states (pooling none) stored as bfloat16."""
    root = tmp_path_factory.mktemp("inspect-bf16")
    _write(root / "c.jsonl", (ENGLISH + MIXED) * 2)
    _job(root / "c.jsonl", root / "out", pooling="none", normalize=False, output_dtype="bfloat16")
    return root / "out"


@pytest.fixture(scope="module")
def hf_tokenizer(minilm_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def _invoke(command, *args: str):
    result = CliRunner().invoke(command, list(args), catch_exceptions=False)
    return result


def _expected_text(hf, input_ids: list[int]) -> str:
    """What transformers decodes for the row, without the special tokens but [UNK] (inspect keeps it)."""
    skip = set(hf.all_special_ids) - {hf.unk_token_id}
    return hf.decode([i for i in input_ids if i not in skip])


def test_inspect_output_dir_shows_shards_schema_and_decoded_rows(out, hf_tokenizer):
    result = _invoke(inspect_command, str(out), "--rows", "3")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"{out}/tokens: 4 shards, 100 rows" in text and f"{out}/embeddings: 4 shards, 100 rows" in text
    assert "data-00000-of-00004.arrow         40" in text and text.count("  yes") == 8  # committed per manifest
    assert "input_ids       fixed_size_list<item: uint16>[64]" in text
    assert "attention_mask  fixed_size_list<item: int8>[64]" in text
    assert "embedding  fixed_size_list<item: float>[384]  [embedpipe.dtype=float32]" in text
    assert "embedding: shape (40, 384), stored as float32" in text

    first = read_shard(out / "tokens" / "data-00000-of-00004.arrow")
    for k in range(3):
        ids = first.column("input_ids")[k].as_py()
        want = _expected_text(hf_tokenizer, ids)
        assert want == hf_tokenizer.decode(ids, skip_special_tokens=True)  # English rows: no [UNK]
        assert want == ENGLISH[k].lower()
        assert f"text: {want}" in text
        assert f"id=en.jsonl:{k + 1}" in text
    # The token table: position, token string, id and mask lined up; padding collapsed into one cell.
    assert "[CLS]" in text and "[SEP]" in text and "[PAD]×" in text
    assert any(line.strip().startswith("mask  1") for line in text.splitlines())


def test_inspect_stage_dir_and_one_shard(out, hf_tokenizer):
    stage = _invoke(inspect_command, str(out / "embeddings"), "-n", "2")
    assert stage.exit_code == 0, stage.output
    assert "embeddings shard, 40 rows" in stage.stdout and "norm 1.0000" in stage.stdout
    assert f"text: {ENGLISH[0].lower()}" in stage.stdout  # the matching token row's text

    shard = out / "tokens" / "data-00002-of-00004.arrow"  # mixed.jsonl: Chinese first
    single = _invoke(inspect_command, str(shard), "--rows", "2", "--json")
    assert single.exit_code == 0, single.output
    report = json.loads(single.stdout)
    assert report["kind"] == "shard" and report["stages"] == []
    (detail,) = report["shards"]
    table = read_shard(shard)
    assert detail["rows"] == table.num_rows == 40 and detail["committed"] == "yes"
    assert detail["bytes"] == shard.stat().st_size
    for k, row in enumerate(detail["rows_shown"]):
        ids = table.column("input_ids")[k].as_py()
        assert row["input_ids"] == ids and row["attention_mask"] == table.column("attention_mask")[k].as_py()
        assert row["text"] == _expected_text(hf_tokenizer, ids)
        assert row["tokens"] == hf_tokenizer.convert_ids_to_tokens(ids)
    assert "学" in detail["rows_shown"][0]["text"] and "[UNK]" in detail["rows_shown"][0]["text"]
    text = _invoke(inspect_command, str(shard), "--rows", "1").stdout
    assert f"text: {detail['rows_shown'][0]['text']}" in text


def test_inspect_json_parses_for_an_output(out):
    result = _invoke(inspect_command, str(out), "--json", "--rows", "1")
    report = json.loads(result.stdout)
    assert report["kind"] == "output" and report["tokenizer"] == "minilm" and report["status"] == "complete"
    assert [s["stage"] for s in report["stages"]] == ["tokens", "embeddings"]
    assert sum(s["rows"] for s in report["stages"][0]["shards"]) == 100
    emb = report["shards"][1]
    assert emb["embedding"] == {"shape": [40, 384], "dtype": "float32"}
    schema = {f["name"]: f for f in emb["schema"]}
    assert schema["embedding"]["metadata"] == {"embedpipe.dtype": "float32"}
    assert abs(emb["rows_shown"][0]["norm"] - 1.0) < 1e-5 and len(emb["rows_shown"][0]["values"]) == 6


def test_bad_paths_exit_2_with_a_clear_message(out, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    missing = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "inspect", str(tmp_path / "nope")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2
    assert f"embedpipe: error: {tmp_path / 'nope'}: no such file or directory" in missing.stderr
    assert "Traceback" not in missing.stderr

    not_a_shard = _invoke(inspect_command, str(out / "manifest.json"))
    assert not_a_shard.exit_code == 2 and "not an Arrow IPC stream shard" in not_a_shard.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _invoke(inspect_command, str(empty)).exit_code == 2
    not_an_output = _invoke(plot_command, str(empty), "--out", str(tmp_path / "p.png"))
    assert not_an_output.exit_code == 2 and "no manifest.json" in not_an_output.stderr
    bad_column = _invoke(plot_command, str(out), "--out", str(tmp_path / "p.png"), "--color-by", "colour")
    assert bad_column.exit_code == 2 and "--color-by colour: no such column" in bad_column.stderr


def test_plot_renders_a_png_that_is_not_blank(out, tmp_path):
    from PIL import Image

    png = tmp_path / "pca.png"
    result = _invoke(plot_command, str(out), "--out", str(png), "--sample", "80", "--labels", "12")
    assert result.exit_code == 0, result.output
    assert "plot: 80 of 100 embeddings" in result.stdout and "labelled" in result.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 900)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    non_white = (pixels < 250).any(axis=1).mean()
    assert 0.01 < non_white < 0.6
    assert len(np.unique(pixels, axis=0)) > 100  # points, anti-aliased text and lines, not a flat image


def test_pca_matches_the_covariance_eigendecomposition(out):
    rng = np.random.default_rng(3)
    synthetic = rng.normal(size=(300, 20)) * np.linspace(5, 0.1, 20) + 7.0
    real = load_sample(out, sample=100, seed=0).vectors
    for x in (synthetic, real):
        coords, explained = pca_2d(x)
        centred = x - x.mean(axis=0)
        values, vectors = np.linalg.eigh(np.cov(centred, rowvar=False))
        top = np.argsort(values)[::-1][:2]
        want = centred @ vectors[:, top]
        for k in range(2):
            sign = np.sign(want[:, k] @ coords[:, k])
            np.testing.assert_allclose(coords[:, k], sign * want[:, k], atol=1e-4 * np.abs(want).max())
        np.testing.assert_allclose(explained, values[top] / values.sum(), rtol=1e-6)
    assert np.allclose(pca_2d(synthetic)[0], pca_2d(synthetic.copy())[0])  # signs fixed: same picture again


def test_color_by_source_and_by_a_column(out, tmp_path):
    by_source = load_sample(out, sample=60, seed=1, color_by="source")
    assert set(by_source.color_values) == {"en.jsonl", "mixed.jsonl"}
    assert by_source.color_values == [i.rsplit(":", 1)[0] for i in by_source.ids]
    lengths = load_sample(out, sample=60, seed=1, color_by="length")
    tokens = {r: n for p in sorted((out / "tokens").glob("*.arrow")) for r, n in
              zip(read_shard(p).column("id").to_pylist(), read_shard(p).column("length").to_pylist(), strict=True)}
    assert lengths.color_values == [tokens[i] for i in lengths.ids]
    for column in ("source", "length"):
        png = tmp_path / f"{column}.png"
        result = _invoke(plot_command, str(out), "--out", str(png), "--color-by", column, "--labels", "5")
        assert result.exit_code == 0, result.output
        assert png.stat().st_size > 10_000


def test_sampling_is_reproducible_by_seed(out):
    first, again = load_sample(out, sample=30, seed=7), load_sample(out, sample=30, seed=7)
    other = load_sample(out, sample=30, seed=8)
    assert first.ids == again.ids and np.array_equal(first.vectors, again.vectors)
    assert len(set(first.ids)) == 30 and first.ids != other.ids
    assert np.array_equal(pca_2d(first.vectors)[0], pca_2d(again.vectors)[0])
    everything = load_sample(out, sample=5000, seed=0)
    assert everything.total == 100 and len(everything.ids) == 100
    assert list(everything.rows) == list(range(100))


def test_per_token_bfloat16_is_mean_pooled_over_real_tokens(per_token_out, tmp_path):
    shard = per_token_out / "embeddings" / "data-00000-of-00001.arrow"
    report = inspect_path(shard, rows=1)
    assert report["shards"][0]["embedding"] == {"shape": [22, 64, 384], "dtype": "bfloat16"}
    sample = load_sample(per_token_out, sample=22, seed=0)
    table = read_shard(shard)
    hidden = arrow_to_tensor(table.column("embedding"), table.schema.field("embedding")).float().numpy()
    mask = np.asarray(read_shard(per_token_out / "tokens" / shard.name).column("attention_mask").to_pylist(),
                      dtype=np.float32)
    want = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(sample.vectors, want, rtol=1e-5, atol=1e-6)

    no_tokens = tmp_path / "out"
    shutil.copytree(per_token_out, no_tokens, ignore=shutil.ignore_patterns("tokens"))
    unmasked = load_sample(no_tokens, sample=22, seed=0)
    np.testing.assert_allclose(unmasked.vectors, hidden.mean(1), rtol=1e-5, atol=1e-6)
    assert unmasked.notes == [f"{shard.name}: no attention mask stored: "
                              "per-token embeddings averaged over all positions"]


def test_labels_fall_back_when_no_font_has_the_glyphs():
    ascii_only = Fonts(["DejaVu Sans"], set(range(32, 127)) | {0xFFFD, 0x2026})
    assert label_text("机器学习模型需要大量的训练数据", "mixed.jsonl:1", ascii_only, "[UNK]") == \
        ("[CJK] mixed.jsonl:1", "CJK")
    text, script = label_text("a model named 模 here", "x:1", ascii_only, "[UNK]")
    assert text == "a model named \ufffd here" and script == "CJK"
    assert label_text("[UNK] [UNK] [UNK] tail " + "x" * 40, "x:2", ascii_only, "[UNK]")[0] == \
        "\ufffd tail " + "x" * 22 + "…"


def test_spread_order_and_terminal_helpers():
    points = np.array([[0.0, 0.0], [0.01, 0.0], [1.0, 1.0], [-1.0, 1.0], [0.0, -1.0]])
    order = spread_order(points, 4)
    assert len(order) == 4 and len(set(order)) == 4 and 1 not in order  # the near-duplicate comes last
    assert display_width("机器ab") == 6 and fit("机器学习模型", 7) == "机器学…"

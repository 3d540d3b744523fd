"""Quantized output dtypes (int8, uint8, binary, ubinary) against sentence-transformers' quantize_embeddings:
the arithmetic alone, the Arrow field, whole jobs (calibrated ranges in the manifest, reused on a rerun),
the readers, verify, inspect and plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sentence_transformers import SentenceTransformer, quantize_embeddings
from sentence_transformers.util.quantization import _dequantize_embeddings  # the library's inverse
from test_static_models import TEXTS, build_st_static
from tiny_models import build_tiny_bert

from pipeline.config import validate_config
from pipeline.data import ShardDataset, StreamingDataset
from pipeline.encode.stage import ShardEncoder, calibrate_ranges, plan_embed, with_ranges
from pipeline.errors import ConfigError
from pipeline.ops.inspect import inspect_path
from pipeline.ops.plot import plot_embeddings
from pipeline.ops.verify import verify_output
from pipeline.output.contract import TOKENS
from pipeline.output.embedding_format import (
    arrow_to_numpy,
    decode_embeddings,
    embedding_arrow_field,
    embeddings_to_arrow,
    field_dims,
    field_ranges,
    vector_dim,
)
from pipeline.output.manifest import save_manifest
from pipeline.output.quantize import QUANTIZED, calibration_ranges, quantize
from pipeline.output.shards import read_shard, write_shard
from pipeline.run.driver import run_job
from pipeline.tokenize.core import to_table, tokenize_texts
from pipeline.tokenize.loading import load_tokenize_spec

DIM = 20  # not a multiple of 8: the last packed byte is part padding


def _floats(rows: int = 300, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


@pytest.mark.parametrize("precision", QUANTIZED)
def test_quantize_is_bit_identical_to_sentence_transformers(precision):
    x = _floats()
    ranges = calibration_ranges(x[:100])  # calibrated on a sample: later rows fall outside and are clipped
    ours = quantize(x, precision, ranges)
    ref = quantize_embeddings(x, precision=precision, ranges=ranges)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    if precision.endswith("int8"):  # its own ranges are the min / max sentence-transformers computes
        assert np.array_equal(calibration_ranges(x), np.vstack((x.min(0), x.max(0))))


def _ipc_round_trip(table: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


@pytest.mark.parametrize("precision", QUANTIZED)
def test_the_field_says_the_dtype_and_decodes(precision):
    x = _floats()
    ranges = calibration_ranges(x) if precision.endswith("int8") else None
    stored = quantize(x, precision, ranges)
    field = embedding_arrow_field("embedding", DIM, None, precision, ranges)
    table = _ipc_round_trip(pa.table([embeddings_to_arrow(stored, field)], schema=pa.schema([field])))
    back_field = table.schema.field("embedding")
    dims, dtype = field_dims(back_field)
    assert dtype == precision and vector_dim(back_field) == DIM
    assert dims == ([3] if precision.endswith("binary") else [DIM])  # ceil(20 / 8) packed bytes
    values = arrow_to_numpy(table.column("embedding"), back_field)
    assert np.array_equal(values, stored)
    if precision.endswith("binary"):
        bits = decode_embeddings(values, back_field, unpack=True)
        assert bits.shape == (len(x), DIM) and np.array_equal(bits, (x > 0).astype(np.uint8))
        assert np.array_equal(decode_embeddings(values, back_field, to_float=True), np.where(x > 0, 1.0, -1.0))
    else:
        assert np.array_equal(field_ranges(back_field), ranges)
        approx = decode_embeddings(values, back_field, to_float=True)
        assert np.allclose(approx, _dequantize_embeddings(stored, precision, ranges).astype(np.float32))
        step = (ranges[1] - ranges[0]) / 255
        assert (np.abs(approx - x) <= step + 1e-6).all()  # within one step of the original


def test_a_wrong_ranges_file_is_a_config_error(tmp_path):
    from pipeline.output.quantize import load_ranges

    np.save(tmp_path / "r.npy", np.zeros((3, DIM), np.float32))
    with pytest.raises(ConfigError, match=r"shape \(3, 20\).*expected floats of shape \(2, 20\)"):
        load_ranges(str(tmp_path / "r.npy"), DIM)


# ---------------------------------------------------------------- the embed stage


ROWS, SHARD_ROWS, CALIBRATION_ROWS = 48, 16, 12
NAMES = [f"data-0000{i}-of-00003.arrow" for i in range(3)]


def _corpus(tmp_path: Path, rows: int = ROWS) -> Path:
    path = tmp_path / "corpus.jsonl"
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(rows)]
    path.write_text("".join(json.dumps({"id": f"r{i}", "text": t}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return path


def _texts(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]


def _config(corpus: Path, out: Path, model: str, **encoder):
    return validate_config({"input": {"path": str(corpus), "id_column": "id"},
                            "output": {"path": str(out), "shard_rows": SHARD_ROWS},
                            "encoder": {"model": model, "calibration_rows": CALIBRATION_ROWS, **encoder}})


def _stored(out: Path) -> tuple[np.ndarray, pa.Field]:
    tables = [read_shard(out / "embeddings" / name) for name in NAMES]
    field = tables[0].schema.field("embedding")
    return np.concatenate([arrow_to_numpy(t.column("embedding"), field) for t in tables]), field


def _embed_in_process(config, texts: list[str]) -> tuple[np.ndarray, pa.Field]:
    """The stage functions without Ray, as the driver sequences them: token shards committed, the ranges
    calibrated on the first shard's first rows (int8 / uint8 without configured ranges), every shard embedded."""
    out = Path(config.output.path)
    spec = load_tokenize_spec(config)
    for k, name in enumerate(NAMES):
        part = texts[k * SHARD_ROWS:(k + 1) * SHARD_ROWS]
        write_shard(to_table(spec, tokenize_texts(spec, [str(i) for i in range(len(part))], part)), out / TOKENS / name)
    embed = plan_embed(config, spec, "cpu", 1)
    if embed.needs_ranges:
        embed = with_ranges(embed, calibrate_ranges(embed, str(out), NAMES[0], config.encoder.calibration_rows))
    encoder = ShardEncoder(embed)
    reports = {name: encoder.embed_shard(str(out), name) for name in NAMES}
    # The driver's record of the committed shards (their reports), which the training readers list shards by.
    save_manifest(out, {"format_version": 1, "config_hash": "", "plan": {"units": [], "shards": len(NAMES)},
                        "stages": {"embeddings": {"status": "complete", "shards": reports}}})
    return _stored(out)


def _same_rows(ours: np.ndarray, ref: np.ndarray) -> float:
    """The fraction of rows whose bytes are identical."""
    return float((ours.reshape(len(ours), -1) == ref.reshape(len(ref), -1)).all(axis=1).mean())


@pytest.fixture(scope="module")
def st_static(tmp_path_factory) -> str:
    return str(build_st_static(tmp_path_factory.mktemp("st-static") / "model", dim=DIM))


@pytest.fixture(scope="module")
def st_floats(st_static, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The corpus and SentenceTransformer.encode's float32 vectors of it: the reference."""
    corpus = _corpus(tmp_path_factory.mktemp("corpus"))
    return corpus, SentenceTransformer(st_static, device="cpu").encode(_texts(corpus))


@pytest.mark.parametrize("precision", QUANTIZED)
def test_each_dtype_equals_quantize_embeddings_of_sentence_transformers(tmp_path, st_static, st_floats, precision):
    corpus, floats = st_floats
    ours, field = _embed_in_process(_config(corpus, tmp_path / "out", st_static, output_dtype=precision),
                                    _texts(corpus))
    ranges = field_ranges(field)
    if precision.endswith("int8"):  # calibrated as sentence-transformers would on the first shard's first rows
        np.testing.assert_allclose(ranges, calibration_ranges(floats[:CALIBRATION_ROWS]), rtol=0, atol=1e-6)
    else:
        assert ranges is None
    ref = quantize_embeddings(floats, precision=precision, ranges=ranges)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert _same_rows(ours, ref) >= 0.99


def test_configured_ranges_are_used_as_given(tmp_path, st_static, st_floats):
    corpus, floats = st_floats
    ranges = np.vstack((np.full(DIM, -0.5), np.full(DIM, 0.5))).astype(np.float32)
    np.save(tmp_path / "ranges.npy", ranges)
    config = _config(corpus, tmp_path / "out", st_static, output_dtype="uint8",
                     quantize_ranges=str(tmp_path / "ranges.npy"))
    ours, field = _embed_in_process(config, _texts(corpus))
    assert np.array_equal(field_ranges(field), ranges)
    assert _same_rows(ours, quantize_embeddings(floats, precision="uint8", ranges=ranges)) >= 0.99


def test_a_transformer_s_int8_equals_quantize_embeddings_of_its_float32(tmp_path):
    model = str(build_tiny_bert(tmp_path / "bert"))
    corpus = _corpus(tmp_path)
    floats, _ = _embed_in_process(_config(corpus, tmp_path / "float", model), _texts(corpus))
    ours, field = _embed_in_process(_config(corpus, tmp_path / "int8", model, output_dtype="int8"), _texts(corpus))
    ranges = field_ranges(field)
    np.testing.assert_allclose(ranges, calibration_ranges(floats[:CALIBRATION_ROWS]), rtol=0, atol=1e-5)
    assert _same_rows(ours, quantize_embeddings(floats, precision="int8", ranges=ranges)) >= 0.99


def test_per_token_output_cannot_be_quantized(tmp_path):
    model = str(build_tiny_bert(tmp_path / "bert"))
    config = _config(_corpus(tmp_path), tmp_path / "out", model, pooling="none", output_dtype="int8")
    with pytest.raises(ConfigError, match="per-token output"):
        plan_embed(config, load_tokenize_spec(config), "cpu", 1)


# ---------------------------------------------------------------- whole jobs (the driver, on the default executor)


@pytest.fixture(scope="module")
def int8_job(st_static, st_floats, tmp_path_factory) -> Path:
    corpus, _ = st_floats
    out = tmp_path_factory.mktemp("int8-job") / "out"
    run_job(_config(corpus, out, st_static, output_dtype="int8"))
    return out


def test_int8_job_records_its_ranges_and_reads_back(int8_job, st_floats, tmp_path):
    _, floats = st_floats
    out = int8_job
    record = json.loads((out / "manifest.json").read_text())["stages"]["embeddings"]["quantization"]
    assert record["calibration"] == {"shard": NAMES[0], "rows": CALIBRATION_ROWS}
    ranges = np.asarray(record["ranges"], np.float32)
    ours, field = _stored(out)
    assert np.array_equal(field_ranges(field), ranges)  # every shard carries them too
    np.testing.assert_allclose(ranges, calibration_ranges(floats[:CALIBRATION_ROWS]), rtol=0, atol=1e-6)
    ref = quantize_embeddings(floats, precision="int8", ranges=ranges)
    assert _same_rows(ours, ref) >= 0.99
    assert verify_output(out).problems == []
    detail = inspect_path(out / "embeddings" / NAMES[0], rows=2)["shards"][0]
    assert detail["embedding"]["dtype"] == "int8" and len(detail["rows_shown"]) == 2
    shown = np.asarray(detail["rows_shown"][0]["values"], np.float32)  # decoded through the ranges
    np.testing.assert_allclose(shown, _dequantize_embeddings(ours[:1], "int8", ranges)[0, :len(shown)], atol=1e-6)
    stored = ShardDataset(str(out), "embeddings", format="numpy")[:5]["embedding"]
    assert stored.dtype == np.int8 and np.array_equal(stored, ours[:5])  # as stored by default
    approx = ShardDataset(str(out), "embeddings", dequantize=True)[:5]["embedding"].numpy()
    assert np.allclose(approx, _dequantize_embeddings(ours[:5], "int8", ranges), atol=1e-6)
    result = plot_embeddings(out, tmp_path / "pca.png", labels=0)
    assert (tmp_path / "pca.png").stat().st_size > 0 and len(result.rows) == ROWS


def test_a_second_run_reproduces_the_ranges_and_the_bytes(tmp_path, st_static, st_floats):
    corpus, _ = st_floats
    runs = [_embed_in_process(_config(corpus, tmp_path / f"out{k}", st_static, output_dtype="uint8"), _texts(corpus))
            for k in range(2)]
    assert np.array_equal(field_ranges(runs[0][1]), field_ranges(runs[1][1]))
    for name in NAMES:
        assert (tmp_path / "out0" / "embeddings" / name).read_bytes() == (tmp_path / "out1" / "embeddings" / name).read_bytes()


def test_a_rerun_quantizes_with_the_recorded_ranges(int8_job, st_static, st_floats, tmp_path):
    import shutil

    corpus, floats = st_floats
    out = tmp_path / "out"
    shutil.copytree(int8_job, out)
    first, lost = out / "embeddings" / NAMES[0], out / "embeddings" / NAMES[2]
    before = first.read_bytes()
    # The record is what a rerun quantizes with, not a new calibration: altered (as if calibration had given
    # other ranges), the shard the rerun redoes after a "crash" follows it, and the kept shards stay as they were.
    manifest = json.loads((out / "manifest.json").read_text())
    altered = np.asarray(manifest["stages"]["embeddings"]["quantization"]["ranges"], np.float32) * 2
    manifest["stages"]["embeddings"]["quantization"]["ranges"] = altered.tolist()
    (out / "manifest.json").write_text(json.dumps(manifest))
    lost.unlink()
    run_job(_config(corpus, out, st_static, output_dtype="int8"))
    redone = read_shard(lost)
    assert np.array_equal(field_ranges(redone.schema.field("embedding")), altered)
    values = arrow_to_numpy(redone.column("embedding"), redone.schema.field("embedding"))
    expect = quantize_embeddings(floats[2 * SHARD_ROWS:], precision="int8", ranges=altered)
    assert _same_rows(values, expect) >= 0.99 and first.read_bytes() == before


def test_binary_reads_back_unpacked(tmp_path, st_static, st_floats):
    corpus, floats = st_floats
    out = tmp_path / "out"
    _, field = _embed_in_process(_config(corpus, out, st_static, output_dtype="ubinary"), _texts(corpus))
    assert field_dims(field) == ([3], "ubinary") and vector_dim(field) == DIM  # ceil(20 / 8) bytes a row
    bits = (floats > 0).astype(np.uint8)
    stream = StreamingDataset(str(out), "embeddings", batch_size=16, shuffle=False, unpack_bits=True)
    assert np.array_equal(np.concatenate([b["embedding"].numpy() for b in stream]), bits)
    packed = ShardDataset(str(out), "embeddings", format="numpy")[:4]["embedding"]
    assert packed.dtype == np.uint8 and np.array_equal(packed, quantize_embeddings(floats[:4], precision="ubinary"))
    signs = ShardDataset(str(out), "embeddings", dequantize=True, format="numpy")[:4]["embedding"]
    assert np.array_equal(signs, bits[:4] * 2.0 - 1)
    plot_embeddings(out, tmp_path / "pca.png", labels=0)
    assert (tmp_path / "pca.png").stat().st_size > 0


def test_a_ranges_file_changed_under_the_same_name_is_refused(st_static, st_floats, tmp_path):
    from pipeline.errors import JobFailed

    corpus, _ = st_floats
    path = tmp_path / "ranges.npy"
    np.save(path, np.vstack((np.full(DIM, -0.5), np.full(DIM, 0.5))).astype(np.float32))
    config = _config(corpus, tmp_path / "out", st_static, output_dtype="uint8", quantize_ranges=str(path))
    run_job(config)
    np.save(path, np.vstack((np.full(DIM, -1.0), np.full(DIM, 1.0))).astype(np.float32))
    (tmp_path / "out" / "embeddings" / NAMES[2]).unlink()  # a rerun would quantize this shard with the new file
    with pytest.raises(JobFailed, match="other ranges than the committed embeddings"):
        run_job(config)

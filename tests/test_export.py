"""``embedpipe export --format megatron``: read back by megatron-core's IndexedDataset, the documents' token streams.

The reference is the ``transformers`` tokenizer's ids of each document + its EOS, in input order. A packed
stage and an unpacked (``padding: none``, ``truncation: false``) stage of the same corpus export to the
same bytes. Refusals (existing files, a dropped remainder, a padded stage) and the read-back check are shown.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from cli_runs import embedpipe
from test_pack_verify import DEMO_BPE, ROWS, packed_job
from transformers import AutoTokenizer

from pipeline.config import validate_config
from pipeline.errors import ConfigError
from pipeline.ops.export import export_megatron
from pipeline.output.megatron import MegatronFormatError, MegatronWriter, check_megatron
from pipeline.output.shards import read_shard
from pipeline.run.driver import run_job

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset",
                                      reason="megatron-core is the reference reader (pip install megatron-core)")


def _reference() -> list[list[int]]:
    hf = AutoTokenizer.from_pretrained(DEMO_BPE)
    return [ids + [hf.eos_token_id] for ids in hf([r["text"] for r in ROWS])["input_ids"]]


@pytest.fixture(scope="module")
def packed(packed_output) -> Path:
    return packed_output


@pytest.fixture(scope="module")
def unpacked(ray_cluster, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run_job(validate_config({
        "input": {"path": str(corpus), "id_column": "id"}, "output": {"path": str(root / "out"), "shard_rows": 20},
        "tokenizer": {"name": DEMO_BPE, "padding": "none", "truncation": False},
    }), stages=("tokens",))
    return root / "out"


def _read_back(prefix: Path) -> list[list[int]]:
    dataset = indexed_dataset.IndexedDataset(str(prefix))
    assert dataset.document_indices.tolist() == list(range(len(dataset) + 1))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_packed_export_read_by_megatron_is_the_documents_in_input_order(packed, tmp_path):
    result = export_megatron(packed, tmp_path / "corpus")
    reference = _reference()
    assert _read_back(tmp_path / "corpus") == reference
    assert (result.documents, result.tokens, result.dtype) == (len(ROWS), sum(map(len, reference)), "uint16")
    assert indexed_dataset.IndexedDataset(str(tmp_path / "corpus")).index.dtype == np.uint16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.bin", "corpus.idx"]  # no temporary left


def test_unpacked_export_appends_eos_and_equals_the_packed_export(packed, unpacked, tmp_path):
    export_megatron(packed, tmp_path / "packed")
    export_megatron(unpacked, tmp_path / "unpacked")
    assert _read_back(tmp_path / "unpacked") == _reference()
    for suffix in (".bin", ".idx"):
        digests = {hashlib.sha256((tmp_path / f"{kind}{suffix}").read_bytes()).hexdigest()
                   for kind in ("packed", "unpacked")}
        assert len(digests) == 1, suffix


def test_cli_export_refuses_existing_files_and_replaces_them_only_with_force(packed, tmp_path):
    prefix = tmp_path / "corpus"
    (tmp_path / "corpus.bin").write_bytes(b"someone else's file")
    done = embedpipe("export", str(packed), "--format", "megatron", "--output", str(prefix))
    assert done.returncode == 2 and "corpus.bin already exist" in done.stderr, done.stderr
    assert (tmp_path / "corpus.bin").read_bytes() == b"someone else's file"
    done = embedpipe("export", str(packed), "--output", str(prefix), "--force")
    assert done.returncode == 0, done.stderr
    assert f"export: {len(ROWS)} documents" in done.stdout
    assert _read_back(prefix) == _reference()


def test_export_refuses_what_cannot_give_whole_documents(ray_cluster, tmp_path):
    (tmp_path / "drop").mkdir()
    dropped = packed_job(tmp_path / "drop", pack_remainder="drop")
    with pytest.raises(ConfigError, match="pack_remainder is 'drop'"):
        export_megatron(dropped, tmp_path / "x")
    manifest = json.loads((dropped / "manifest.json").read_text())
    manifest["config"]["tokenizer"] = {"padding": "max_length", "stride": None}  # as a padded stage records it
    (dropped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="padded or chunked"):
        export_megatron(dropped, tmp_path / "x")
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".x*"))


def test_the_read_back_check_catches_a_changed_file(tmp_path):
    prefix = tmp_path / "c"
    with MegatronWriter(prefix, np.dtype("uint16")) as writer:
        writer.add(np.arange(10, dtype=np.uint16), np.array([3, 7]))
        writer.commit()
    bin_path, idx_path = tmp_path / "c.bin", tmp_path / "c.idx"
    digest = hashlib.sha256(bin_path.read_bytes()).hexdigest()
    check_megatron(bin_path, idx_path, 2, 10, digest)
    data = bytearray(bin_path.read_bytes())
    data[4] ^= 1
    bin_path.write_bytes(bytes(data))
    with pytest.raises(MegatronFormatError, match="bytes differ"):
        check_megatron(bin_path, idx_path, 2, 10, digest)
    index = bytearray(idx_path.read_bytes())
    index[34] = 4  # the first sequence's length
    idx_path.write_bytes(bytes(index))
    with pytest.raises(MegatronFormatError, match="pointers or lengths"):
        check_megatron(bin_path, idx_path, 2, 10, digest)
    with pytest.raises(MegatronFormatError, match="sequences"):
        check_megatron(bin_path, idx_path, 3, 10, digest)


def test_export_reads_an_output_on_object_storage(packed, tmp_path):
    """OUT as an fsspec URL (memory:// standing in for s3://): the same files as from the local copy; the
    export itself goes to a local path (Megatron memory-maps it), and a URL there is refused."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in packed.rglob("*"):
        if path.is_file() and ".staging" not in path.parts:
            fs.pipe(f"memory://export-test/out/{path.relative_to(packed).as_posix()}", path.read_bytes())
    try:
        export_megatron("memory://export-test/out", tmp_path / "remote")
        export_megatron(packed, tmp_path / "local")
        for suffix in (".bin", ".idx"):
            assert (tmp_path / f"remote{suffix}").read_bytes() == (tmp_path / f"local{suffix}").read_bytes()
        with pytest.raises(ConfigError, match="local path"):
            export_megatron(packed, "s3://bucket/corpus")
    finally:
        fs.rm("memory://export-test", recursive=True)


def test_a_failed_export_leaves_nothing_behind(packed, tmp_path, monkeypatch):
    """A shard that cannot be read mid-way: no PREFIX.bin / .idx, and no temporary file either."""
    import pipeline.ops.export as export

    reads = []

    def failing_read(path):
        reads.append(path)
        if len(reads) > 2:  # the dtype probe and the first shard read, then a failure
            raise OSError(5, "Input/output error", str(path))
        return read_shard(path)

    monkeypatch.setattr(export, "read_shard", failing_read)
    with pytest.raises(OSError):
        export_megatron(packed, tmp_path / "corpus")
    assert list(tmp_path.iterdir()) == []

"""The GPU check kit (benchmarks/gpu_check.sh, issue 17) keeps working without a GPU.

A tiny kit is prepared from the package's sample corpus, then the shell script runs the whole check on the
CPU (``--device cpu --quick``: tiny stand-in models, the same code paths) as a real subprocess, and every
section of its JSON is checked for sane values. The CUDA-only parts must say ``skipped: cpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
EXPECTED_SECTIONS = [
    "environment", "models",
    "embed/minilm-256/bfloat16", "embed/minilm-256/float32", "embed/clip-77/bfloat16", "embed/clip-77/float32",
    "sentence_transformers/float16/32", "sentence_transformers/float16/128",
    "sentence_transformers/float32/32", "sentence_transformers/float32/128",
    "cosine/cpu_reference", "cosine/cross", "oom_backoff",
    "profile/minilm-256/bfloat16", "profile/clip-77/bfloat16", "batch_budget_sweep", "tokenize",
    "targets", "import_audit",
]


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, PYTHON=sys.executable, GPU_KIT=str(tmp / "kit"), GPU_CHECK_WORK=str(tmp / "work"),
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> tuple[Path, dict, dict]:
    """(kit folder, kit.json, gpu_check.json) of a tiny prepare + a CPU quick run through the shell script."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    env = _env(tmp)
    prepared = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "prepare", "--tiny", "--kit", env["GPU_KIT"]],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert "travels with a device call" in prepared.stdout
    out = tmp / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--device", "cpu", "--quick"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    kit = Path(env["GPU_KIT"])
    return kit, json.loads((kit / "kit.json").read_text()), json.loads((out / "gpu_check.json").read_text())


def _formula_flops(lengths: np.ndarray, layers: int, d: int, f: int, causal: bool) -> float:
    n = lengths.astype(np.float64)
    pairs = n * (n + 1) / 2 if causal else n * n
    return float((layers * (n * 2 * (4 * d * d + 2 * d * f) + 4 * d * pairs)).sum())


def test_kit_holds_shards_configs_and_fits_the_transfer(checked):
    kit, info, _ = checked
    for name, rows in (("minilm-256", 96), ("clip-77", 48)):
        entry = info["sets"][name]
        assert entry["rows"] == rows == sum(s["rows"] for s in entry["shards"])
        for shard in entry["shards"]:
            with pa.memory_map(str(kit / "shards" / name / shard["name"])) as source:
                table = pa.ipc.open_stream(source).read_all()
            width = table.schema.field("input_ids").type.list_size
            assert width == entry["max_length"] and table.num_rows == shard["rows"]
            assert int(np.asarray(table.column("length")).sum()) == shard["tokens"]
    assert info["travelling_bytes"]["total"] < 64 * 2**20
    clip = json.loads((kit / "models" / "clip-l" / "config.json").read_text())
    assert (clip["hidden_size"], clip["num_hidden_layers"], clip["num_attention_heads"], clip["intermediate_size"],
            clip["vocab_size"], clip["max_position_embeddings"]) == (768, 12, 12, 3072, 49408, 77)
    minilm = json.loads((kit / "models" / "minilm" / "config.json").read_text())
    assert (minilm["model_type"], minilm["hidden_size"], minilm["num_hidden_layers"]) == ("bert", 384, 6)
    assert all((kit / "tokenizer" / f).is_file() for f in ("tokenizer.json", "vocab.txt"))


def test_every_section_ran_without_error(checked):
    _, _, results = checked
    sections = results["sections"]
    assert sorted(sections) == sorted(EXPECTED_SECTIONS)
    bad = {k: v.get("error") or v.get("skipped") for k, v in sections.items() if "error" in v or "skipped" in v}
    assert not bad


def test_embed_path_rates_and_flops(checked):
    _, info, results = checked
    sections = results["sections"]
    for set_name in ("minilm-256", "clip-77"):
        shape = sections["models"][set_name]["shape"]
        for dtype in ("bfloat16", "float32"):
            run = sections[f"embed/{set_name}/{dtype}"]
            assert run["rows"] == run["report_rows"] == info["sets"][set_name]["rows"]
            assert run["real_tokens"] == run["report_tokens"] == info["sets"][set_name]["real_tokens"]
            assert run["nonfinite_rows"] == 0 and run["shards"] == len(info["sets"][set_name]["shards"])
            for rates in (run["embed_shard"], run["encode_rows_only"]):
                assert rates["rows_per_s"] > 0 and rates["real_tokens_per_s"] > rates["rows_per_s"]
                assert rates["model_tflops"] > 0 and 0 < rates["model_share_of_bf16_peak"] < 1
            assert run["phases_s"]["encode"] > 0 and run["phases_s"]["commit"] > 0
            assert run["computed_flops"] >= run["real_token_flops"] > 0
    # Model FLOPs from the shape and the real tokens, recomputed here from the formula.
    minilm = sections["embed/minilm-256/float32"]
    lengths = []
    for shard in info["sets"]["minilm-256"]["shards"]:
        with pa.memory_map(str(checked[0] / "shards" / "minilm-256" / shard["name"])) as source:
            lengths.append(np.asarray(pa.ipc.open_stream(source).read_all().column("length")))
    s = sections["models"]["minilm-256"]["shape"]
    want = _formula_flops(np.concatenate(lengths), s["layers"], s["hidden"], s["intermediate"], s["causal"])
    assert minilm["model_flops"] == pytest.approx(want, rel=1e-9)
    clip = sections["embed/clip-77/bfloat16"]
    assert clip["model_flops_counts"] == "every stored position (mask off)"
    assert clip["model_flops"] == pytest.approx(clip["computed_flops"]) and shape["causal"]


def test_sentence_transformers_and_cosines(checked):
    _, info, results = checked
    sections = results["sections"]
    for dtype in ("float16", "float32"):
        for batch in (32, 128):
            st = sections[f"sentence_transformers/{dtype}/{batch}"]
            assert st["rows"] == info["sets"]["minilm-256"]["rows"] and st["rows_per_s"] > 0
            assert st["padding_waste"] >= 1
    for set_name in ("minilm-256", "clip-77"):
        ref = sections["cosine/cpu_reference"][set_name]
        assert ref["rows_compared"] == ref["rows_total"] and ref["subsample"] is False
        assert ref["embed/float32"]["min_cosine"] >= 0.99999 and ref["embed/float32"]["passed"]
        assert ref["embed/bfloat16"]["min_cosine"] >= 0.999 and ref["embed/bfloat16"]["passed"]
    assert sections["cosine/cpu_reference"]["clip-77"]["embed/float32"]["min_position_cosine"] >= 0.99999
    assert sections["cosine/cpu_reference"]["minilm-256"]["st/float32/128"]["min_cosine"] >= 0.99999
    cross = sections["cosine/cross"]
    assert cross["minilm-256 st/float32/32 vs embed/float32"]["min_cosine"] >= 0.99999
    assert all(v["passed"] for v in cross.values() if isinstance(v, dict)), cross


def test_cuda_only_parts_are_marked_skipped_and_the_cpu_stand_ins_work(checked):
    _, _, results = checked
    sections = results["sections"]
    oom = sections["oom_backoff"]
    assert oom["memory_fraction"] == "skipped: cpu" and oom["mode"].startswith("simulated")
    assert oom["backoffs"] > 0 and oom["passed"] and oom["outputs"]["min_cosine"] >= 0.99999
    for set_name in ("minilm-256", "clip-77"):
        profile = sections[f"profile/{set_name}/bfloat16"]
        assert profile["gpu_kernel_share"] == "skipped: cpu"
        assert profile["wall_s"] > 0 and profile["steps_s"]["encode"] > 0 and profile["top_host_ops"]
        assert set(sections["batch_budget_sweep"][set_name]["budgets"]) == {"512", "2048"}
    targets = sections["targets"]
    assert targets["judged"] is False and targets["cosines_vs_cpu_float32"]["passed"]
    assert targets["embed_vs_sentence_transformers_fp16"]["ratio"] > 0
    assert targets["clip_l_share_of_bf16_peak"]["passed"] is None


def test_core_imports_only_what_the_gpu_machine_has(checked):
    audit = checked[2]["sections"]["import_audit"]
    assert audit["recorded"] and audit["missing_on_gpu_machine"] == {}
    assert {"torch", "pyarrow", "numpy"} <= set(audit["first_party_imports"])
    assert "ray" not in audit["first_party_imports"]


def test_script_refuses_clearly_without_wheels_or_kit(tmp_path):
    env = _env(tmp_path)
    (tmp_path / "kit").mkdir()
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--device", "cpu"], cwd=tmp_path,
                          env=dict(env, GPU_CHECK_WHEELS="always"), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and "has no wheels" in done.stderr
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--device", "cpu", "--quick"], cwd=tmp_path,
                          env=dict(env, GPU_CHECK_WHEELS="never"), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode != 0 and "gpu_check.py prepare" in done.stdout + done.stderr


def test_a_section_that_outlives_its_time_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import time

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from gpu_kit.results import Results

    results = Results(tmp_path, {"what": "test"})
    deadline = time.perf_counter() + 60
    assert results.run("slow", lambda: time.sleep(30), deadline=deadline, limit_s=0.5) is None
    assert results.run("fine", lambda: {"ok": True}, deadline=deadline)["ok"]
    assert results.run("late", lambda: {"ok": True}, deadline=deadline, needs_s=120) is None
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert saved["slow"]["error"].startswith("timed out") and saved["slow"]["section_s"] < 5
    assert saved["fine"]["ok"] and saved["late"]["skipped"].startswith("time budget")

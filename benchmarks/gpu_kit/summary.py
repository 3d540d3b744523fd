"""A short table of a results file, printed last (the device call returns the end of the output)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def lines(data: dict[str, Any]) -> list[str]:
    s = data.get("sections", {})
    env = s.get("environment") or {}
    out = [(f"device {data.get('device')} ({env.get('gpu', 'cpu')}), quick={data.get('quick')}, "
            f"elapsed {_fmt(data.get('elapsed_s'), '.0f')} s of {_fmt(data.get('budget_s'), '.0f')}"),
           f"{'section':44} {'rows/s':>10} {'tok/s':>10} {'TFLOP/s':>8} {'of peak':>8}  encode-only TFLOP/s"]
    for name, v in s.items():
        if not isinstance(v, dict):
            continue
        if "error" in v or "skipped" in v:
            out.append(f"{name:44} {'ERROR: ' + v['error'][:60] if 'error' in v else 'skipped: ' + v['skipped'][:60]}")
        elif name.startswith("embed/"):
            e, c = v["embed_shard"], v["encode_rows_only"]
            out.append(f"{name:44} {e['rows_per_s']:10.0f} {e['real_tokens_per_s']:10.0f} {e['model_tflops']:8.2f} "
                       f"{e['model_share_of_bf16_peak']:8.1%}  {c['model_tflops']:.2f}")
        elif name.startswith("sentence_transformers/"):
            out.append(f"{name:44} {v['rows_per_s']:10.0f} {v['real_tokens_per_s']:10.0f} {v['model_tflops']:8.2f} "
                       f"{v['model_share_of_bf16_peak']:8.1%}")
    for set_name, entry in (s.get("cosine/cpu_reference") or {}).items():
        if isinstance(entry, dict) and "rows_compared" in entry:
            worst = {k: v.get("min_cosine") for k, v in entry.items() if isinstance(v, dict) and "min_cosine" in v}
            out.append(f"cosine vs cpu fp32 {set_name} ({entry['rows_compared']} rows): "
                       + ", ".join(f"{k} {_fmt(c, '.6f')}" for k, c in worst.items()))
    for key, v in (s.get("cosine/cross") or {}).items():
        if isinstance(v, dict) and "min_cosine" in v:
            out.append(f"cosine {key}: {_fmt(v['min_cosine'], '.6f')} ({'pass' if v['passed'] else 'FAIL'})")
    oom = s.get("oom_backoff") or {}
    if "passed" in oom:
        out.append(f"oom back-off ({oom.get('mode')}): backoffs {oom.get('backoffs')}, passed {oom['passed']}")
    for name, v in s.items():
        if name.startswith("profile/") and isinstance(v, dict) and "wall_s" in v:
            out.append(f"{name}: wall {v['wall_s']:.3f} s, gpu kernel share {_fmt(v.get('gpu_kernel_share'), '.1%')}, "
                       "steps " + ", ".join(f"{k} {t:.3f}" for k, t in v["steps_s"].items()))
    targets = s.get("targets") or {}
    for key in ("embed_vs_sentence_transformers_fp16", "clip_l_share_of_bf16_peak", "cosines_vs_cpu_float32"):
        v = targets.get(key)
        if isinstance(v, dict):
            shown = {k: v[k] for k in ("ratio", "share", "checked", "failed", "target") if k in v}
            out.append(f"target {key}: passed={v.get('passed')} {shown}")
    audit = s.get("import_audit") or {}
    if "missing_on_gpu_machine" in audit:
        out.append(f"imports missing on the GPU machine: {audit['missing_on_gpu_machine'] or 'none'}")
    return out

"""The output directory between runs: reuse a matching job's output, refuse another's, check committed shards."""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError
from pipeline.output.commit import file_sha256
from pipeline.output.contract import EMBEDDINGS, QUARANTINE_DIR, STAGES
from pipeline.output.manifest import COMPUTED_WITH_KEY, differences, embedding_differences, load_manifest
from pipeline.output.ownership import files_in_the_way, foreign_entries, remove_owned
from pipeline.output.storage import Location, is_remote


def prepare_output(out_dir: Location, old: dict[str, Any] | None, fresh: dict[str, Any], force: bool,
                   increment: dict[str, Any] | None = None,
                   stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """The manifest to continue with: ``old`` (OUT's manifest, read under the lock) if it is the same job,
    else ``fresh``.

    Call it only once every check that can refuse the job has passed: with ``force`` it deletes what
    embedpipe wrote for the stages it redoes (never anything else, see :mod:`pipeline.output.ownership`).
    A different job (input, plan, tokenizer or tokenize settings) redoes both stages; changed encoder
    settings only ``embeddings/``, and only when the embed stage is among ``stages``. With ``increment``
    (new input files since the last run), the existing manifest takes the extended plan and input.

    Raises:
        ConfigError: OUT holds a different job's output (or, for the embed stage, embeddings made with other
            encoder settings) and ``force`` is off; OUT holds files that are not embedpipe's where a job
            writes, or holds other files and is not an embedpipe output and ``force`` is off.
    """
    if old is None:
        _check_fresh_directory(out_dir, force)
        return fresh
    changed = differences(old, fresh, increment=increment is not None)
    if changed:
        if not force:
            raise ConfigError(
                f"{out_dir} holds the output of a different job ({'; '.join(changed)}); "
                "use another output directory, or --force to start over"
            )
        remove_owned(out_dir, (*STAGES, QUARANTINE_DIR))
        return fresh
    encoder_changed = embedding_differences(old, fresh)
    if encoder_changed and EMBEDDINGS in stages:
        if not force:
            raise ConfigError(
                f"{out_dir} holds embeddings made with other encoder settings ({'; '.join(encoder_changed)}); "
                "use another output directory, or --force to redo the embeddings (the committed tokens are kept)"
            )
        remove_owned(out_dir, (EMBEDDINGS,))
        old["stages"].pop(EMBEDDINGS, None)
    if encoder_changed and EMBEDDINGS not in stages:
        old.setdefault("embeddings_config", old["config"])  # what the stale embeddings were made with
    else:
        old.pop("embeddings_config", None)
        old["stage_hashes"] = fresh["stage_hashes"]
        if COMPUTED_WITH_KEY in fresh:
            old[COMPUTED_WITH_KEY] = fresh[COMPUTED_WITH_KEY]
    old["config"], old["config_hash"] = fresh["config"], fresh["config_hash"]
    if "models" in fresh or "models" in old:  # the hub commits go with the config that names them
        old["models"] = fresh.get("models", {})
    old.setdefault("stage_hashes", {}).setdefault("tokens", fresh["stage_hashes"]["tokens"])
    if increment is not None:
        old["plan"], old["input"] = fresh["plan"], fresh["input"]
        old.setdefault("increments", []).append(increment)
    return old


def check_output_directory(out_dir: Location, force: bool) -> None:
    """Refuse, before anything is written (the lock included), an OUT that no job may write into.

    Raises:
        ConfigError: as :func:`prepare_output` does for an OUT that is not an embedpipe output.
    """
    if load_manifest(out_dir) is None:
        _check_fresh_directory(out_dir, force, make=False)


def _check_fresh_directory(out_dir: Any, force: bool, make: bool = True) -> None:
    """A new job's OUT: absent or empty, or (with ``force``) holding other files where no job writes."""
    in_the_way = files_in_the_way(out_dir)
    if in_the_way:
        raise ConfigError(
            f"{out_dir} holds files embedpipe did not write where a job writes ({_some(in_the_way)}) and no "
            "embedpipe manifest; embedpipe never deletes or overwrites them: use another output directory"
        )
    foreign = foreign_entries(out_dir)
    if foreign and not force:
        raise ConfigError(
            f"{out_dir} is not empty and is not an embedpipe output ({_some(foreign)}); use an absent or empty "
            "output directory, or --force to write beside these files (they are kept as they are)"
        )
    if make and not is_remote(out_dir):  # an object store has no directories to make
        out_dir.mkdir(parents=True, exist_ok=True)


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def looks_committed(out_dir: Location, stage: str, record: dict[str, Any]) -> bool:
    """The cheap check: the shard the manifest lists is there with the recorded size (no re-hash)."""
    path = out_dir / stage / record["name"]
    return path.is_file() and path.stat().st_size == record.get("bytes")


def committed_ok(out_dir: Location, stage: str, record: dict[str, Any]) -> bool:
    """Whether a shard the manifest lists is on disk (or in the store) as committed: same size, same sha256."""
    path = out_dir / stage / record["name"]
    if not path.is_file() or path.stat().st_size != record["bytes"]:
        return False
    if record.get("quarantine_file") and not (out_dir / QUARANTINE_DIR / record["quarantine_file"]).is_file():
        return False
    return file_sha256(path) == record["sha256"]

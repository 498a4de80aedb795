"""Bad input gets a message that names the problem; the engine stays usable."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kvscope.engine import (
    CancelledError,
    Engine,
    InvalidRequestError,
    ModelLoadError,
    SamplingParams,
)
from kvscope.engine.events import EngineError


def test_malformed_model_folders(tmp_path: Path, llama_dir: Path) -> None:
    eng = Engine()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        eng.load(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        eng.load(bad)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        eng.load(noweights)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "nosucharch"}))
    (unknown / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="mlx-lm could not load"):
        eng.load(unknown)
    # Still usable afterwards.
    eng.load(llama_dir)
    assert eng.chat(eng.new_session(), "the code ?", SamplingParams(max_tokens=2)).token_ids


def test_unknown_hub_id_offline_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail fast; same error path as no network
    eng = Engine()
    with pytest.raises(ModelLoadError, match="not a local folder.*unreachable"):
        eng.load("nobody-here/no-such-model")
    assert any(isinstance(e, EngineError) for e in eng.events)


def test_model_that_is_neither_a_folder_nor_reachable_on_the_hub_names_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hub really unreachable (a closed local port, not offline mode): the CLI names both possibilities."""
    import socket

    import huggingface_hub.constants as hc

    from kvscope.app.cli import main

    with socket.socket() as s:  # a port nothing listens on: connection refused, at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.chdir(tmp_path)
    code = main(["info", "--model", "foo/bar"])
    err = capsys.readouterr().err
    assert code != 0
    assert f"nothing at {tmp_path / 'foo' / 'bar'}" in err and "hub is unreachable" in err


def test_missing_path_is_not_mistaken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model folder"):
        Engine().load(tmp_path / "nope" / "deeper")


def test_empty_prompt_and_bad_sampling(llama_dir: Path) -> None:
    eng = Engine()
    eng.load(llama_dir)
    sid = eng.new_session()
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        eng.chat(sid, "   ")
    with pytest.raises(InvalidRequestError, match="top_p"):
        eng.chat(sid, "hi", SamplingParams(top_p=0))
    with pytest.raises(InvalidRequestError, match="no session"):
        eng.chat("s999", "hi")  # type: ignore[arg-type]
    assert eng.session(sid).n_tokens == 0
    assert eng.chat(sid, "the code ?", SamplingParams(max_tokens=2)).token_ids


def test_cancel_during_prefill_leaves_session_unchanged(llama_dir: Path) -> None:
    eng = Engine()
    eng.config = type(eng.config)(prefill_chunk=8)
    eng.load(llama_dir)
    sid = eng.new_session()
    eng.chat(sid, "the code ?", SamplingParams(max_tokens=3))
    s = eng.session(sid)
    before = (list(s.tokens), len(s.messages), [c.n_rows for c in s.caches], [c.offset for c in s.caches])

    def cancel_on_chunk(ev: object) -> None:
        if type(ev).__name__ == "PrefillChunk":
            eng.cancel(sid)

    unsub = eng.subscribe(cancel_on_chunk)
    with pytest.raises(CancelledError, match="cancelled"):
        eng.chat(sid, "the code for locker 7 is " * 10, SamplingParams(max_tokens=3))
    unsub()
    after = (list(s.tokens), len(s.messages), [c.n_rows for c in s.caches], [c.offset for c in s.caches])
    assert after == before
    assert eng.chat(sid, "and the colour ?", SamplingParams(max_tokens=2)).token_ids


def test_cancel_during_decode_keeps_partial_answer(llama_dir: Path) -> None:
    eng = Engine()
    eng.load(llama_dir)
    sid = eng.new_session()
    seen = threading.Event()

    def cancel_after_three(ev: object) -> None:
        if type(ev).__name__ == "TokenSampled" and ev.index == 2:  # type: ignore[attr-defined]
            eng.cancel(sid)
            seen.set()

    eng.subscribe(cancel_after_three)
    res = eng.chat(sid, "the code ?", SamplingParams(max_tokens=200))
    assert seen.is_set()
    assert res.finish_reason == "cancelled"
    assert len(res.token_ids) <= 5  # stops within one decode step
    s = eng.session(sid)
    assert s.caches[0].n_rows == s.n_tokens


def test_hub_id_loads_from_the_local_hub_cache(
    tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real hub path (mlx-lm -> huggingface_hub) resolves an id from a local cache offline."""
    import shutil

    snap = tmp_path / "hub" / "models--kvscope--tiny-llama" / "snapshots" / "0123abc"
    shutil.copytree(llama_dir, snap)
    (tmp_path / "hub" / "models--kvscope--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--kvscope--tiny-llama" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    eng = Engine()
    lm = eng.load("kvscope/tiny-llama")
    assert lm.name == "kvscope/tiny-llama" and lm.path == snap
    assert eng.chat(eng.new_session(), "the code ?", SamplingParams(max_tokens=2)).token_ids

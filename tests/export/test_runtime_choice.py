"""Choosing the embed runtime by measuring: the faster of two fake encoders with known (sleep) costs, the cache
keyed by CPU model + flags + model sha256, a corrupt cache ignored with a warning, --runtime winning."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from simsiam_kit.errors import UserError
from simsiam_kit.export.runtime_choice import AutoEmbedder, choose_runtime
from simsiam_kit.utils import device
from simsiam_kit.utils.probe import choose_fastest

EPYC = {"model": "AMD EPYC", "flags": {"avx512_bf16": True, "amx_bf16": False, "amx_int8": False, "avx512_vnni": True}}
XEON = {"model": "Intel Xeon", "flags": {"avx512_bf16": True, "amx_bf16": True, "amx_int8": True, "avx512_vnni": True}}


class Fake:
    """An encoder that costs ``seconds`` per call and returns a constant unit embedding; counts its calls."""

    def __init__(self, seconds: float, value: float = 1.0, path: str = "model.onnx"):
        self.seconds, self.value, self.calls = seconds, value, 0
        self.path, self.meta, self.dim, self.batch_size, self.provider = Path(path), {}, 2, 4, f"fake {seconds}s"

    def embed(self, images, normalize=None):
        self.calls += 1
        time.sleep(self.seconds)
        return np.tile(np.array([[self.value, 0.0]], np.float32), (len(images), 1))


@pytest.fixture
def cpu(monkeypatch):
    """The CPU the cache key sees: EPYC unless a test switches it."""
    state = {"facts": EPYC}
    monkeypatch.setattr(device, "cpu_facts", lambda cpuinfo=None: state["facts"])
    return state


SAMPLE = np.zeros((4, 8, 8, 3), np.uint8)


def test_probe_picks_the_faster_encoder_whatever_the_order(tmp_path, cpu):
    for order in (("slow", "fast"), ("fast", "slow")):
        enc = {"slow": Fake(0.03), "fast": Fake(0.005)}
        c = choose_runtime({k: enc[k] for k in order}, SAMPLE, {"model_sha256": "a"}, cache=tmp_path / f"{order}.json")
        assert c.name == "fast" and c.how == "measured"
        assert c.seconds["slow"] > c.seconds["fast"] and "fastest" in c.reason
        assert enc["slow"].calls == enc["fast"].calls == 3  # one warm-up + two timed rounds each


def test_cache_is_keyed_by_cpu_model_flags_and_model_sha(tmp_path, cpu):
    cache = tmp_path / "choices.json"
    slow, fast = Fake(0.02), Fake(0.002)
    first = choose_runtime({"a": slow, "b": fast}, SAMPLE, {"model_sha256": "m1"}, cache=cache)
    assert first.how == "measured" and first.name == "b"
    stored = json.loads(cache.read_text())["entries"]
    (entry,) = stored.values()
    assert entry["choice"] == "b" and entry["facts"]["cpu"] == "AMD EPYC" and entry["facts"]["model_sha256"] == "m1"
    assert entry["facts"]["cpu_flags"]["avx512_vnni"] is True

    # the same machine and model: the cached choice, no encoder runs
    calls = slow.calls + fast.calls
    again = choose_runtime({"a": slow, "b": fast}, SAMPLE, {"model_sha256": "m1"}, cache=cache)
    assert again.how == "cached" and again.name == "b" and slow.calls + fast.calls == calls

    # the cached verdict says b; now a is the fast one. Another model, another CPU model, other flags: re-measured
    slow2, fast2 = Fake(0.002), Fake(0.02)
    assert choose_runtime({"a": slow2, "b": fast2}, SAMPLE, {"model_sha256": "m2"}, cache=cache).how == "measured"
    cpu["facts"] = XEON
    assert choose_runtime({"a": slow2, "b": fast2}, SAMPLE, {"model_sha256": "m1"}, cache=cache).name == "a"
    cpu["facts"] = {"model": "AMD EPYC", "flags": {**EPYC["flags"], "amx_bf16": True}}
    assert choose_runtime({"a": slow2, "b": fast2}, SAMPLE, {"model_sha256": "m1"}, cache=cache).how == "measured"
    assert len(json.loads(cache.read_text())["entries"]) == 4
    # a cached choice that is no longer a candidate is measured again
    cpu["facts"] = EPYC
    assert choose_runtime({"a": slow2, "c": fast2}, SAMPLE, {"model_sha256": "m1"}, cache=cache).how == "measured"


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"format": "something-else", "entries": {}}', b"\xff\xfe\x00", b"[1, 2]"]
)
def test_corrupt_cache_is_ignored_with_a_warning_and_replaced(tmp_path, cpu, content):
    cache = tmp_path / "choices.json"
    cache.write_bytes(content)
    with pytest.warns(UserWarning, match="choices.json: ignoring the cache"):
        c = choose_runtime({"a": Fake(0.015), "b": Fake(0.001)}, SAMPLE, {"model_sha256": "x"}, cache=cache)
    assert c.name == "b" and c.how == "measured"
    assert json.loads(cache.read_text())["entries"]  # rewritten with the new measurement


def test_forced_runtime_wins_without_timing_or_cache(tmp_path, cpu):
    cache = tmp_path / "choices.json"
    slow, fast = Fake(0.02), Fake(0.001)
    choose_runtime({"a": slow, "b": fast}, SAMPLE, {"model_sha256": "m"}, cache=cache)  # cached: b
    calls = slow.calls + fast.calls
    c = choose_runtime({"a": slow, "b": fast}, SAMPLE, {"model_sha256": "m"}, force="a", cache=cache)
    assert (c.name, c.how) == ("a", "forced") and slow.calls + fast.calls == calls
    with pytest.raises(UserError, match="--runtime c: not available"):
        choose_runtime({"a": slow, "b": fast}, SAMPLE, {"model_sha256": "m"}, force="c", cache=cache)


def test_auto_embedder_chooses_on_its_first_batch_and_then_is_that_runtime(tmp_path, cpu):
    slow, fast = Fake(0.02, value=1.0), Fake(0.002, value=-1.0)
    logged = []
    emb = AutoEmbedder(
        {"ort-fp32": slow, "other": fast}, {"model_sha256": "z"}, log=logged.append, cache=tmp_path / "c"
    )
    assert emb.provider.startswith("auto")
    z = emb.embed(SAMPLE)
    assert emb.choice.name == "other" and emb.provider == "other: fake 0.002s"
    assert z.shape == (4, 2) and (z[:, 0] == -1.0).all()  # the chosen runtime's embeddings
    assert any(line.startswith("runtime: other, fastest") for line in logged)
    calls = slow.calls
    emb.embed(SAMPLE)
    assert slow.calls == calls  # no second probe


def test_torch_runtime_whose_weights_disagree_is_dropped(tmp_path, cpu):
    """A torch runtime whose source weights no longer compute the model (cosine < bound) is never chosen,
    and forcing it is an error."""
    ort, torch_rt = Fake(0.02, value=1.0), Fake(0.001, value=-1.0)
    logged = []
    emb = AutoEmbedder({"ort-fp32": ort, "torch-bf16": torch_rt}, {"m": 1}, log=logged.append, cache=tmp_path / "c")
    emb.embed(SAMPLE)
    assert emb.choice.name == "ort-fp32" and any("torch-bf16 dropped" in s for s in logged)
    forced = AutoEmbedder({"ort-fp32": Fake(0.0), "torch-bf16": Fake(0.0, value=-1.0)}, {"m": 1}, force="torch-bf16")
    with pytest.raises(UserError, match="--runtime torch-bf16: its weights do not compute"):
        forced.embed(SAMPLE)


def test_choose_fastest_does_not_write_when_the_cache_is_off(tmp_path, cpu):
    cache = tmp_path / "choices.json"
    c = choose_fastest({"x": lambda: time.sleep(0.01), "y": lambda: None}, "t", {}, cache=cache, use_cache=False)
    assert c.name == "y" and not cache.exists()


# ----------------------------------------------------------------------------- the real runtimes, through the CLI
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch

    from simsiam_kit.engine.checkpoint import save_backbone
    from simsiam_kit.export.onnx import export_onnx
    from simsiam_kit.models import build_backbone

    pytest.importorskip("onnxruntime")
    d = tmp_path_factory.mktemp("runtime_enc")
    torch.manual_seed(0)
    m = build_backbone("resnet18", "cifar", zero_init_residual=False).eval()
    save_backbone(d / "bb.pt", m, "resnet18", "cifar", {"image_size": 32})
    export_onnx(str(d / "bb.pt"), d / "enc.onnx", parity_data=None)
    return d / "enc.onnx"


def test_cli_runtime_forced_auto_and_unavailable(exported, tmp_path):
    from simsiam_kit.utils.device import cpu_supports_bf16

    from helpers import CIFAR_VAL, cli, need

    data = f"{need(CIFAR_VAL)}[:40]"
    res = cli(
        "embed", "-m", exported, "-d", data, "-o", tmp_path / "f", "-b", 20, "--no-progress", "--runtime", "ort-fp32"
    )
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "f" / "embed.json").read_text())
    assert manifest["provider"].startswith("ort-fp32: CPUExecutionProvider")
    assert "runtime: ort-fp32, forced" in res.output

    res = cli("embed", "-m", exported, "-d", data, "-o", tmp_path / "x", "--no-progress", "--runtime", "ort-int8")
    assert res.exit_code == 2 and "--runtime ort-int8: not available for enc.onnx" in res.output

    res = cli("embed", "-m", exported, "-d", data, "-o", tmp_path / "a", "-b", 20, "--no-progress")
    assert res.exit_code == 0, res.output
    chosen = json.loads((tmp_path / "a" / "embed.json").read_text())["provider"].split(":")[0]
    assert chosen in (("ort-fp32", "torch-bf16") if cpu_supports_bf16() else ("ort-fp32",))
    assert f"runtime: {chosen}, " in res.output
    if cpu_supports_bf16():  # both measured: the probe says how much faster the winner was
        assert "fastest" in res.output
        # torch-bf16 forced: the same neighbours as fp32 up to bf16 rounding
        res = cli("embed", "-m", exported, "-d", data, "-o", tmp_path / "t", "-b", 20, "--no-progress",
                  "--runtime", "torch-bf16")  # fmt: skip
        assert res.exit_code == 0, res.output
        zf, zt = np.load(tmp_path / "f" / "embeddings.npy"), np.load(tmp_path / "t" / "embeddings.npy")
        assert (zf * zt).sum(1).min() > 0.99

    # queries are embedded with the runtime that built the index: an indexed image finds itself at ~1
    from PIL import Image

    from simsiam_kit.data.datasets import load_dataset

    img = load_dataset(data).images[7]
    Image.fromarray(img).save(tmp_path / "q.png")
    res = cli("search", "--index", tmp_path / "a", "--query", tmp_path / "q.png", "--k", 3)
    assert res.exit_code == 0, res.output
    first = json.loads((tmp_path / "a" / "search.json").read_text())["results"][0]["neighbours"][0]
    assert first["row"] == 7 and first["score"] > 0.999


def test_auto_embedder_takes_one_image_as_a_batch_of_one(tmp_path, cpu):
    emb = AutoEmbedder({"a": Fake(0.0), "b": Fake(0.0)}, {"m": 1}, cache=tmp_path / "c", pause=0)
    assert emb.embed(np.zeros((8, 8, 3), np.uint8)).shape == (1, 2)  # one (H, W, 3) image, not 8 rows


def test_unknown_runtime_is_refused_before_the_model_is_opened(tmp_path):
    from simsiam_kit.export.runtime_choice import open_embedder

    with pytest.raises(UserError, match="--runtime tensorrt: unknown .*auto, ort-int8, torch-bf16, ort-fp32"):
        open_embedder(tmp_path / "missing.onnx", "tensorrt")


def test_nothing_to_time_on_takes_onnxruntime_and_a_preference_is_taken_untimed(tmp_path, cpu):
    said = []
    emb = AutoEmbedder(
        {"torch-bf16": Fake(0.0), "ort-fp32": Fake(0.0)}, {"m": 1}, log=said.append, cache=tmp_path / "c"
    )
    assert emb.runtime == "auto"
    emb.choose([])  # every image of the first batch unreadable
    assert emb.runtime == "ort-fp32" and said == ["runtime: ort-fp32, forced (no readable image to time on)"]
    slow, fast = Fake(0.02), Fake(0.0)
    emb = AutoEmbedder({"slow": slow, "fast": fast}, {"m": 1}, log=said.append, cache=tmp_path / "c", pause=0)
    emb.choose(list(SAMPLE), prefer="slow")
    assert emb.runtime == "slow" and said[-1] == "runtime: slow, as the run being resumed"
    assert slow.calls == fast.calls == 0 and not (tmp_path / "c").exists()

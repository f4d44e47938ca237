"""TensorRT: engine keys, profiles and the reuse decision (plain functions), backend selection without
TensorRT, the lm_head split on ONNX Runtime, and the builder + backend end to end.

The end-to-end tests run twice: on the simulated TensorRT + CUDA of fake_tensorrt.py (the TensorRT 10 /
cuda-python calls the code makes, checked the way TensorRT checks them, asynchronous streams, ONNX Runtime
computing on host memory), so the per-profile contexts, shared activation memory, KV double-buffering,
chunked prefill, forks, pooling and graph replay are exercised everywhere; and on the real TensorRT when it
and a GPU are present (skipped otherwise).
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fake_tensorrt import Err, FakeCuda, make_fake_tensorrt

from omnivision_ros.errors import OmniVisionError
from omnivision_ros.model.bundle import open_bundle
from omnivision_ros.model.config import get_preset
from omnivision_ros.runtime import tensorrt_backend as tb
from omnivision_ros.runtime import trt_engines as te
from omnivision_ros.runtime import trt_env as tenv
from omnivision_ros.runtime.backend_select import select_backend
from omnivision_ros.runtime.factory import open_tensorrt_backend


def _real_tensorrt() -> bool:
    try:
        return tenv.tensorrt_status()[0]
    except Exception:
        return False


HAVE_TRT = _real_tensorrt()


# ---------------------------------------------------------------------------------------------
# Plain functions


def test_engine_key_names_every_component():
    key = te.engine_key("10.3.0", "8.7", "fp16", "ab" * 32)
    assert key == "trt10.3.0-sm87-fp16-abababababab"
    assert te.engine_key("10.13.2", "11.0", "fp32", "cd" * 32) == "trt10.13.2-sm110-fp32-cdcdcdcdcdcd"
    with pytest.raises(OmniVisionError):
        te.engine_key("10.3.0", "8.7", "int8", "ab" * 32)
    with pytest.raises(OmniVisionError):
        te.engine_key("10.3/../x", "8.7", "fp16", "ab" * 32)
    assert te.timing_cache_name("10.3.0", "8.7") == "timing-trt10.3.0-sm87.cache"


def test_onnx_digest_covers_names_and_contents():
    files = {"fp16/decoder.onnx": "1" * 64, "fp16/decoder.onnx.data": "2" * 64}
    digest = te.onnx_digest(files)
    assert digest == te.onnx_digest(dict(reversed(list(files.items()))))  # order-free
    assert digest != te.onnx_digest({**files, "fp16/decoder.onnx.data": "3" * 64})  # new weights, new key
    assert digest != te.onnx_digest({"decoder.onnx": "1" * 64, "fp16/decoder.onnx.data": "2" * 64})
    with pytest.raises(OmniVisionError):
        te.onnx_digest({})


def test_options_resolve_from_config_and_reject_bad_values(tiny_config):
    opts = te.EngineOptions().resolved(tiny_config)
    assert opts.max_context == tiny_config.lm_max_context == 512
    assert opts.max_prefill == 512 and opts.opt_prefill == 128 and opts.opt_past == 256
    small = te.EngineOptions(max_context=64, opt_past=1000, opt_prefill=1000).resolved(tiny_config)
    assert (small.max_prefill, small.opt_prefill, small.opt_past) == (64, 64, 63)  # clamped into range
    for bad in (te.EngineOptions(precision="int8"), te.EngineOptions(max_cameras=0),
                te.EngineOptions(max_prefill=600), te.EngineOptions(lm_head_parts=0),
                te.EngineOptions(workspace_mb=8), te.EngineOptions(opt_cameras=5)):
        with pytest.raises(OmniVisionError):
            bad.resolved(tiny_config)


def test_profiles_follow_the_graph_contract(tiny_config):
    from omnivision_ros.model.bundle import decoder_input_names

    c = tiny_config
    opts = te.EngineOptions(max_cameras=3, max_context=256, max_prefill=100).resolved(c)
    (vision,) = te.vision_profiles(c, opts)
    assert vision == {"pixel_values": ((1, 3, 384, 384), (1, 3, 384, 384), (3, 3, 384, 384))}
    prefill, decode = te.decoder_profiles(c, opts)
    names = decoder_input_names(c)
    assert list(prefill) == list(decode) == [names[0], "position_ids", "image_embeds", *names[3:]]
    kv, hd = c.lm_kv_heads, c.lm_head_dim
    assert prefill["input_ids"] == ((1, 1), (1, 100), (1, 100))
    assert prefill["past_key_0"] == ((1, kv, 0, hd), (1, kv, 0, hd), (1, kv, 255, hd))  # empty past allowed
    assert decode["input_ids"] == ((1, 1), (1, 1), (1, 1))
    assert decode["past_value_1"] == ((1, kv, 1, hd), (1, kv, 255, hd), (1, kv, 255, hd))
    assert prefill["image_embeds"][0] == prefill["image_embeds"][2] == (1, c.mp_tokens, c.lm_hidden)
    for profile in (prefill, decode, vision):
        for lo, opt, hi in profile.values():
            assert all(0 <= a <= b <= d for a, b, d in zip(lo, opt, hi))


def test_profile_choice_and_prefill_chunks():
    assert te.choose_profile(110, 0) == te.PREFILL_PROFILE
    assert te.choose_profile(1, 0) == te.PREFILL_PROFILE  # a one-token prompt has an empty past
    assert te.choose_profile(12, 110) == te.PREFILL_PROFILE  # a question after a cached image prefix
    assert te.choose_profile(1, 110) == te.DECODE_PROFILE
    with pytest.raises(OmniVisionError):
        te.choose_profile(0, 3)
    assert te.prefill_chunks(5, 512) == [(0, 5)]
    assert te.prefill_chunks(1100, 512) == [(0, 512), (512, 1024), (1024, 1100)]


def test_kv_memory_arithmetic():
    full = get_preset("omnivision-968m")
    assert te.kv_bytes_per_token(full, 2) == 12 * 1024  # DESIGN §2: 12 KiB per token in fp16
    assert te.session_kv_bytes(full, 4096, 2) == 96 * 1024 * 1024  # past + present buffers


def _fake_engine_folder(root, target, options, sizes=(10, 20)):
    folder = root / target.key
    folder.mkdir(parents=True)
    files = {}
    for graph, size in zip(te.GRAPHS, sizes):
        (folder / f"{graph}.plan").write_bytes(b"x" * size)
        files[graph] = {"file": f"{graph}.plan", "size": size}
    manifest = te.new_manifest(target, options, "Fake GPU", {"decoder.onnx": "0" * 64}, {}, files, {})
    te.write_manifest(folder, manifest)
    return folder


def test_decide_reuses_a_match_and_says_why_it_rebuilds(tmp_path, tiny_config):
    root = tmp_path / "engines"
    target = te.EngineTarget("10.3.0", "8.7", "fp16", "ab" * 32)
    opts = te.EngineOptions().resolved(tiny_config)
    first = te.decide(root, target, opts)
    assert not first.reuse and "no engines for trt10.3.0-sm87-fp16-abababababab" in first.reason

    folder = _fake_engine_folder(root, target, opts)
    assert te.decide(root, target, opts).reuse
    assert te.decide(root, target, None).reuse  # runtime: any build options
    assert "reuse" in te.decide(root, target, opts).reason

    smaller = te.EngineOptions(max_context=256).resolved(tiny_config)
    why = te.decide(root, target, smaller)
    assert not why.reuse and "max_context 512 -> 256" in why.reason
    split = te.EngineOptions(lm_head_parts=4).resolved(tiny_config)
    assert "lm_head_parts 1 -> 4" in te.decide(root, target, split).reason
    workspace = te.EngineOptions(workspace_mb=4096).resolved(tiny_config)
    assert te.decide(root, target, workspace).reuse  # workspace only changes build speed/tactics

    (folder / "decoder.plan").write_bytes(b"truncated")
    assert "decoder.plan has 9 bytes, engine.json says 20" in te.decide(root, target, opts).reason
    (folder / "decoder.plan").unlink()
    assert "decoder.plan is missing" in te.decide(root, target, opts).reason
    (folder / te.ENGINE_MANIFEST).write_text("{not json")
    assert "cannot read engine manifest" in te.decide(root, target, opts).reason


def test_decide_explains_engines_for_other_targets(tmp_path, tiny_config):
    root = tmp_path / "engines"
    opts = te.EngineOptions().resolved(tiny_config)
    _fake_engine_folder(root, te.EngineTarget("10.3.0", "8.7", "fp16", "ab" * 32), opts)
    upgraded = te.decide(root, te.EngineTarget("10.13.0", "8.7", "fp16", "ab" * 32), opts)
    assert not upgraded.reuse and "built for TensorRT 10.3.0, this is 10.13.0" in upgraded.reason
    other_gpu = te.decide(root, te.EngineTarget("10.3.0", "8.6", "fp16", "ab" * 32), None)
    assert "built for GPU compute capability 8.7, this is 8.6" in other_gpu.reason
    reexported = te.decide(root, te.EngineTarget("10.3.0", "8.7", "fp16", "cd" * 32), None)
    assert "the ONNX graphs changed since it was built (abababababab -> cdcdcdcdcdcd)" in reexported.reason


# ---------------------------------------------------------------------------------------------
# Without TensorRT


def test_modules_import_without_tensorrt_torch_or_cuda():
    code = (
        "import sys\n"
        "for name in ('tensorrt', 'cuda', 'torch'):\n"
        "    sys.modules[name] = None  # import fails as if not installed\n"
        "import omnivision_ros.runtime.tensorrt_backend, omnivision_ros.runtime.backend_select\n"
        "import omnivision_ros.runtime.trt_engines, omnivision_ros.cli.verify\n"
        "import omnivision_ros.export.tensorrt_build\n"
        "print('ok')\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=root)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_explicit_tensorrt_names_the_missing_package(no_tensorrt, tmp_path):
    with pytest.raises(OmniVisionError, match=r"backend 'tensorrt' cannot run: the `tensorrt` Python package is not installed"):
        select_backend("tensorrt", tmp_path)
    with pytest.raises(OmniVisionError, match="`tensorrt` Python package"):
        open_tensorrt_backend(None)


def test_auto_falls_back_to_onnxruntime_and_says_why(no_tensorrt, tmp_path):
    lines = []
    choice = select_backend("auto", tmp_path, log=lines.append)
    assert choice.backend == "onnxruntime" and choice.probe is None
    assert choice.reason.startswith("TensorRT not used: the `tensorrt` Python package is not installed")
    assert lines == [f"backend: onnxruntime ({choice.reason})"]
    assert select_backend("onnxruntime", tmp_path).backend == "onnxruntime"
    with pytest.raises(OmniVisionError, match="unknown backend"):
        select_backend("openvino", tmp_path)


def test_missing_cuda_bindings_and_missing_gpu_are_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(tenv, "_cudart", None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(OmniVisionError, match="CUDA runtime bindings are not installed"):
        select_backend("tensorrt", tmp_path)

    no_gpu = types.SimpleNamespace(
        cudaGetDeviceCount=lambda: (Err(100), 0),
        cudaGetErrorName=lambda err: (Err(0), b"cudaErrorNoDevice"),
    )
    monkeypatch.setattr(tenv, "_cudart", no_gpu)
    with pytest.raises(OmniVisionError, match=r"no CUDA GPU is visible \(cudaGetDeviceCount failed: cudaErrorNoDevice \(100\); check"):
        select_backend("tensorrt", tmp_path)
    choice = select_backend("auto", tmp_path)
    assert choice.backend == "onnxruntime" and "no CUDA GPU is visible" in choice.reason


def test_cuda_check_unwraps_and_raises():
    assert tenv.cuda_check((Err(0),)) is None
    assert tenv.cuda_check((Err(0), 42)) == 42
    assert tenv.cuda_check((Err(0), 1, 2)) == (1, 2)


def test_verify_exits_2_with_a_clear_message_without_tensorrt(no_tensorrt, tmp_path, capsys):
    from omnivision_ros.cli import verify

    assert verify.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not usable here" in err and "`tensorrt` Python package" in err


def test_build_engines_cli_without_tensorrt(no_tensorrt, tmp_path, capsys):
    from omnivision_ros.export import tensorrt_build

    assert tensorrt_build.main([str(tmp_path), "--split-lm-head", "4"]) == 2
    assert "`tensorrt` Python package is not installed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A tiny exported bundle (fp32 + fp16), shared by the tests below


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


def _decoder_feeds(config, dtype, ids, past=None, start=0):
    feeds = {
        "input_ids": np.asarray(ids, np.int32)[None],
        "image_embeds": np.random.default_rng(3).standard_normal((1, config.mp_tokens, config.lm_hidden)).astype(dtype),
        "position_ids": np.arange(start, start + len(ids), dtype=np.int32)[None],
    }
    for i in range(config.lm_layers):
        for kind in ("key", "value"):
            empty = np.zeros((1, config.lm_kv_heads, 0, config.lm_head_dim), dtype)
            feeds[f"past_{kind}_{i}"] = past[f"present_{kind}_{i}"] if past else empty
    return feeds


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_split_lm_head_keeps_logits(bundle, tmp_path, precision):
    import onnx
    import onnxruntime as ort

    from omnivision_ros.export.tensorrt_build import split_lm_head

    config = get_preset("tiny")
    src = bundle / ("" if precision == "fp32" else "fp16/") / "decoder.onnx"
    dst = tmp_path / "split" / "decoder.onnx"
    split_lm_head(src, dst, 4)
    nodes = [n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node]
    assert nodes.count("Concat") >= 1 and "decoder.onnx.data" in [p.name for p in dst.parent.iterdir()]

    dtype = np.float32 if precision == "fp32" else np.float16
    a, b = ort.InferenceSession(str(src)), ort.InferenceSession(str(dst))
    names = [o.name for o in a.get_outputs()]
    prefill = _decoder_feeds(config, dtype, [1, config.lm_vocab + 2, 7, 9, 151645])
    ra = dict(zip(names, a.run(None, prefill)))
    rb = dict(zip(names, b.run(None, prefill)))
    step = _decoder_feeds(config, dtype, [11], ra, start=5)
    la, lb = a.run(["logits"], step)[0], b.run(["logits"], step)[0]
    if precision == "fp32":
        np.testing.assert_array_equal(ra["logits"], rb["logits"])  # the same dot products
        np.testing.assert_array_equal(la, lb)
    else:
        # ONNX Runtime's CPU runs float16 Gemm in float32; unsplit, it can drop the fp16 rounding of the
        # Gemm output before the final Cast, split it cannot (the Concat is float16). One fp16 ulp.
        np.testing.assert_allclose(ra["logits"], rb["logits"], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(la, lb, rtol=2e-3, atol=2e-3)


def test_split_lm_head_handles_matmul_over_a_transpose(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from omnivision_ros.export.tensorrt_build import split_lm_head

    w = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)  # [vocab, hidden]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "Wt"], ["y"]),
         helper.make_node("Cast", ["y"], ["logits"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [numpy_helper.from_array(w, "W")],
    )
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(src))
    split_lm_head(src, tmp_path / "out" / "m.onnx", 3)
    x = {"x": np.ones((1, 4), np.float32)}
    out = ort.InferenceSession(str(tmp_path / "out" / "m.onnx")).run(None, x)[0]
    np.testing.assert_allclose(out, ort.InferenceSession(str(src)).run(None, x)[0], rtol=1e-6)
    model = onnx.load(str(tmp_path / "out" / "m.onnx"))
    assert "Transpose" not in [n.op_type for n in model.graph.node] and len(model.graph.initializer) == 3

    lonely = helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g",
                               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                               [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(lonely, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(tmp_path / "r.onnx"))
    with pytest.raises(OmniVisionError, match="cannot find the lm_head MatMul/Gemm"):
        split_lm_head(tmp_path / "r.onnx", tmp_path / "r2.onnx", 2)
    with pytest.raises(OmniVisionError, match="at least 2 parts"):
        split_lm_head(src, tmp_path / "x.onnx", 1)


@pytest.fixture(params=["fake", "real"])
def trt_env(request, monkeypatch):
    """(tensorrt module, cuda fake or None): a fake TensorRT everywhere; the real one where present."""
    if request.param == "real":
        if not HAVE_TRT:
            pytest.skip("TensorRT or a CUDA GPU is not available here")
        import tensorrt

        return tensorrt, None
    cuda = FakeCuda()
    trt = make_fake_tensorrt(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tenv, "_cudart", cuda)
    return trt, cuda


@pytest.fixture
def work_bundle(bundle, tmp_path):
    """A private copy of the bundle (engines are written into it)."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def _prompt(config):
    from omnivision_ros.model.prompt import PromptBuilder
    from omnivision_ros.model.tokenizer import TextTokenizer

    return PromptBuilder(TextTokenizer.synthetic(), config).build("What is on the table?").ids


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def reference(bundle):
    """ONNX Runtime fp32 on the CPU: pixels, image embeddings, prefill logits and 8 greedy steps."""
    from omnivision_ros.model.preprocess import load_image, preprocess
    from omnivision_ros.model.bundle import open_bundle
    from omnivision_ros.runtime.ort_backend import OrtBackend

    b = open_bundle(bundle)
    ort_backend = OrtBackend(b, precision="fp32", device="cpu")
    image = load_image(str(Path(__file__).resolve().parents[1] / "omnivision_ros" / "data" / "sample.jpg"))
    pixels = np.stack([preprocess(image, b.config), preprocess(image[::-1], b.config)])
    embeds = ort_backend.encode_images(pixels)
    ids = _prompt(b.config)
    session = ort_backend.new_session()
    logits, tokens = [session.prefill(ids, embeds[0])], []
    for _ in range(8):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(session.step(tokens[-1]))
    return types.SimpleNamespace(pixels=pixels, embeds=embeds, ids=ids, logits=logits, tokens=tokens, config=b.config)


def _teacher_forced(backend, ref, session=None):
    session = session or backend.new_session()
    logits = [session.prefill(ref.ids, ref.embeds[0])]
    for token in ref.tokens:
        logits.append(session.step(token))
    session.close()
    return logits


def _assert_close_to_reference(ref, logits):
    """fp16 engines against fp32 ONNX Runtime, with the limits omnivision-verify uses."""
    for want, got in zip(ref.logits, logits):
        assert np.abs(want - got).max() <= 0.5 and _cos(want, got) >= 0.999
    for step, (want, got) in enumerate(zip(ref.logits[:-1], logits[:-1])):
        if int(np.argmax(got)) != ref.tokens[step]:
            top2 = np.sort(want)[-2:]
            assert top2[1] - top2[0] <= 0.5, f"token differs at step {step} without a near tie"


def test_engines_build_then_match_onnxruntime(trt_env, work_bundle, reference):
    trt, cuda = trt_env
    from omnivision_ros.export.tensorrt_build import build_engines

    lines = []
    options = te.EngineOptions(max_cameras=2, max_context=256, max_prefill=64)
    folder = build_engines(work_bundle, options, log=lines.append)
    manifest = te.read_manifest(folder)
    assert folder.parent.name == te.ENGINES_DIR and folder.name.startswith(f"trt{trt.__version__}-sm")
    assert manifest["options"]["max_context"] == 256 and manifest["precision"] == "fp16"
    assert set(manifest["sources"]) == {f"fp16/{g}.onnx{ext}" for g in ("vision", "decoder") for ext in ("", ".data")}
    assert any(line.startswith("build: no engines for") for line in lines)
    assert (folder.parent / te.timing_cache_name(manifest["tensorrt"], manifest["compute_capability"])).is_file()

    backend = open_tensorrt_backend(open_bundle(work_bundle), log=lines.append)
    try:
        assert (backend.max_cameras, backend.max_context, backend.max_prefill) == (2, 256, 64)
        embeds = backend.encode_images(np.concatenate([reference.pixels, reference.pixels[:1]]))  # 3 frames: 2 calls
        for want, got in zip([*reference.embeds, reference.embeds[0]], embeds):
            assert np.abs(want - got).max() <= 0.25 and _cos(want, got) >= 0.999
        # The prompt is longer than max_prefill: prefilled in chunks, the later ones on a non-empty past.
        assert len(reference.ids) > backend.max_prefill
        _assert_close_to_reference(reference, _teacher_forced(backend, reference))

        # Prefix reuse as the pipeline does it: prefill a prefix, fork, continue the fork.
        prefix = backend.new_session()
        prefix.prefill(reference.ids[:100], reference.embeds[0])
        fork = prefix.fork()
        logits = [fork.prefill(reference.ids[100:])]
        for token in reference.tokens:
            logits.append(fork.step(token))
        fork.close()
        _assert_close_to_reference(reference, logits)
        assert prefix.length == 100
        prefix.close()
        with pytest.raises(OmniVisionError, match="closed"):
            prefix.step(1)
        with pytest.raises(OmniVisionError, match="context full"):
            s = backend.new_session()
            s.prefill(np.ones(257, np.int64))
        s.close()
    finally:
        backend.close()
    if cuda is not None:
        assert cuda.mallocs == cuda.frees  # every buffer released by close()


def test_engine_cache_reuse_and_rebuild_on_mismatch(trt_env, work_bundle):
    trt, cuda = trt_env
    from omnivision_ros.export.tensorrt_build import build_engines

    options = te.EngineOptions(max_cameras=1, max_context=128, max_prefill=32)
    folder = build_engines(work_bundle, options, log=lambda m: None)
    stamp = (folder / "decoder.plan").stat().st_mtime_ns
    lines = []
    assert build_engines(work_bundle, options, log=lines.append) == folder
    assert lines[0].startswith("reuse ") and (folder / "decoder.plan").stat().st_mtime_ns == stamp

    lines.clear()
    build_engines(work_bundle, te.EngineOptions(max_cameras=1, max_context=96, max_prefill=32), log=lines.append)
    assert "build option changed (max_context 128 -> 96)" in lines[0]
    assert te.read_manifest(folder)["options"]["max_context"] == 96

    # The runtime takes whatever options the engines were built with, and reports a stale build.
    lines.clear()
    open_tensorrt_backend(open_bundle(work_bundle), build=False, log=lines.append).close()
    assert lines[0].startswith("tensorrt: reuse ")
    (folder / "vision.plan").write_bytes(b"garbage")
    with pytest.raises(OmniVisionError, match="vision.plan has 7 bytes"):
        open_tensorrt_backend(open_bundle(work_bundle), build=False)


def test_lm_head_split_engine_and_cuda_graph_replay(trt_env, work_bundle, reference):
    trt, cuda = trt_env
    from omnivision_ros.export.tensorrt_build import build_engines

    build_engines(work_bundle, te.EngineOptions(max_context=256, lm_head_parts=4), log=lambda m: None)
    assert not (work_bundle / te.ENGINES_DIR / ".work").exists()  # the split graph was a build intermediate
    if cuda is not None:
        assert "lmsplit4" in trt.builds[-1]
    backend = open_tensorrt_backend(open_bundle(work_bundle), cuda_graphs=True)
    try:
        first = _teacher_forced(backend, reference)
        second = _teacher_forced(backend, reference)  # same pooled buffers: decode steps replay graphs
        _assert_close_to_reference(reference, first)
        for a, b in zip(first, second):  # replay runs the same kernels on the same data
            np.testing.assert_allclose(a, b, rtol=0, atol=0 if cuda is not None else 1e-3)
        if cuda is not None:
            assert cuda.launches == len(reference.tokens)
    finally:
        backend.close()


def test_verify_reports_and_judges(trt_env, work_bundle, capsys):
    from omnivision_ros.cli import verify

    trt, cuda = trt_env
    assert verify.main([str(work_bundle), "--steps", "4", "--cuda-graphs"]) == 0
    out = capsys.readouterr().out
    assert "image embeddings  max |d|" in out and "greedy tokens (run 2, 4 steps from CUDA graphs)" in out
    assert "CUDA graphs: 4 decode steps captured, 4 of 4 replayed in run 2" in out
    assert out.rstrip().endswith("PASS")
    if cuda is not None:  # capture failing: the backend runs on without graphs, and verify says so
        cuda.fail_capture = True
        assert verify.main([str(work_bundle), "--steps", "2", "--cuda-graphs"]) == 1
        out = capsys.readouterr().out
        assert "0 decode steps captured, 0 of 2 replayed in run 2; capture failed: cudaStreamBeginCapture failed" in out
        assert "FAIL: beyond limits: CUDA graphs did not replay" in out
    # Impossible limits: beyond them, exit status 1.
    assert verify.main([str(work_bundle), "--steps", "2", "--atol", "0", "--atol-embeds", "0"]) == 1
    assert "FAIL: beyond limits: image embeddings, logits" in capsys.readouterr().out


def _pair(selection):
    return selection.backend, selection.reason


def test_auto_selection_with_tensorrt_present(trt_env, work_bundle):
    import json as _json

    from omnivision_ros.export.tensorrt_build import build_engines

    choice, reason = _pair(select_backend("auto", work_bundle))
    assert choice == "tensorrt" and "no engines yet, they will be built from the fp16 graphs" in reason
    build_engines(work_bundle, te.EngineOptions(max_context=64), log=lambda m: None)
    choice, reason = _pair(select_backend("tensorrt", work_bundle))
    assert choice == "tensorrt" and f"engines in {te.ENGINES_DIR}/trt" in reason

    manifest = _json.loads((work_bundle / "manifest.json").read_text())
    del manifest["variants"]["fp16"]
    (work_bundle / "manifest.json").write_text(_json.dumps(manifest))
    choice, reason = _pair(select_backend("auto", work_bundle, precision="fp16"))
    assert choice == "tensorrt"  # the engines built above are still there
    import shutil

    shutil.rmtree(work_bundle / te.ENGINES_DIR)
    choice, reason = _pair(select_backend("auto", work_bundle))
    assert choice == "onnxruntime" and "the bundle has no fp16 graphs to build fp16 engines from (it has: fp32)" in reason


# ---------------------------------------------------------------------------------------------
# Contexts, shared memory, stream discipline and failures, on the simulated TensorRT


@pytest.fixture
def fake(monkeypatch):
    cuda = FakeCuda()
    trt = make_fake_tensorrt(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tenv, "_cudart", cuda)
    return trt, cuda


def _built(work_bundle, precision="fp16"):
    from omnivision_ros.export.tensorrt_build import build_engines

    build_engines(work_bundle, te.EngineOptions(precision=precision, max_context=256, max_prefill=64), log=lambda m: None)


def test_one_context_per_profile_sharing_one_activation_buffer(fake, work_bundle, reference):
    trt, cuda = fake
    _built(work_bundle)
    backend = open_tensorrt_backend(open_bundle(work_bundle))
    try:
        vision, prefill, decode = trt.contexts
        user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        assert all(c.strategy == user_managed for c in trt.contexts)
        assert len({c.memory for c in trt.contexts}) == 1  # one activation buffer for the three
        assert (prefill.profile_calls, decode.profile_calls) == ([], [1])  # set once, at load
        backend.encode_images(reference.pixels)
        _assert_close_to_reference(reference, _teacher_forced(backend, reference))  # prefill in chunks, decode
        assert (prefill.profile_calls, decode.profile_calls) == ([], [1])  # never switched while running
        assert prefill.executions >= 2 and decode.executions == len(reference.tokens) and not cuda.violations
        assert trt.loggers == 1  # one process-wide logger for the builder and the runtimes
    finally:
        backend.close()
    assert cuda.mallocs == cuda.frees


def test_shared_activation_memory_in_parallel_is_refused(fake, work_bundle):
    trt, cuda = fake
    _built(work_bundle)
    backend = open_tensorrt_backend(open_bundle(work_bundle))
    try:
        a, b = backend.new_session(), backend.new_session()
        for session in (a, b):  # two sessions' calls queued at once, without the synchronize between them
            buffers = session.buffers
            buffers.ids_host.array[:3] = buffers.positions_host.array[:3] = (0, 1, 2)
            tb.copy_to_device(buffers.ids, buffers.ids_host.array[:3], buffers.stream)
            tb.copy_to_device(buffers.positions, buffers.positions_host.array[:3], buffers.stream)
            backend._bind_decoder(te.PREFILL_PROFILE, buffers, 3, 0, 0)
            if session is a:
                backend.decoder.execute(te.PREFILL_PROFILE, session.buffers.stream)
        with pytest.raises(OmniVisionError, match="TensorRT execution of decoder.plan failed"):
            backend.decoder.execute(te.PREFILL_PROFILE, b.buffers.stream)
        assert cuda.violations
    finally:
        backend.close()


def test_a_missing_synchronize_reads_stale_results(fake, work_bundle, reference):
    _built(work_bundle)
    backend = open_tensorrt_backend(open_bundle(work_bundle))
    synchronize = tb.CudaStream.synchronize
    try:
        session = backend.new_session()
        tb.CudaStream.synchronize = lambda self: None  # the bug the simulation must catch
        logits = session.prefill(reference.ids[:20], reference.embeds[0])
        assert not np.any(logits)  # the copy back never ran: the host buffer still holds zeros
    finally:
        tb.CudaStream.synchronize = synchronize
        backend.close()


def test_copies_are_checked_for_direction_and_page_locked_memory(fake):
    device, pinned = tb.DeviceBuffer(16), tb.PinnedArray((4,), np.float32)
    stream = tb.CudaStream()
    try:
        tb.copy_to_device(device, pinned.array, stream)
        with pytest.raises(OmniVisionError, match="cudaMemcpyAsync host->device failed: cudaErrorInvalidValue"):
            tb.copy_to_device(device, np.zeros(4, np.float32), stream)  # pageable host memory
        with pytest.raises(OmniVisionError, match="device->host failed: cudaErrorInvalidValue"):
            tb.copy_to_host(pinned.array, pinned.ptr, stream)  # the source is host memory
        pinned.array[:] = 7
        tb.copy_to_device(device, pinned.array, stream)
        tb.copy_to_host(pinned.array, device, stream)
        pinned.array[:] = 0  # before synchronizing: the copies have not run yet
        stream.synchronize()
        assert (pinned.array == 0).all()  # the first copy read the zeros written before it ran
    finally:
        stream.destroy()
        device.free()
        pinned.free()


def test_null_constructors_become_clear_errors_and_auto_falls_back(fake, work_bundle):
    from omnivision_ros.export.tensorrt_build import build_engines
    from omnivision_ros.runtime.factory import open_model

    trt, cuda = fake
    trt.fail = {"Runtime"}
    with pytest.raises(OmniVisionError, match=r"could not create its runtime \(the library returned nothing: "
                                              r"pybind11::init\(\): factory function returned nullptr\); check"):
        select_backend("tensorrt", work_bundle)
    choice = select_backend("auto", work_bundle)
    assert choice.backend == "onnxruntime" and "could not create its runtime" in choice.reason
    assert not tenv.tensorrt_status()[0]

    trt.fail = {"Builder"}
    with pytest.raises(OmniVisionError, match="TensorRT could not create its builder"):
        build_engines(work_bundle, te.EngineOptions(max_context=64), log=lambda m: None)

    trt.fail = set()
    _built(work_bundle)
    trt.fail = {"create_execution_context"}
    lines = []
    backend, _ = open_model(str(work_bundle), "auto", log=lines.append)
    assert backend.name == "onnxruntime"
    assert any("TensorRT failed to open: TensorRT could not create an execution context" in line for line in lines)
    with pytest.raises(OmniVisionError, match="could not create an execution context"):
        open_model(str(work_bundle), "tensorrt")

    trt.fail = set()
    cuda.fail_malloc_after = cuda.mallocs + 1  # the activation buffer fits, the next allocation does not
    lines.clear()
    backend, _ = open_model(str(work_bundle), "auto", log=lines.append)
    assert backend.name == "onnxruntime"
    assert any("cudaErrorMemoryAllocation (2); the GPU is out of memory" in line for line in lines), lines

    def unreachable():
        raise RuntimeError("Failed to dlopen libcuda.so.1")

    cuda.cudaGetDeviceCount = unreachable
    with pytest.raises(OmniVisionError, match=r"no CUDA GPU is visible \(cudaGetDeviceCount failed: Failed to dlopen"):
        select_backend("tensorrt", work_bundle)


def test_precision_reaches_the_engines_and_the_bundle_opens_once(fake, work_bundle, monkeypatch):
    import omnivision_ros.model.bundle as bundle_module
    from omnivision_ros.export.gpu_int4 import add_gpu_int4
    from omnivision_ros.runtime.factory import open_model

    trt, cuda = fake
    add_gpu_int4(work_bundle)
    opened = []
    real_open = bundle_module.open_bundle
    monkeypatch.setattr(bundle_module, "open_bundle", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    for precision, source in (("fp32", "decoder.onnx"), ("int4", "gpu-int4/decoder.onnx")):
        opened.clear()
        runtimes = trt.runtimes
        backend, _ = open_model(str(work_bundle), "auto", precision=precision)
        try:
            assert backend.name == "tensorrt" and backend.manifest["precision"] == precision
            assert trt.builds[-1].endswith(source) and len(opened) == 1
            assert trt.runtimes - runtimes == 2  # the probe's, then the backend's: TensorRT probed once
        finally:
            backend.close()
    lines = []  # no int8 engines: ONNX Runtime is asked for int8 (this bundle has no cpu-int8 either), saying why
    with pytest.raises(OmniVisionError, match="has no 'int8' variant"):
        open_model(str(work_bundle), "auto", precision="int8", log=lines.append)
    assert lines == ["backend: onnxruntime (TensorRT not used: TensorRT engines come in fp16, fp32, int4, not int8 "
                     "(that precision is a CPU variant))"]


def test_int4_engines_match_onnxruntime_on_the_same_graphs(fake, work_bundle, reference):
    from omnivision_ros.export.gpu_int4 import add_gpu_int4
    from omnivision_ros.runtime.ort_backend import OrtBackend

    add_gpu_int4(work_bundle)
    bundle = open_bundle(work_bundle)
    ref = OrtBackend(bundle, precision="gpu-int4", device="cpu")
    session = ref.new_session()
    want = [session.prefill(reference.ids, reference.embeds[0])] + [session.step(t) for t in reference.tokens]
    _built(work_bundle, "int4")
    backend = open_tensorrt_backend(bundle, "int4")
    try:
        got = _teacher_forced(backend, reference)
        assert all(_cos(a, b) >= 0.999 for a, b in zip(want, got))
    finally:
        backend.close()

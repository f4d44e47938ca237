"""omnivision-bench: the ONNX Runtime pipeline against the model's PyTorch modules and llama.cpp, on the same weights.

One run measures, on full-size random weights (the release's GGUF layout, written once into --work) and
the same image + prompt:

- torch:       the model's PyTorch modules (OmniVisionModel loaded from the GGUF files, fp32, eager
               KV-cached loop: the torch backend), through the same Pipeline as the ONNX Runtime backend;
- llama-*:     llama.cpp (llama-cpp-python) on the language-model GGUF at F16, Q8_0 and Q4_0: decoder only
               (it cannot load this mmproj), prefill of the same token ids (the 81 image positions replaced
               by <|image_pad|> ids) and greedy decoding of a fixed number of tokens;
- ort-<v>:     the ONNX Runtime pipeline on bundle variant v (fp32, int8 = cpu-int8, int4 = cpu-int4, gpu-int4 =
               the TensorRT INT4 weight-only graphs run on the CPU, for their accuracy): vision encode, prefill,
               time to first token from the image, decode rate, and the time to first token of a second
               question about the same frame (embedding + prefix-KV reuse);
- ort-ggml-q4_0: the fp32 graphs with the decoder's weights rounded through ggml's Q4_0 (gguf-py's
               quantizer, llama.cpp's format: blocks of 32, the tied embedding Q8_0 as llama.cpp's quantizer
               keeps it for this model): Q4_0's weight error on the same weights, through our own model, for
               the accuracy comparison where llama.cpp is not installed. It does not capture llama.cpp's
               quantization of activations to Q8_0 in its Q4_0 dot products, so it flatters Q4_0 a little;
               its speed is fp32's and means nothing.

- decide-<v>:  the robot decisions on ONNX Runtime variant v (default int8): Check on a new frame against Ask's
               time to first token on the same picture, Check on a cached frame, Choose with 4 options on a
               cached frame, and a watch cycle of 4 cameras (their frames encoded in one batched vision call)
               against 4 single Checks of new frames.

Each system runs in its own subprocess (peak RSS is per system: VmHWM), once to warm up and then --runs
times; medians are reported. Stop tokens are disabled so every system decodes --new-tokens tokens.
Cosine similarity of each reduced precision's image embeddings and last-position logits against fp32 on
the same inputs is computed from one extra, untimed pass. The machine's load average is printed at the
start and end and recorded per system: on a shared 2-core machine it moves every figure.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from omnivision_ros.errors import OmniVisionError, run_command
from omnivision_ros.model.variants import variant_spec

PRESET = "omnivision-968m"
LM_F16 = "Nano-Vlm-Processor-494M-F16.gguf"
LM_Q8_0 = "Nano-Vlm-Processor-494M-Q8_0.gguf"
LM_Q4_0 = "Nano-Vlm-Processor-494M-Q4_0.gguf"
VARIANTS = ("fp32", "int8", "int4", "gpu-int4", "ggml-q4_0")  # ONNX Runtime systems: precisions or variant names
GGML_Q4_0 = "ggml-q4_0"  # a bench-only variant: the fp32 graphs with Q4_0-rounded decoder weights
LLAMA_FILES = {"llama-f16": ("gguf-f16", LM_F16), "llama-q8_0": ("gguf-q8_0", LM_Q8_0), "llama-q4_0": ("", LM_Q4_0)}
# ONNX Runtime variant -> llama.cpp at matched weight precision
MATCHED = {"fp32": "llama-f16", "int8": "llama-q8_0", "int4": "llama-q4_0", "gpu-int4": "llama-q4_0"}
RESULT_TAG = "BENCH_RESULT "
QUESTION = "What do you see in this picture? Describe the scene."
QUESTION2 = "Is there a person in the picture?"
DEFAULT_IMAGE = Path(__file__).resolve().parents[1] / "data" / "sample.jpg"
CHECK_QUESTION = "Is the door open?"
CHOOSE_QUESTION = "What state is the door in?"
CHOOSE_OPTIONS = ("open", "closed", "ajar", "half open")
WATCH_CAMERAS = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivision-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="omnivision-bench-work",
                        help="folder for the written models and bundle, reused between runs "
                             "(default ./omnivision-bench-work)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per system after one warm-up (default 3)")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens decoded per answer, stop tokens off (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every system (default 2)")
    parser.add_argument("--variants", default="fp32,int8,int4", help="ONNX Runtime variants (default fp32,int8,int4)")
    parser.add_argument("--decisions", default="int8",
                        help="ONNX Runtime variants to measure Check, Choose and watch cycles on ('none': skip; default int8)")
    parser.add_argument("--skip", default="",
                        help="systems to leave out, comma-separated: torch, llama, or a name such as llama-f16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--preset", default=PRESET,
                        help=f"model size (default {PRESET}; tiny for a quick check of the script)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="image file (default: the package's sample.jpg)")
    parser.add_argument("--json", help="write every measurement, the ratios and the target checks to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one system in this process
    return parser


# ---------------------------------------------------------------------------------------------
# Preparation (once per --work folder)


def _run_step(args: list[str], what: str) -> None:
    print(f"[prepare] {what}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", *args])
    if done.returncode != 0:
        raise OmniVisionError(f"preparing the benchmark failed while {what} (exit {done.returncode})")
    print(f"[prepare] {what}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def prepare(work: Path, preset: str, seed: int, variants: list[str], llama: bool) -> None:
    """Write the GGUF files, the Q4_0 file and the bundle (with the CPU variants) that are missing."""
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / "gguf-f16"
    if not (f16 / LM_F16).is_file():
        _run_step(["omnivision_ros.export.make_test_model", "--preset", preset, "--out", str(f16), "--dtype", "f16",
                   "--seed", str(seed)], "writing the F16 GGUF files")
    bundle = work / "bundle"
    manifest_path = bundle / "manifest.json"
    gpu = "gpu-int4" in variants
    kinds = [v for v in variants if v in ("int8", "int4")]
    if not manifest_path.is_file() or (gpu and "fp16" not in json.loads(manifest_path.read_text())["variants"]):
        _run_step(["omnivision_ros.export.cli", "--model", str(f16), "--out", str(bundle), "--force",
                   "--cpu-variants", ",".join(kinds) or "none", *(["--fp16"] if gpu else [])],
                  "exporting the bundle from the F16 GGUF files")
    manifest = json.loads(manifest_path.read_text())
    missing = [k for k in kinds if variant_spec(k).name not in manifest["variants"]]
    if missing:
        _run_step(["omnivision_ros.export.cli", "--model", str(bundle), "--out", str(bundle),
                   "--cpu-variants", ",".join(missing)], f"deriving the CPU variants {', '.join(missing)}")
    if gpu and "gpu-int4" not in manifest["variants"]:
        _run_step(["omnivision_ros.export.cli", "--model", str(bundle), "--out", str(bundle), "--gpu-int4"],
                  "deriving the gpu-int4 variant")
    if GGML_Q4_0 in variants and GGML_Q4_0 not in json.loads(manifest_path.read_text())["variants"]:
        _run_step(["omnivision_ros.cli.bench", "--work", str(work), "--worker", "make-" + GGML_Q4_0],
                  "rounding the decoder weights through ggml Q4_0")
    if not llama:
        return
    if not (work / "gguf-q8_0" / LM_Q8_0).is_file():
        _run_step(["omnivision_ros.export.make_test_model", "--preset", preset, "--out", str(work / "gguf-q8_0"),
                   "--dtype", "q8_0", "--seed", str(seed)], "writing the Q8_0 GGUF files")
    if not (work / LM_Q4_0).is_file():
        _run_step(["omnivision_ros.cli.bench", "--work", str(work), "--worker", "quantize-q4_0"],
                  "quantizing the F16 language model to Q4_0 with llama.cpp")


def quantize_q4_0(work: Path) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 1
    tmp = work / (LM_Q4_0 + ".partial")
    status = llama_cpp.llama_model_quantize(str(work / "gguf-f16" / LM_F16).encode(), str(tmp).encode(),
                                            ctypes.byref(params))
    if status != 0:
        raise OmniVisionError(f"llama_model_quantize returned {status}")
    os.replace(tmp, work / LM_Q4_0)


def ggml_roundtrip_decoder(fp32_decoder: Path, out: Path, body: str = "Q4_0", head: str = "Q8_0") -> None:
    """Write the fp32 decoder graph with its matrices rounded through ggml's `body` type and the tied
    embedding through `head` (gguf-py's quantizers: llama.cpp's formats, blocks along the input channels)."""
    import onnx
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from onnx import numpy_helper

    def roundtrip(rows: np.ndarray, kind: str) -> np.ndarray:  # rows [N, K]: blocks run along K, as in GGUF
        qtype = GGMLQuantizationType[kind]
        return dequantize(quantize(np.ascontiguousarray(rows, np.float32), qtype), qtype).astype(np.float32)

    model = onnx.load(str(fp32_decoder))
    inits = {t.name: t for t in model.graph.initializer}
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    for name in matmul_weights:
        w = numpy_helper.to_array(inits[name])  # [K, N]
        inits[name].CopyFrom(numpy_helper.from_array(roundtrip(w.T, body).T, name))
    inits["embed"].CopyFrom(numpy_helper.from_array(roundtrip(numpy_helper.to_array(inits["embed"]), head), "embed"))
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data", size_threshold=1024)


def add_ggml_q4_0_variant(bundle_path: Path) -> None:
    """Register the Q4_0-rounded fp32 graphs as the bench-only variant ggml-q4_0 (vision: the fp32 graph)."""
    from omnivision_ros.export import manifest as mf
    from omnivision_ros.model.bundle import open_bundle
    from omnivision_ros.model.variants import VariantSpec

    bundle = open_bundle(bundle_path)
    spec = VariantSpec(GGML_Q4_0, GGML_Q4_0, io="fp32", exported=False, cpu_only=False)
    ggml_roundtrip_decoder(bundle.variant("fp32").decoder, bundle_path / spec.folder / "decoder.onnx")
    manifest = mf.read_manifest(bundle_path)
    entry = mf.variant_entry(bundle_path, spec, graphs={"vision": bundle.manifest["variants"]["fp32"]["vision"]},
                             derived_from="fp32", description="fp32 graphs, decoder weights rounded through "
                             "ggml Q4_0 (tied embedding Q8_0): an accuracy reference")
    manifest["variants"][GGML_Q4_0] = entry
    mf.commit(bundle_path, manifest, [entry["decoder"], entry["decoder"] + ".data"])


# ---------------------------------------------------------------------------------------------
# Workers: one system each, in a subprocess


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; no /proc elsewhere


def prompt_ids(tokenizer, config) -> tuple[np.ndarray, np.ndarray]:
    from omnivision_ros.model.prompt import PromptBuilder

    prompts = PromptBuilder(tokenizer, config)
    return prompts.build(QUESTION).ids, prompts.question_ids(QUESTION2)


def measure_pipeline(backend, tokenizer, image, runs: int, new_tokens: int) -> dict:
    """Cold question (image in -> answer) then a second question on the same frame, `runs` + 1 times."""
    from omnivision_ros.model.preprocess import preprocess
    from omnivision_ros.runtime.generator import GenerationConfig
    from omnivision_ros.runtime.pipeline import Pipeline

    config = backend.config
    ids, _ = prompt_ids(tokenizer, config)
    # Untimed pass for the accuracy comparison: embeddings and the prompt's last logits.
    embeds = backend.encode_images(preprocess(image, config)[None])[0]  # [81, H]
    session = backend.new_session()
    logits = session.prefill(ids, embeds)
    session.close()

    pipeline = Pipeline(backend, tokenizer, GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=()))
    runs_out, tokens = [], None
    for run in range(runs + 1):  # run 0 warms up (first-touch of weights, allocator, prepacking)
        pipeline.clear_caches()
        first = pipeline.ask(image, QUESTION, frame_key="bench")
        second = pipeline.ask(image, QUESTION2, frame_key="bench", max_new_tokens=1)
        if not (second.timing.vision_cache_hit and second.timing.prefix_cache_hit):
            raise OmniVisionError("the second question did not reuse the frame's embeddings and prefix")
        t = first.timing
        if run == 0:
            tokens = first.token_ids
            continue
        runs_out.append({"encode_ms": t.encode_ms, "prefill_ms": t.prefill_ms, "ttft_ms": t.ttft_ms,
                         "decode_tok_s": t.tokens_per_second, "new_tokens": t.new_tokens,
                         "second_ttft_ms": second.timing.ttft_ms, "second_prefill_tokens": second.timing.prompt_tokens})
    return {"prompt_tokens": int(len(ids)), "runs": runs_out, "tokens": [int(x) for x in tokens],
            "outputs": {"embeds": embeds, "logits": logits}}


def measure_decisions(backend, tokenizer, image, runs: int) -> dict:
    """Check, Choose and a 4-camera watch cycle against Ask's time to first token, `runs` + 1 times."""
    from omnivision_ros.runtime.generator import GenerationConfig
    from omnivision_ros.runtime.pipeline import FrameQuestion, Pipeline

    pipeline = Pipeline(backend, tokenizer, GenerationConfig(max_new_tokens=1, stop_token_ids=()))
    cameras = [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]  # four pictures of one size, four frames
    runs_out = []
    for run in range(runs + 1):  # run 0 warms up
        pipeline.clear_caches()
        ask = pipeline.ask(image, CHECK_QUESTION, frame_key=("ask", run))
        new = pipeline.check(image, CHECK_QUESTION, frame_key=("check", run))
        cached = pipeline.check(image, CHECK_QUESTION, frame_key=("check", run))
        choose = pipeline.choose(image, CHOOSE_QUESTION, CHOOSE_OPTIONS, frame_key=("check", run))
        if not (cached.timing.vision_cache_hit and cached.timing.prefix_cache_hit and choose.timing.prefix_cache_hit):
            raise OmniVisionError("Check and Choose on the checked frame did not reuse its embeddings and prefix")
        pipeline.clear_caches()
        t0 = time.perf_counter()
        for i, picture in enumerate(cameras):
            pipeline.check(picture, CHECK_QUESTION, frame_key=("single", run, i))
        singles_ms = (time.perf_counter() - t0) * 1e3
        pipeline.clear_caches()
        t0 = time.perf_counter()
        cycle = pipeline.check_frames([FrameQuestion(p, CHECK_QUESTION, ("cycle", run, i)) for i, p in enumerate(cameras)])
        cycle_ms = (time.perf_counter() - t0) * 1e3
        if run == 0:
            continue
        runs_out.append({"ask_ttft_ms": ask.timing.ttft_ms, "check_new_ms": new.timing.ttft_ms,
                         "check_new_encode_ms": new.timing.encode_ms, "check_cached_ms": cached.timing.ttft_ms,
                         "choose4_cached_ms": choose.timing.ttft_ms, "watch_cycle_ms": cycle_ms,
                         "watch_cycle_encode_ms": cycle[0].timing.encode_ms, "four_checks_ms": singles_ms})
    option_tokens = [len(tokenizer.encode(o)) for o in CHOOSE_OPTIONS]
    return {"runs": runs_out, "check_prompt_tokens": int(new.timing.prompt_tokens),
            "check_cached_prompt_tokens": int(cached.timing.prompt_tokens), "choose_option_tokens": option_tokens,
            "outputs": {}}


def measure_llama(path: Path, ids: np.ndarray, vocab: int, threads: int, runs: int, new_tokens: int) -> dict:
    import llama_cpp

    from omnivision_ros.model.tokens import IMAGE_PAD_ID

    text_ids = [IMAGE_PAD_ID if i >= vocab else int(i) for i in ids]  # same count; image rows are plain tokens here
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(text_ids) + new_tokens + 16, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    runs_out, tokens, first_logits = [], None, None
    for run in range(runs + 1):
        llm.reset()  # the next eval drops the cache past position 0
        t0 = time.perf_counter()
        llm.eval(text_ids)
        logits = last_logits()
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        generated = [token]
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
            generated.append(token)
        t2 = time.perf_counter()
        if run == 0:
            first_logits, tokens = logits.copy(), generated
            continue
        runs_out.append({"prefill_ms": (t1 - t0) * 1e3, "ttft_ms": (t1 - t0) * 1e3,
                         "decode_tok_s": (new_tokens - 1) / (t2 - t1), "new_tokens": new_tokens})
    return {"prompt_tokens": len(text_ids), "runs": runs_out, "tokens": tokens,
            "outputs": {"logits": first_logits}}


def worker(args: argparse.Namespace) -> int:
    """Measure one system; print its result as one JSON line; save its outputs for the cosine comparison."""
    work = Path(args.work)
    if args.worker == "quantize-q4_0":
        quantize_q4_0(work)
        return 0
    if args.worker == "make-" + GGML_Q4_0:
        add_ggml_q4_0_variant(work / "bundle")
        return 0
    from omnivision_ros.model.preprocess import load_image

    name = args.worker
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    image = load_image(args.image)
    if name == "torch":
        import torch

        from omnivision_ros.model.gguf_loader import load_gguf_model
        from omnivision_ros.runtime.torch_backend import TorchBackend

        torch.set_num_threads(args.threads)
        model, tokenizer = load_gguf_model(work / "gguf-f16")
        backend = TorchBackend(model, args.threads)
        description = backend.description
        load_s = time.perf_counter() - t0
        result = measure_pipeline(backend, tokenizer, image, args.runs, args.new_tokens)
    elif name.startswith(("ort-", "decide-")):
        from omnivision_ros.model.tokenizer import TextTokenizer
        from omnivision_ros.model.bundle import open_bundle
        from omnivision_ros.runtime.ort_backend import OrtBackend

        bundle = open_bundle(work / "bundle")
        backend = OrtBackend(bundle, name.split("-", 1)[1], threads=args.threads, device="cpu")
        tokenizer = TextTokenizer.from_file(bundle.tokenizer_path)
        description = backend.description
        load_s = time.perf_counter() - t0
        if name.startswith("decide-"):
            result = measure_decisions(backend, tokenizer, image, args.runs)
        else:
            result = measure_pipeline(backend, tokenizer, image, args.runs, args.new_tokens)
        entry = bundle.manifest["variants"][backend.variant]
        result["weight_bytes"] = sum(bundle.manifest["files"][f]["size"]
                                     for f in (entry["vision"], entry["decoder"], *entry.get("data", [])))
    elif name in LLAMA_FILES:
        from omnivision_ros.model.tokenizer import TextTokenizer
        from omnivision_ros.model.bundle import open_bundle

        folder, file = LLAMA_FILES[name]
        path = work / folder / file
        bundle = open_bundle(work / "bundle", verify="sizes")
        ids, _ = prompt_ids(TextTokenizer.from_file(bundle.tokenizer_path), bundle.config)
        import llama_cpp

        description = f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, {file}, {args.threads} threads"
        load_s = 0.0  # the model loads inside measure_llama; its load is not part of any figure
        result = measure_llama(path, ids, bundle.config.lm_vocab, args.threads, args.runs, args.new_tokens)
        result["weight_bytes"] = path.stat().st_size
    else:
        raise OmniVisionError(f"unknown system '{name}'")
    outputs = result.pop("outputs")
    (work / "outputs").mkdir(exist_ok=True)
    np.savez(work / "outputs" / f"{name}.npz", **outputs)
    result.update(system=name, description=description, load_s=load_s, peak_rss_kib=vm_kib("VmHWM"),
                  loadavg_before=load_before, loadavg_after=os.getloadavg())
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The run: workers one after the other, then the table


def run_worker(args: argparse.Namespace, system: str) -> dict:
    cmd = [sys.executable, "-m", "omnivision_ros.cli.bench", "--worker", system, "--work", args.work,
           "--runs", str(args.runs), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
           "--image", args.image]
    print(f"[bench] {system} ... (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not lines:
        raise OmniVisionError(f"benchmark of {system} failed (exit {done.returncode}); see the messages above")
    print(f"[bench] {system} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(lines[-1][len(RESULT_TAG):])


def median(result: dict, key: str) -> float | None:
    values = [r[key] for r in result["runs"] if key in r]
    return float(np.median(values)) if values else None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def agreement(tokens: list[int], reference: list[int]) -> dict:
    """Greedy tokens equal to the reference's: leading run (free-running decoding diverges after the first
    difference, so later positions are not comparable) and the overall fraction, for the record."""
    n = min(len(tokens), len(reference))
    same = [tokens[i] == reference[i] for i in range(n)]
    lead = next((i for i, s in enumerate(same) if not s), n)
    return {"leading_equal": lead, "of": n, "fraction_equal": float(np.mean(same)) if n else 0.0}


def summarize(args: argparse.Namespace, results: dict, work: Path) -> dict:
    med = {name: {k: median(r, k) for k in ("encode_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "second_ttft_ms")}
           for name, r in results.items()}
    for name, r in results.items():
        med[name]["peak_rss_mb"] = r["peak_rss_kib"] * 1024 / 1e6
        med[name]["weight_mb"] = r.get("weight_bytes", 0) / 1e6 or None
    outputs = {name: dict(np.load(work / "outputs" / f"{name}.npz")) for name in results}
    accuracy = {}
    if "ort-fp32" in results:
        ref = outputs["ort-fp32"]
        for name in results:
            if (name.startswith("ort-") and name != "ort-fp32") or name == "torch":
                accuracy[name + " vs ort-fp32"] = {
                    "embeds_cosine": cosine(outputs[name]["embeds"], ref["embeds"]),
                    "logits_cosine": cosine(outputs[name]["logits"], ref["logits"]),
                    "greedy": agreement(results[name]["tokens"], results["ort-fp32"]["tokens"]),
                }
    if "llama-f16" in results:
        for name in ("llama-q8_0", "llama-q4_0"):
            if name in results:
                accuracy[name + " vs llama-f16"] = {
                    "logits_cosine": cosine(outputs[name]["logits"], outputs["llama-f16"]["logits"]),
                    "greedy": agreement(results[name]["tokens"], results["llama-f16"]["tokens"]),
                }

    ratios = {}
    ref = med.get("torch")
    for name, m in med.items():
        if not name.startswith("ort-"):
            continue
        r = {}
        if ref:
            r["vs torch"] = {"encode_speedup": _div(ref["encode_ms"], m["encode_ms"]),
                             "prefill_speedup": _div(ref["prefill_ms"], m["prefill_ms"]),
                             "ttft_ratio": _div(m["ttft_ms"], ref["ttft_ms"]),
                             "decode_speedup": _div(m["decode_tok_s"], ref["decode_tok_s"])}
        llama = MATCHED.get(name[4:])
        if llama in med:
            r["vs " + llama] = {"decode_ratio": _div(m["decode_tok_s"], med[llama]["decode_tok_s"]),
                                "prefill_time_ratio": _div(m["prefill_ms"], med[llama]["prefill_ms"])}
        r["second_question_ttft_ratio"] = _div(m["second_ttft_ms"], m["ttft_ms"])
        if m["weight_mb"]:
            r["peak_rss_over_weights"] = m["peak_rss_mb"] / m["weight_mb"]
        ratios[name] = r
    return {"medians": med, "ratios": ratios, "accuracy": accuracy, "targets": targets(med, ratios, accuracy)}


def _div(a, b):
    return None if a is None or not b else a / b


def targets(med: dict, ratios: dict, accuracy: dict) -> list[dict]:
    """The issue's targets, each with the measured value and whether it is met."""
    out = []

    def check(name: str, value, limit: float, ok: bool) -> None:
        if value is not None:
            out.append({"target": name, "value": round(value, 4), "limit": limit, "met": bool(ok)})

    for variant, llama in (("int8", "llama-q8_0"), ("int4", "llama-q4_0")):
        r = ratios.get("ort-" + variant, {}).get("vs " + llama, {})
        v = r.get("decode_ratio")
        check(f"{variant} decode tok/s >= {llama}", v, 1.0, v is not None and v >= 1.0)
        v = r.get("prefill_time_ratio")
        check(f"{variant} prefill time <= {llama}", v, 1.0, v is not None and v <= 1.0)
    for name, r in ratios.items():
        v = r.get("vs torch", {}).get("ttft_ratio")
        check(f"{name} TTFT <= 0.5x torch", v, 0.5, v is not None and v <= 0.5)
        v = r.get("second_question_ttft_ratio")
        check(f"{name} second-question TTFT <= 0.1x first", v, 0.1, v is not None and v <= 0.1)
    fp32 = ratios.get("ort-fp32", {}).get("vs torch")
    if fp32:
        worst = min(fp32["encode_speedup"], fp32["prefill_speedup"], fp32["decode_speedup"], 1 / fp32["ttft_ratio"])
        check("ort-fp32 faster than torch (worst of encode/prefill/TTFT/decode speedups)", worst, 1.0, worst > 1.0)
    for name, a in accuracy.items():
        if name.startswith("ort-") and GGML_Q4_0 not in name:
            v = min(a["embeds_cosine"], a["logits_cosine"])
            check(f"{name.split()[0]} cosine (min of embeds, logits) >= 0.99", v, 0.99, v >= 0.99)
    gpu = accuracy.get("ort-gpu-int4 vs ort-fp32", {}).get("logits_cosine")
    for reference in (f"ort-{GGML_Q4_0} vs ort-fp32", "llama-q4_0 vs llama-f16"):
        ref = accuracy.get(reference, {}).get("logits_cosine")
        if gpu is not None and ref is not None:
            check(f"gpu-int4 logits cosine >= {reference}'s ({ref:.5f})", gpu, round(ref, 5), gpu >= ref)
    v = ratios.get("ort-fp32", {}).get("peak_rss_over_weights")
    check("ort-fp32 peak RSS <= 1.3x fp32 weight bytes", v, 1.3, v is not None and v <= 1.3)
    return out


DECISION_KEYS = ("ask_ttft_ms", "check_new_ms", "check_new_encode_ms", "check_cached_ms", "choose4_cached_ms",
                 "watch_cycle_ms", "watch_cycle_encode_ms", "four_checks_ms")


def summarize_decisions(results: dict) -> dict:
    """Medians, ratios and the issue's targets of each decide-<v> system."""
    out = {}
    for name, r in results.items():
        med = {k: median(r, k) for k in DECISION_KEYS}
        check = {"check_new_over_ask_ttft": _div(med["check_new_ms"], med["ask_ttft_ms"]),
                 "watch_cycle_over_four_checks": _div(med["watch_cycle_ms"], med["four_checks_ms"])}
        targets_out = [
            {"target": "Check on a new frame <= 1.1x Ask TTFT on it", "value": round(check["check_new_over_ask_ttft"], 4),
             "limit": 1.1, "met": check["check_new_over_ask_ttft"] <= 1.1},
            {"target": "Check on a cached frame <= 100 ms", "value": round(med["check_cached_ms"], 2), "limit": 100.0,
             "met": med["check_cached_ms"] <= 100.0},
            {"target": "4-camera watch cycle <= 4 single Checks", "value": round(check["watch_cycle_over_four_checks"], 4),
             "limit": 1.0, "met": check["watch_cycle_over_four_checks"] <= 1.0},
        ]
        out[name] = {"medians": med, "ratios": check, "targets": targets_out,
                     "check_prompt_tokens": r["check_prompt_tokens"],
                     "check_cached_prompt_tokens": r["check_cached_prompt_tokens"],
                     "choose_option_tokens": r["choose_option_tokens"], "description": r["description"],
                     "loadavg": [r["loadavg_before"], r["loadavg_after"]]}
    return out


def print_decisions(decisions: dict, runs: int) -> None:
    for name, d in decisions.items():
        m, q = d["medians"], d["ratios"]
        load = (d["loadavg"][0][0] + d["loadavg"][1][0]) / 2
        print(f"\ndecisions, {name} ({d['description']}; medians of {runs} runs, load 1m {load:.2f})")
        print(f"  Ask, new frame: time to first token       {m['ask_ttft_ms']:9.1f} ms")
        print(f"  Check, new frame                          {m['check_new_ms']:9.1f} ms  ({q['check_new_over_ask_ttft']:.3f}x "
              f"Ask's TTFT; encode {m['check_new_encode_ms']:.1f} ms, prefill {d['check_prompt_tokens']} tokens)")
        print(f"  Check, cached frame                       {m['check_cached_ms']:9.1f} ms  "
              f"(prefill {d['check_cached_prompt_tokens']} tokens)")
        print(f"  Choose, 4 options, cached frame           {m['choose4_cached_ms']:9.1f} ms  "
              f"(option tokens {d['choose_option_tokens']})")
        print(f"  4 watches on 4 cameras, one cycle         {m['watch_cycle_ms']:9.1f} ms  "
              f"(batched encode {m['watch_cycle_encode_ms']:.1f} ms)")
        print(f"  4 single Checks of new frames             {m['four_checks_ms']:9.1f} ms  "
              f"(cycle {q['watch_cycle_over_four_checks']:.3f}x)")
        for t in d["targets"]:
            print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']} (limit {t['limit']})")


def _fmt(value, spec: str) -> str:
    """format(value, spec), or a dash as wide as the spec's field."""
    return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))


def print_report(summary: dict, results: dict, load_start, load_end, prompt_tokens: int, args) -> None:
    med = summary["medians"]
    print(f"\nomnivision-bench: medians of {args.runs} runs, {args.new_tokens} new tokens, {args.threads} threads, "
          f"prompt {prompt_tokens} tokens (81 image positions); load avg at start {load_start[0]:.2f} "
          f"{load_start[1]:.2f} {load_start[2]:.2f}, at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    header = (f"{'system':<12}{'encode ms':>10}{'prefill ms':>11}{'TTFT ms':>9}{'decode tok/s':>13}"
              f"{'2nd-q TTFT':>11}{'peak RSS MB':>12}{'weights MB':>11}{'load 1m':>9}")
    print(header)
    print("-" * len(header))
    for name, m in med.items():
        r = results[name]
        load = (r["loadavg_before"][0] + r["loadavg_after"][0]) / 2
        print(f"{name:<12}{_fmt(m['encode_ms'], '10.0f')}{_fmt(m['prefill_ms'], '11.0f')}{_fmt(m['ttft_ms'], '9.0f')}"
              f"{_fmt(m['decode_tok_s'], '13.1f')}{_fmt(m['second_ttft_ms'], '11.0f')}{m['peak_rss_mb']:12.0f}"
              f"{_fmt(m['weight_mb'], '11.0f')}{load:9.2f}")
    print("\nratios")
    for name, r in summary["ratios"].items():
        parts = []
        if "vs torch" in r:
            h = r["vs torch"]
            parts.append(f"vs torch: encode {h['encode_speedup']:.2f}x faster, prefill {h['prefill_speedup']:.2f}x "
                         f"faster, TTFT {h['ttft_ratio']:.2f}x, decode {h['decode_speedup']:.2f}x faster")
        for key, v in r.items():
            if key.startswith("vs llama"):
                parts.append(f"{key}: decode {v['decode_ratio']:.2f}x, prefill time {v['prefill_time_ratio']:.2f}x")
        parts.append(f"2nd-question TTFT {r['second_question_ttft_ratio']:.3f}x the first")
        if "peak_rss_over_weights" in r:
            parts.append(f"peak RSS {r['peak_rss_over_weights']:.2f}x its weight bytes")
        print(f"  {name}: " + "; ".join(parts))
    if summary["accuracy"]:
        print("\naccuracy on the same inputs")
        for name, a in summary["accuracy"].items():
            emb = f"embeds cosine {a['embeds_cosine']:.5f}, " if "embeds_cosine" in a else ""
            g = a["greedy"]
            print(f"  {name}: {emb}last logits cosine {a['logits_cosine']:.5f}; greedy tokens: first "
                  f"{g['leading_equal']} of {g['of']} equal ({100 * g['fraction_equal']:.0f} % overall)")
    print("\ntargets")
    for t in summary["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']} (limit {t['limit']})")


def run(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise OmniVisionError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.runs < 1 or args.new_tokens < 2 or args.threads < 1:
        raise OmniVisionError("--runs and --threads must be >= 1 and --new-tokens >= 2")
    decisions = [v.strip() for v in args.decisions.split(",") if v.strip() and v.strip() != "none"]
    unknown = [v for v in decisions if v not in VARIANTS or v == GGML_Q4_0]
    if unknown:
        raise OmniVisionError(f"--decisions: unknown {', '.join(unknown)}; choose from fp32, int8, int4, gpu-int4, none")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    systems = [] if "torch" in skip else ["torch"]
    for v in variants:  # each ONNX Runtime variant right after llama.cpp at its precision: same load conditions
        llama = MATCHED.get(v)
        if llama and not ({"llama", llama} & skip) and llama not in systems:
            systems.append(llama)
        systems.append("ort-" + v)
    if importlib.util.find_spec("llama_cpp") is None:  # optional: the benchmark extra
        if any(s.startswith("llama") for s in systems):
            print("[bench] llama-cpp-python is not installed: llama.cpp is left out", file=sys.stderr)
            systems = [s for s in systems if not s.startswith("llama")]
    work = Path(args.work).resolve()
    args.work = str(work)
    load_start = os.getloadavg()
    print(f"[bench] load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} CPUs)", file=sys.stderr, flush=True)
    prepare(work, args.preset, args.seed, variants + [v for v in decisions if v not in variants],
            any(s.startswith("llama") for s in systems))
    results = {s: run_worker(args, s) for s in systems}
    decided = {f"decide-{v}": run_worker(args, f"decide-{v}") for v in decisions}
    load_end = os.getloadavg()
    summary = summarize(args, results, work) if results else {"medians": {}, "ratios": {}, "accuracy": {}, "targets": []}
    summary["decisions"] = summarize_decisions(decided)
    prompt_tokens = next(iter(results.values()))["prompt_tokens"] if results else 0
    if results:
        print_report(summary, results, load_start, load_end, prompt_tokens, args)
    else:
        print(f"\nomnivision-bench: load avg at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
              f"at end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print_decisions(summary["decisions"], args.runs)
    if args.json:
        report = {
            "command": " ".join(["omnivision-bench", *sys.argv[1:]]),
            "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
                        "loadavg_start": load_start, "loadavg_end": load_end},
            "settings": {"runs": args.runs, "new_tokens": args.new_tokens, "threads": args.threads,
                         "seed": args.seed, "image": args.image, "prompt_tokens": prompt_tokens,
                         "questions": [QUESTION, QUESTION2], "check_question": CHECK_QUESTION,
                         "choose": [CHOOSE_QUESTION, list(CHOOSE_OPTIONS)]},
            "systems": {name: {k: v for k, v in r.items() if k != "tokens"} for name, r in {**results, **decided}.items()},
            **summary,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("omnivision-bench", lambda: worker(args) if args.worker else run(args))


if __name__ == "__main__":
    sys.exit(main())

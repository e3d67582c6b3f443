"""The peer a CPU robot would pick instead of us: llama.cpp (the engine under llama_ros), decode
speed side by side with our ONNX Runtime exports on the same language model at Qwen2-VL-2B size.

    python benchmarks/llama_cpp_peer.py --llama-python ~/.cache/vlsi_ros/peer/venv-llamacpp/bin/python \\
        --llama-src ~/.cache/vlsi_ros/peer/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --ours int4=~/.cache/vlsi_ros/real_size/qwen2_vl_2b/onnx_int4 --threads 2

llama.cpp is not a dependency of this project: it is built in its own venv from the
`llama-cpp-python` sdist (`pip install llama-cpp-python` compiles it; ~15 min on 2 cores).

What is compared: decode tokens/s of the language model alone (llama.cpp's Qwen2-VL vision path
cannot load our weights; decode is the language model in both). The weights are the random-weight
Qwen2-VL-2B of `vlsi bench --dims 2b` (vlsi_model/real_size.py): its language model is a Qwen2
LM with the same tensor names, saved as a Qwen2ForCausalLM directory (text-only M-RoPE positions
equal 1-D RoPE), converted to GGUF with llama.cpp's own convert_hf_to_gguf.py and quantized with
its own quantizer to Q4_0 and Q8_0. Ours: the `vlsi export --quantize int4|int8` decoder under
ONNX Runtime (`OnnxRuntimeEngine`, asked about a synthetic frame). Each side decodes
`--tokens` tokens greedily after a prompt of about the same length (our image + question
prefill; llama.cpp gets that many prompt tokens), in its own process, the two alternating
`--rounds` times so load from other processes hits both alike; other processes' CPU use during
each run is printed beside it. Random weights: the tokens mean nothing, the speed is real.

Why the convert step patches two functions: convert_hf_to_gguf.py recognises a tokenizer by the
hash of its pre-tokenizer output and refuses unknown ones; ours is the project's small BPE with
Qwen2's pre-tokenizer, so it is declared "qwen2" (the vocabulary is padded to the model's 151,936
rows as the script does for any short vocabulary); and its Qwen2 class tries a sentencepiece
model first, which a BPE tokenizer.json does not have.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_WORKER = r'''
import json, sys, time
import llama_cpp
path, threads, prompt_len, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_len + tokens + 8, n_threads=threads, n_threads_batch=threads,
                      n_batch=512, verbose=False)
load_s = time.perf_counter() - t0
prompt = [100 + (i * 7919) % 900 for i in range(prompt_len)]  # in-vocabulary ids of the small tokenizer
llm.eval(prompt[:8])  # warm-up, as ours answers once before it is timed
llm.eval([int(llm.sample(top_k=1, temp=0.0))])
llm.reset()
t0 = time.perf_counter()
llm.eval(prompt)
prefill_ms = (time.perf_counter() - t0) * 1e3
times = []
for _ in range(tokens):  # a step = pick the token + run it, as our decode_ms counts argmax and detokenising too
    t1 = time.perf_counter()
    token = int(llm.sample(top_k=1, temp=0.0))
    llm.eval([token])
    times.append(time.perf_counter() - t1)
print("RESULT " + json.dumps({"load_s": load_s, "prefill_ms": prefill_ms, "decode_tok_s": len(times) / sum(times)}))
'''

OURS_WORKER = r'''
import json, sys, time
sys.path.insert(0, sys.argv[5])
from vlsi_model.engine.onnxruntime_engine import OnnxRuntimeEngine
from vlsi_model.bench import bench_inputs
path, threads, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
engine = OnnxRuntimeEngine(path, num_threads=threads)
load_s = time.perf_counter() - t0
rgb, _ = bench_inputs(1)[0]
question = sys.argv[4]
engine.answer(rgb, question, max_new_tokens=2)  # warm-up
r = engine.answer(rgb, question, max_new_tokens=tokens)
decoded = max(len(r.token_ids) - 1, 1)  # the first token comes from the prefill
prompt_tokens = len(engine.prepare(rgb, question)["input_ids"])
print("RESULT " + json.dumps({"load_s": load_s, "prefill_ms": r.prefill_ms, "vision_ms": r.vision_ms,
                              "decode_tok_s": decoded / (r.decode_ms / 1e3), "tokens": len(r.token_ids),
                              "prompt_tokens": prompt_tokens}))
'''


def qwen2_lm_dir(vlm_dir: Path, out: Path) -> Path:
    """The language model of a Qwen2-VL directory as a Qwen2ForCausalLM directory (same tensors)."""
    if (out / "model.safetensors").is_file():
        return out
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(vlm_dir / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("visual.")}  # noqa: SIM118 (a safe_open handle)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    cfg = json.loads((vlm_dir / "config.json").read_text())
    t = cfg["text_config"]
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": t["hidden_size"],
        "intermediate_size": t["intermediate_size"], "num_hidden_layers": t["num_hidden_layers"],
        "num_attention_heads": t["num_attention_heads"], "num_key_value_heads": t["num_key_value_heads"],
        "vocab_size": t["vocab_size"], "rms_norm_eps": t["rms_norm_eps"],
        "rope_theta": t["rope_parameters"]["rope_theta"], "max_position_embeddings": t["max_position_embeddings"],
        "tie_word_embeddings": cfg["tie_word_embeddings"], "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": t.get("bos_token_id"), "eos_token_id": t.get("eos_token_id")}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(vlm_dir / name, out / name)
    return out


def convert_to_gguf(lm_dir: Path, llama_src: Path, out: Path) -> Path:
    """GGUF (f16) of `lm_dir` with llama.cpp's own converter (see the module docstring's patch)."""
    if out.is_file():  # written by the converter in one go at its end; a crash leaves none
        return out
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", llama_src / "convert_hf_to_gguf.py")
    module = importlib.util.module_from_spec(spec)
    sys.path[:0] = [str(llama_src), str(llama_src / "gguf-py")]  # its `conversion` package and gguf
    spec.loader.exec_module(module)
    from conversion.base import TextModel  # the converter's package, on the path now
    from conversion.qwen import Qwen2Model

    TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    Qwen2Model.set_vocab = lambda self: self._set_vocab_gpt2()  # a BPE tokenizer.json, no sentencepiece model
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(lm_dir), "--outfile", str(out), "--outtype", "f16"]
    try:
        module.main()
    finally:
        sys.argv = argv
    return out


def quantize(llama_python: str, src: Path, kind: str) -> Path:
    """Q4_0 / Q8_0 of `src` with llama.cpp's quantizer (in its venv)."""
    out = src.with_name(f"{src.stem}-{kind}.gguf")
    if out.is_file():
        return out
    code = ("import sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{kind.upper()}\n"
            f"p.nthread = {os.cpu_count()}\n"
            "rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)\n"
            "sys.exit(rc)\n")
    subprocess.run([llama_python, "-c", code, str(src), str(out)], check=True)
    return out


def run_worker(cmd: list[str]) -> dict:
    """Run one measuring process; its result plus the CPU cores other processes used meanwhile
    (`vlsi bench`'s own accounting)."""
    from vlsi_model.bench import run_counting_others

    done, others = run_counting_others(cmd, timeout=3600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{cmd[:3]} failed: {done.stderr[-2000:]}")
    return {**json.loads(line[len("RESULT "):]), "other_cpu_cores": None if others is None else round(others, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", required=True, help="python of the venv where llama-cpp-python is built")
    p.add_argument("--llama-src", type=Path, required=True, help="llama.cpp source (the sdist's vendor/llama.cpp)")
    p.add_argument("--ours", action="append", default=[], metavar="NAME=EXPORT_DIR",
                   help="our ONNX export(s) to compare (e.g. int4=.../onnx_int4)")
    p.add_argument("--kinds", default="q4_0,q8_0", help="llama.cpp quantizations")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--question", default="What objects are there?")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vlsi_ros" / "peer" / "qwen2_vl_2b")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    from vlsi_model.bench import decoder_file_bytes
    from vlsi_model.real_size import real_size_model_dir

    vlm = real_size_model_dir("2b", progress=print)
    lm = qwen2_lm_dir(vlm, a.work / "qwen2_lm")
    f16 = convert_to_gguf(lm, a.llama_src.expanduser(), a.work / "qwen2_lm-f16.gguf")
    ggufs = {kind: quantize(a.llama_python, f16, kind) for kind in a.kinds.split(",")}
    ours = dict(item.split("=", 1) for item in a.ours)

    # our prefill length sets llama.cpp's prompt length (the same KV cache size while decoding)
    first = None
    results: dict[str, list[dict]] = {f"ours {n}": [] for n in ours} | {f"llama.cpp {k}": [] for k in ggufs}
    for r in range(a.rounds):
        for name, export in ours.items():
            res = run_worker([sys.executable, "-c", OURS_WORKER, str(Path(export).expanduser()), str(a.threads),
                              str(a.tokens), a.question, str(REPO)])
            results[f"ours {name}"].append(res)
            first = first or res
        prompt_len = int(first["prompt_tokens"]) if first and first.get("prompt_tokens") else 300
        for kind, path in ggufs.items():
            results[f"llama.cpp {kind}"].append(run_worker([a.llama_python, "-c", LLAMA_WORKER, str(path),
                                                            str(a.threads), str(prompt_len), str(a.tokens)]))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    sizes = {f"llama.cpp {k}": v.stat().st_size for k, v in ggufs.items()}
    sizes |= {f"ours {n}": decoder_file_bytes(str(Path(e).expanduser())) for n, e in ours.items()}
    print(f"decode tokens/s, language model of Qwen2-VL-2B dims (random weights), {a.threads} threads, "
          f"{a.tokens} tokens after a ~{prompt_len}-token prompt; median of {a.rounds} alternating runs")
    # "file MB": the GGUF holds the embedding table too (tied: it is also the head); ours is the
    # decoder graph (head included), the embedding table being a separate file read a row per token
    print(f"{'engine':<18} {'decode tok/s':>12} {'min-max':>11} {'file MB':>8} {'prefill ms':>10} {'others CPU':>10}")
    summary = {}
    for name, runs in results.items():
        rates = [x["decode_tok_s"] for x in runs]
        tok_s = statistics.median(rates)
        summary[name] = {"decode_tok_s": tok_s, "weights_bytes": sizes[name], "runs": runs}
        print(f"{name:<18} {tok_s:>12.1f} {min(rates):>5.1f}-{max(rates):<5.1f} {sizes[name] / 1e6:>8.0f} "
              f"{statistics.median(x['prefill_ms'] for x in runs):>10.0f} "
              f"{max((x['other_cpu_cores'] or 0.0) for x in runs):>10.2f}")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

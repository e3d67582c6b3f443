"""`vlsi label`: a teacher answers the questions of unlabelled records (pseudo-labels).

    vlsi label --teacher DIR --data unlabelled.json --out labelled.json [--batch-size 16]
    vlsi label --endpoint http://gpu-box:8000/v1 --model Qwen/Qwen2-VL-72B-Instruct --data ... --out ...
    vlsi label --teacher DIR ... --cache DIR --top-k 64 --verbalizers RUN/teacher_verbalizers

A local teacher (a model directory) answers in left-padded batches with greedy decoding
(`--backend torch`, the default) or one question at a time through a serving engine
(`--backend onnxruntime|tensorrt`, no token probabilities). A teacher too large for this
machine is served by vLLM or SGLang and reached through their OpenAI-compatible API. Every
labelled record keeps the answer, its mean token probability and the teacher's name; a killed
run resumes where it stopped. `--cache` also writes the teacher's top-k verbalized
distributions over the labelled records (the format `vlsi distill` reads with
`teacher_cache.path`), so the interaction step never loads the teacher again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlsi_model.commands._common import EXIT_BAD_INPUT, add_threads_argument, apply_torch_threads, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("label", help="a teacher answers unlabelled records (pseudo-labels)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--teacher", type=Path, help="teacher model directory (Hugging Face layout)")
    who.add_argument("--endpoint", help="OpenAI-compatible server URL (vLLM, SGLang), e.g. http://host:8000/v1")
    p.add_argument("--model", help="model name on the endpoint (with --endpoint)")
    p.add_argument("--api-key", default="EMPTY", help="endpoint API key (default EMPTY, as vLLM expects)")
    p.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight to the endpoint (8)")
    p.add_argument("--top-logprobs", type=int, default=0, help="ask the endpoint for this many top logprobs")
    p.add_argument("--max-retries", type=int, default=5, help="retries per request, with backoff (5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per endpoint request (120)")
    p.add_argument("--data", required=True, type=Path, help="LLaVA JSON / JSONL with questions (answers optional)")
    p.add_argument("--out", required=True, type=Path, help="labelled LLaVA JSON to write")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="local teacher: torch (batched generate, token probabilities) or a serving engine")
    p.add_argument("--batch-size", type=positive_int, default=16, help="questions per batch (default 16)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="teacher dtype (default: the checkpoint's)")
    p.add_argument("--max-records", type=positive_int, default=None, help="label only the first N records")
    p.add_argument("--cache", type=Path, default=None, help="also write the teacher's top-k distributions here")
    p.add_argument("--top-k", type=positive_int, default=64, help="entries per distribution in --cache (64)")
    p.add_argument("--verbalizers", type=Path, default=None,
                   help="the teacher's verbalizers for --cache (a distill run's teacher_verbalizers folder)")
    p.add_argument("--student", type=Path, default=None,
                   help="the student the cache is for: the cache covers the vocabulary both share (default: the "
                        "teacher's whole vocabulary)")
    p.add_argument("--max-length", type=positive_int, default=2048,
                   help="data.max_length of the distill config the cache is for (2048)")
    p.add_argument("--cache-temperature", type=float, default=1.0,
                   help="distill loss.temperature the cache is for (default 1.0)")
    p.add_argument("--no-progress", action="store_true")
    add_threads_argument(p)
    p.set_defaults(func=run)


def _teacher(args: argparse.Namespace):
    if args.endpoint:
        if not args.model:
            raise ValueError("--endpoint needs --model (the served model's name)")
        from vlsi_model.data.endpoint_teacher import EndpointTeacher

        return EndpointTeacher(args.endpoint, args.model, api_key=args.api_key, max_new_tokens=args.max_new_tokens,
                               concurrency=args.concurrency, top_logprobs=args.top_logprobs,
                               max_retries=args.max_retries, timeout_s=args.timeout)
    if args.backend == "torch":
        from vlsi_model.data.labelling import LocalTeacher

        return LocalTeacher(args.teacher, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    from vlsi_model.data.labelling import EngineTeacher

    return EngineTeacher(args.teacher, backend=args.backend, device=args.device, max_new_tokens=args.max_new_tokens)


def run(args: argparse.Namespace) -> int:
    from vlsi_model.data.endpoint_teacher import EndpointError
    from vlsi_model.data.labelling import LabelError, label_file
    from vlsi_model.errors import EngineError

    if args.cache and not (args.teacher and args.verbalizers):
        print("vlsi label: error: --cache needs a local --teacher and its --verbalizers", file=sys.stderr)
        return EXIT_BAD_INPUT
    apply_torch_threads(args.threads)
    try:
        teacher = _teacher(args)
        report = label_file(teacher, args.data, args.out, batch_size=args.batch_size,
                            progress=not args.no_progress, max_records=args.max_records)
    except (LabelError, EngineError, EndpointError, ValueError, OSError) as exc:
        print(f"vlsi label: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    bad = ", ".join(f"{n} {reason}" for reason, n in report.bad_images.items()) or "none"
    print(f"labelled {report.labelled} questions with {report.teacher} in {report.seconds:.1f} s "
          f"({report.rate:.1f} questions/s); kept from an earlier run {report.resumed}, already answered "
          f"{report.given}, empty answers left out {report.empty_answers}, unreadable images: {bad}")
    if report.truncated_answers:
        print(f"warning: {report.truncated_answers} answers hit --max-new-tokens {args.max_new_tokens} before the "
              "teacher stopped, so may be cut short (marked \"truncated\" in their label block): raise "
              "--max-new-tokens and label again to train on whole answers", file=sys.stderr)
    print(f"wrote {args.out}")
    if args.cache:
        from vlsi_model.distill.teacher_cache import write_teacher_cache

        vocab = None
        if args.student:
            from vlsi_model.distill.steps_common import load_config_vocab
            vocab = min(load_config_vocab(args.student), load_config_vocab(args.teacher))
        path = write_teacher_cache(args.teacher, args.verbalizers, args.out, args.cache, k=args.top_k,
                                   batch_size=args.batch_size, device=args.device,
                                   temperature=args.cache_temperature, vocab_size=vocab, max_length=args.max_length)
        print(f"wrote the teacher cache (top-{args.top_k}) to {path}; use it with teacher_cache.path in the "
              "distill config and this labelled file as data.train")
    (args.out.parent / (args.out.name + ".report.json")).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0

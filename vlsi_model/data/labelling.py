"""Teacher labelling: a teacher answers the questions of unlabelled LLaVA records.

`label_file` is the driver every teacher shares: it reads the records (questions, maybe no
answers), sends batches of (image, question) to a `Teacher`, and writes each record back with
the teacher's answer as its gpt turn and a `label` block saying where the answer came from:

    "label": {"source": "teacher", "teacher": "<name>", "mean_token_prob": 0.93, "num_tokens": 3}

so a teacher's answer is never mistaken for ground truth later (`vlsi eval` refuses to score
against such records unless asked, and training logs how many it used). Records that already
have an answer are kept as they are (`label.source` "given").

Resumable: every labelled record is appended to `<out>.partial.jsonl` (one per process) as
soon as its batch is done; a killed run restarts where it stopped, keeping what was written.
The final JSON replaces the output file atomically at the end. Images that cannot be read
are counted per reason and reported, never labelled. Under `accelerate launch` each process
labels its share of the records and the main process merges them.

Teachers: `LocalTeacher` (a model directory, batched greedy decoding with Hugging Face
`generate`) here; `vlsi_model.data.endpoint_teacher.EndpointTeacher` for a teacher served by
an OpenAI-compatible server (vLLM, SGLang).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class LabelRequest:
    """One question to answer: `key` identifies the record (its id, or its index in the file)."""

    key: str
    image_path: Path
    question: str


@dataclass(frozen=True)
class TeacherAnswer:
    answer: str
    mean_token_prob: float | None  # mean probability of the answer's tokens; None if the teacher gives none
    num_tokens: int
    truncated: bool = False  # the answer hit max_new_tokens before the teacher stopped: cut short


class Teacher(Protocol):
    """Anything that answers a batch of questions about images, greedily."""

    name: str

    def answer_batch(self, requests: Sequence[LabelRequest], images: Sequence[np.ndarray]) -> list[TeacherAnswer]:
        ...


@dataclass
class LabelReport:
    records: int = 0  # records in the input
    labelled: int = 0  # records answered by the teacher in this run
    asked: int = 0  # questions the teacher was asked (a repeated image + question is asked once)
    resumed: int = 0  # answered in an earlier, interrupted run and kept
    given: int = 0  # records that already had an answer
    empty_answers: int = 0  # the teacher said nothing: left out (an empty answer cannot be trained on)
    truncated_answers: int = 0  # records whose answer hit max_new_tokens (maybe cut short): kept, marked, counted
    bad_images: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    teacher: str = ""
    out: str = ""

    @property
    def rate(self) -> float:
        """Questions the teacher answered per second in this run."""
        return self.asked / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "questions_per_s": round(self.rate, 2)}


class LabelError(ValueError):
    """The input cannot be labelled (unreadable file, records without a question)."""


def first_question(record: Any) -> str:
    """The first human turn's text without LLaVA's image placeholder; LabelError if there is none."""
    convs = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(convs, list) or not convs or not isinstance(convs[0], dict) or \
            convs[0].get("from") not in ("human", "user") or not isinstance(convs[0].get("value"), str):
        raise LabelError("the record has no first human turn")
    text = convs[0]["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
    if not text:
        raise LabelError("the first human turn is empty")
    return text


def has_answer(record: dict[str, Any]) -> bool:
    convs = record.get("conversations") or []
    return len(convs) > 1 and isinstance(convs[1], dict) and bool(str(convs[1].get("value", "")).strip())


def with_teacher_answer(record: dict[str, Any], answer: TeacherAnswer, teacher: str) -> dict[str, Any]:
    """A copy of `record` whose first question is answered by the teacher, with the `label` block."""
    out = dict(record)
    convs = list(record["conversations"][:1])
    convs.append({"from": "gpt", "value": answer.answer})
    out["conversations"] = convs
    out["label"] = {"source": "teacher", "teacher": teacher,
                    "mean_token_prob": None if answer.mean_token_prob is None else round(answer.mean_token_prob, 6),
                    "num_tokens": answer.num_tokens}
    if answer.truncated:
        out["label"]["truncated"] = True
    return out


def is_teacher_labelled(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("label"), dict) and \
        record["label"].get("source") == "teacher"


def _read_partial(path: Path, teacher: str) -> dict[str, dict[str, Any]]:
    """Records a previous run of the same teacher appended; a last line cut by a kill is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written when the run was killed
        if isinstance(item, dict) and "key" in item and "record" in item and item.get("teacher") == teacher:
            done[str(item["key"])] = item["record"]
    return done


def _read_partials(out_path: Path, teacher: str, records: Sequence[Any], keys: Sequence[str]
                   ) -> dict[str, dict[str, Any]]:
    """What earlier runs labelled that still fits: same teacher, same question and image."""
    done: dict[str, dict[str, Any]] = {}
    for partial in sorted(out_path.parent.glob(out_path.name + ".partial*.jsonl")):
        done.update(_read_partial(partial, teacher))
    current = {k: (r.get("image"), first_question(r)) for k, r in zip(keys, records, strict=True)}
    stale = [k for k, r in done.items() if k not in current or (r.get("image"), first_question(r)) != current[k]]
    if stale:
        log.warning("%s: %d labels of an earlier run belong to other records (the input changed): labelling "
                    "them again", out_path, len(stale))
    return {k: r for k, r in done.items() if k not in stale}


def _relocator(data_dir: Path, out_dir: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Rewrites a record's relative image path for a file written to `out_dir` instead of
    `data_dir` (relative paths are resolved against the data file's folder)."""
    def relocate(record: dict[str, Any]) -> dict[str, Any]:
        image = Path(str(record.get("image", "")))
        if image.is_absolute() or data_dir.resolve() == out_dir.resolve():
            return record
        return {**record, "image": os.path.relpath((data_dir / image).resolve(), out_dir.resolve())}

    return relocate


def _load_rgb(path: Path) -> np.ndarray:
    from vlsi_model.data.llava import load_image

    return load_image(path)


def label_file(
    teacher: Teacher,
    data_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    batch_size: int = 16,
    progress: bool = True,
    max_records: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> LabelReport:
    """Label every unanswered record of `data_path` with `teacher` into `out_path` (see module doc)."""
    from vlsi_model.data.llava import read_records
    from vlsi_model.training.trainer import distributed_state

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data_path, out_path = Path(data_path).expanduser(), Path(out_path).expanduser()
    state = distributed_state()
    started = time.perf_counter()
    try:
        records = read_records(data_path)
    except ValueError as exc:
        raise LabelError(str(exc)) from exc
    if max_records is not None:
        records = records[:max_records]
    report = LabelReport(records=len(records), teacher=teacher.name, out=str(out_path))
    keys = []
    for i, record in enumerate(records):
        try:
            first_question(record)
        except LabelError as exc:
            raise LabelError(f"{data_path} record {i}: {exc}") from None
        keys.append(str(record.get("id", i)) if record.get("id") is not None else str(i))
    if len(set(keys)) != len(keys):
        keys = [str(i) for i in range(len(records))]  # ids repeat: the position is the key
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = _read_partials(out_path, teacher.name, records, keys)
    report.resumed = sum(1 for k in keys if k in done)
    base = data_path.parent
    todo = [i for i, r in enumerate(records) if keys[i] not in done and not has_answer(r)]
    # The same question about the same image (a caption image drawn into a mix several times) is
    # asked once; its answer goes to every such record. Groups stay whole within one process.
    groups: dict[tuple[str, str], list[int]] = {}
    for i in todo:
        groups.setdefault((str(records[i]["image"]), first_question(records[i])), []).append(i)
    leaders = list(groups.values())[state.process_index::state.num_processes]
    # Batch equal questions together: a batch decodes until its longest answer ends, and answers to one
    # question have about one length (a count is one token, a caption tens), so mixed batches idle.
    leaders.sort(key=lambda group: first_question(records[group[0]]))
    same_as = {keys[group[0]]: group for group in leaders}
    mine = [group[0] for group in leaders]
    state.wait_for_everyone()  # every process has read the partials before any appends to them
    partial_path = out_path.parent / f"{out_path.name}.partial.{state.process_index}.jsonl"
    bad: Counter[str] = Counter()
    bar = _progress_bar(len(mine), f"labelling with {teacher.name}", progress and state.is_main_process)
    with open(partial_path, "a", encoding="utf-8") as partial:
        for start in range(0, len(mine), batch_size):
            requests, images = [], []
            for i in mine[start:start + batch_size]:
                image = Path(records[i]["image"]).expanduser()
                image = image if image.is_absolute() else base / image
                try:
                    images.append(_load_rgb(image))
                except FileNotFoundError:
                    bad["missing_image"] += 1
                    continue
                except Exception:  # PIL raises many types for undecodable files
                    bad["bad_image"] += 1
                    continue
                requests.append(LabelRequest(keys[i], image, first_question(records[i])))
            answers = teacher.answer_batch(requests, images) if requests else []
            report.asked += len(requests)
            for request, answer in zip(requests, answers, strict=True):
                if not answer.answer.strip():
                    report.empty_answers += 1
                    continue
                for i in same_as[request.key]:
                    labelled = with_teacher_answer(records[i], answer, teacher.name)
                    partial.write(json.dumps({"key": keys[i], "teacher": teacher.name, "record": labelled}) + "\n")
                    report.labelled += 1
            partial.flush()
            bar.update(len(mine[start:start + batch_size]))
            if on_batch is not None:
                on_batch(report.labelled)
    bar.close()
    report.bad_images = dict(bad)
    state.wait_for_everyone()
    if state.is_main_process:
        done = _read_partials(out_path, teacher.name, records, keys)
        merged = []
        relocate = _relocator(data_path.parent, out_path.parent)
        for i, record in enumerate(records):
            if has_answer(record):
                merged.append(relocate(record if "label" in record else {**record, "label": {"source": "given"}}))
                report.given += 1
            elif keys[i] in done:
                merged.append(relocate(done[keys[i]]))
        # counted on the merged records: every process's share, and answers kept from a killed run
        report.truncated_answers = sum(1 for r in merged
                                       if isinstance(r.get("label"), dict) and r["label"].get("truncated"))
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, out_path)
        for partial in out_path.parent.glob(out_path.name + ".partial*.jsonl"):
            partial.unlink()
        missing = len(records) - len(merged)
        if missing:
            log.warning("%s: %d records not labelled (unreadable images: %s; empty answers: %d)", out_path, missing,
                        dict(bad) or "see the other processes' reports", report.empty_answers)
    state.wait_for_everyone()
    report.seconds = time.perf_counter() - started
    return report


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------- local teacher
def left_pad_collate(samples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Batch `prompting.build_inputs` prompts for generation: token rows padded on the left (the
    generated tokens then start at one column for every row), images concatenated in order."""
    import torch

    width = max(int(s["input_ids"].shape[1]) for s in samples)
    out: dict[str, Any] = {}
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        out[key] = torch.cat([torch.nn.functional.pad(s[key], (width - s[key].shape[1], 0), value=value)
                              for s in samples])
    out["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    out["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples])
    return out


class LocalTeacher:
    """A teacher model directory answering batches with Hugging Face `generate` (greedy).

    Why `generate` and not the serving engine: the engines answer one request at a time, and a
    teacher labels tens of thousands of questions; a left-padded batch decodes them together.
    The answers are the engine's (greedy, the same prompt layout, the same stop tokens; tested)."""

    def __init__(self, model_dir: str | os.PathLike[str], device: str = "cpu", dtype: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, name: str | None = None) -> None:
        from vlsi_model.checkpoint import load_model_dir
        from vlsi_model.engine.torch_engine import TorchEngine

        self.model, self.tokenizer, self.image_processor = load_model_dir(model_dir, device=device, dtype=dtype)
        self.name = name or Path(model_dir).expanduser().resolve().name
        self.max_new_tokens = int(max_new_tokens)
        self.stop_ids = sorted(TorchEngine._stop_ids(self.model, self.tokenizer))
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0])

    def answer_batch(self, requests: Sequence[LabelRequest], images: Sequence[np.ndarray]) -> list[TeacherAnswer]:
        import torch

        from vlsi_model.prompting import build_inputs

        samples = [build_inputs(self.tokenizer, self.image_processor, image, r.question, max_question_chars=1 << 30)
                   for r, image in zip(requests, images, strict=True)]
        batch = {k: v.to(self.model.device) for k, v in left_pad_collate(samples, self.pad_id).items()}
        with torch.inference_mode():
            out = self.model.generate(**batch, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                      output_scores=True, return_dict_in_generate=True,
                                      temperature=None, top_p=None, top_k=None)
        prompt_len = batch["input_ids"].shape[1]
        generated = out.sequences[:, prompt_len:].cpu()
        probs = torch.stack([s.float().softmax(-1) for s in out.scores], dim=1).cpu()  # [B, T, V]
        chosen = probs.gather(2, generated[:, : probs.shape[1]].unsqueeze(-1)).squeeze(-1)
        stops = set(self.stop_ids)
        answers = []
        for row in range(generated.shape[0]):
            ids = generated[row].tolist()
            n = next((t for t, tok in enumerate(ids) if tok in stops), len(ids))
            token_probs = chosen[row, : max(n, 1)]
            answers.append(TeacherAnswer(self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
                                         float(token_probs.mean()), n, truncated=n >= self.max_new_tokens))
        return answers


class EngineTeacher:
    """A teacher answering one question at a time through a serving engine (ONNX Runtime,
    TensorRT, torch): the answers the robot's runtime gives, without token probabilities."""

    def __init__(self, model_dir: str | os.PathLike[str], backend: str = "onnxruntime", device: str = "cpu",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, name: str | None = None) -> None:
        from vlsi_model.engine import load_engine

        options = {"device": device} if backend != "onnxruntime" else {}
        self.engine = load_engine(model_dir, backend=backend, max_question_chars=1 << 30, **options)
        self.name = name or Path(model_dir).expanduser().resolve().name
        self.max_new_tokens = int(max_new_tokens)

    def answer_batch(self, requests: Sequence[LabelRequest], images: Sequence[np.ndarray]) -> list[TeacherAnswer]:
        out = []
        for request, image in zip(requests, images, strict=True):
            result = self.engine.answer(image, request.question, max_new_tokens=self.max_new_tokens)
            out.append(TeacherAnswer(result.text, None, result.num_tokens,
                                     truncated=result.num_tokens >= self.max_new_tokens and not result.cancelled))
        return out

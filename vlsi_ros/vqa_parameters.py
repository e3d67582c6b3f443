"""vqa_node's parameters: defaults, descriptions, when a change takes effect, and validation.

Why a table: `ros2 param set` must never be accepted and then silently ignored. Every
parameter says when it applies:

- `live`: applied at once, in any state (request limits, standing/alert questions and rates,
  diagnostics period, annotated frames);
- `configure`: read by `on_configure` (model, backend, cameras, transport, queue, QoS). Set
  while the node is unconfigured it applies at the next configure; while configured it is
  refused with the reason and the transitions that would apply it;
- `startup`: read once when the node is constructed (autostart, the request queue depth of the
  service and action); read-only afterwards.

The same checks (`settings_errors`) run at configure and on every `ros2 param set`, so a value
the node cannot use is refused when it is set, not at the next configure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vlsi_model.image_codec import DEFAULT_MAX_IMAGE_PIXELS
from vlsi_ros.qos import IMAGE_QOS_PRESETS

LIVE, CONFIGURE, STARTUP = "live", "configure", "startup"
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ParameterSpec:
    default: Any
    description: str
    applies: str  # LIVE, CONFIGURE or STARTUP


PARAMETERS: dict[str, ParameterSpec] = {
    "model_path": ParameterSpec("", "Hugging Face-layout model directory; empty: the package's default model",
                                CONFIGURE),
    "backend": ParameterSpec("auto", "inference backend: " + ", ".join(BACKENDS), CONFIGURE),
    "engine_dir": ParameterSpec("", "TensorRT engine / ONNX directory for the tensorrt and onnxruntime backends, "
                                "or the name of a set in trt_engines/", CONFIGURE),
    "device": ParameterSpec("cpu", "torch device for the torch backend", CONFIGURE),
    "num_threads": ParameterSpec(0, "CPU threads of the torch and onnxruntime backends; 0: library default",
                                 CONFIGURE),
    "model_label": ParameterSpec("", "name reported in answers and diagnostics; empty: the model directory name",
                                 LIVE),
    "transport": ParameterSpec("raw", "raw (sensor_msgs/Image on <camera>/image) or compressed "
                                      "(<...>/image/compressed)", CONFIGURE),
    "cameras": ParameterSpec([], "camera names; each subscribes <name>/image. Empty: one camera on `image`",
                             CONFIGURE),
    "default_camera": ParameterSpec("", "camera used when a request names none; empty: the first camera",
                                    CONFIGURE),
    "max_frame_age_s": ParameterSpec(1.0, "frames older than this are refused (0: no limit)", LIVE),
    "max_new_tokens": ParameterSpec(64, "default generation length (64: the longest answer of the default "
                                        "model, 'Where is each object?' about 5 objects, is 50 tokens)", LIVE),
    "max_new_tokens_limit": ParameterSpec(256, "largest max_new_tokens a request may ask for", LIVE),
    "max_question_chars": ParameterSpec(500, "longer questions are refused", LIVE),
    "max_image_pixels": ParameterSpec(DEFAULT_MAX_IMAGE_PIXELS,
                                      "larger images are refused before decoding (compressed: from the "
                                      "header); 0: no limit", LIVE),
    "queue_size": ParameterSpec(4, "requests waiting for the model beyond this are refused at once (the "
                                   "executor has a thread for each)", STARTUP),
    "max_batch": ParameterSpec(1, "up to this many waiting requests about different frames decoded together "
                                  "(torch backend; each answer then waits for every member's vision and "
                                  "prefill: a throughput gain paid in latency); 1: one at a time", STARTUP),
    "request_timeout_s": ParameterSpec(30.0, "a request not answered in this time fails with a timeout", LIVE),
    "standing_questions": ParameterSpec([], "questions answered on every camera at standing_rate_hz, on `answers`",
                                        LIVE),
    "standing_rate_hz": ParameterSpec(0.0, "rate of the standing questions (0: off)", LIVE),
    "alert_questions": ParameterSpec([], "yes/no questions checked at alert_rate_hz; a yes publishes on `alerts`",
                                     LIVE),
    "alert_rate_hz": ParameterSpec(1.0, "rate of the alert checks", LIVE),
    "alert_cooldown_s": ParameterSpec(10.0, "minimum time between two alerts for the same camera and question",
                                      LIVE),
    "publish_annotated": ParameterSpec(False, "publish each answered frame with its question and answer drawn on "
                                              "it on `answers/image` (drawn only while someone subscribes)", LIVE),
    "diagnostics_period_s": ParameterSpec(1.0, "period of /diagnostics", LIVE),
    "image_qos": ParameterSpec("auto", "image subscription QoS: auto (reliable when every publisher of the "
                                       "camera topic is, else best effort), " + ", ".join(IMAGE_QOS_PRESETS),
                               CONFIGURE),
    "image_qos_depth": ParameterSpec(1, "image subscription queue depth (1: newest frame only)", CONFIGURE),
    "service_queue_depth": ParameterSpec(1000, "requests the ask service and ask_stream action hold before the "
                                               "node takes them (a burst beyond it is lost by the middleware)",
                                         STARTUP),
    "autostart": ParameterSpec(True, "configure and activate at start-up", STARTUP),
}


def _finite(name: str, value: Any, minimum: float, strictly: bool = False) -> str | None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > minimum if strictly else
                                                                        value >= minimum)
    bound = f"> {minimum:g}" if strictly else f">= {minimum:g}"
    return None if ok else f"{name} must be a finite number {bound}, got {value!r}"


def _at_least(name: str, value: int, minimum: int) -> str | None:
    return None if value >= minimum else f"{name} must be at least {minimum}, got {value}"


def clean_list(value: Any) -> list[str]:
    """A string-array parameter without blank entries (YAML cannot type an empty list, so
    config files write [""])."""
    return [str(v) for v in (value or []) if str(v).strip()]


def settings_errors(values: dict[str, Any]) -> list[str]:
    """Every problem with a full set of parameter values, each naming the parameter and value.

    All of them, not the first: a change is refused only for problems it brings (`new_errors`),
    so two bad start-up values can be fixed one `ros2 param set` at a time."""
    values = {name: clean_list(v) if isinstance(PARAMETERS[name].default, list) else v
              for name, v in values.items() if name in PARAMETERS}
    errors = []
    if values["backend"] not in BACKENDS:
        errors.append(f"backend must be one of {', '.join(BACKENDS)}, not '{values['backend']}'")
    if values["transport"] not in ("raw", "compressed"):
        errors.append(f"transport must be raw or compressed, not '{values['transport']}'")
    for name in ("queue_size", "max_new_tokens", "max_new_tokens_limit", "max_question_chars", "image_qos_depth",
                 "service_queue_depth", "max_batch"):
        errors.append(_at_least(name, values[name], 1))
    for name in ("num_threads", "max_image_pixels"):
        errors.append(_at_least(name, values[name], 0))
    if values["max_new_tokens"] > values["max_new_tokens_limit"]:
        errors.append(f"max_new_tokens ({values['max_new_tokens']}) is above max_new_tokens_limit "
                      f"({values['max_new_tokens_limit']})")
    for name in ("max_frame_age_s", "standing_rate_hz", "alert_rate_hz", "alert_cooldown_s"):
        errors.append(_finite(name, values[name], 0.0))
    for name in ("request_timeout_s", "diagnostics_period_s"):
        errors.append(_finite(name, values[name], 0.0, strictly=True))
    cameras, default_camera = values["cameras"], values["default_camera"]
    if cameras and default_camera and default_camera not in cameras:
        errors.append(f"default_camera '{default_camera}' is not in cameras")
    if len(set(cameras)) != len(cameras):
        errors.append("camera names must be unique")
    if values["image_qos"] not in ("auto", *IMAGE_QOS_PRESETS):
        errors.append(f"image_qos must be one of auto, {', '.join(IMAGE_QOS_PRESETS)}, not '{values['image_qos']}'")
    return [e for e in errors if e]


def validate_settings(values: dict[str, Any]) -> dict[str, Any]:
    """A full set of parameter values, list parameters cleaned; ValueError naming every problem."""
    errors = settings_errors(values)
    if errors:
        raise ValueError("; ".join(errors))
    return {name: clean_list(v) if isinstance(PARAMETERS[name].default, list) else v for name, v in values.items()}


def new_errors(current: dict[str, Any], candidate: dict[str, Any]) -> list[str]:
    """The problems `candidate` has that `current` does not: what a change would bring."""
    before = set(settings_errors(current))
    return [e for e in settings_errors(candidate) if e not in before]


def change_refusal(name: str, configured: bool) -> str | None:
    """Why setting `name` now would not take effect, or None when it would."""
    spec = PARAMETERS.get(name)
    if spec is None:
        return None
    if spec.applies == STARTUP:
        return f"{name} is read once at start-up; restart the node to change it"
    if spec.applies == CONFIGURE and configured:
        return (f"{name} takes effect at configure: deactivate and clean up the node "
                f"(ros2 lifecycle set <node> cleanup), set it, then configure")
    return None

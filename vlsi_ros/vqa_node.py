"""vqa_node: answers questions about the newest camera frame (lifecycle node).

Thin over vlsi_model: the engine (`load_engine`), the newest-frame store and the single
inference worker with its bounded queue all live in the library; this file maps them onto
ROS: parameters, subscriptions, the `ask` service, the `ask_stream` action, the
`questions` / `answers` / `alerts` topics and `/diagnostics`.

Threads: the executor serves callbacks on several threads (service and action callbacks
are in a reentrant group and block only their own thread while waiting for the worker);
generation runs on the worker thread, so diagnostics keep flowing and new requests are
refused with a clear error while a long answer is being generated.

Lifecycle (ros2/demos lifecycle_py pattern): everything is created in `on_configure` and
destroyed in `on_cleanup`; `on_activate` / `on_deactivate` gate serving and the periodic
questions. With `autostart: true` the node configures and activates itself.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from vlsi_model.answers import normalize_answer
from vlsi_model.engine import load_engine
from vlsi_model.engine.base import EngineError
from vlsi_model.serving import AnswerJob, AnswerWorker, FrameError, FrameStore, QueueFullError
from vlsi_model.serving.worker import JobOutcome
from vlsi_ros.action import Ask as AskAction
from vlsi_ros.image_conversion import compressed_msg_to_rgb, image_msg_to_rgb
from vlsi_ros.msg import Answer
from vlsi_ros.qos import image_qos, overridable
from vlsi_ros.srv import Ask

# name -> (default, description). Read in on_configure, so a cleanup + configure applies changes.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "model_path": ("", "Hugging Face-layout model directory; empty: the package's default model"),
    "backend": ("auto", "inference backend: auto, torch, onnxruntime, tensorrt"),
    "engine_dir": ("", "TensorRT engine / ONNX directory for the tensorrt and onnxruntime backends"),
    "device": ("cpu", "torch device for the torch backend"),
    "num_threads": (0, "CPU threads of the torch and onnxruntime backends; 0: library default"),
    "model_label": ("", "name reported in answers and diagnostics; empty: the model directory name"),
    "transport": ("raw", "raw (sensor_msgs/Image on <camera>/image) or compressed (<...>/image/compressed)"),
    "cameras": ([], "camera names; each subscribes <name>/image. Empty: one camera on `image`"),
    "default_camera": ("", "camera used when a request names none; empty: the first camera"),
    "max_frame_age_s": (1.0, "frames older than this are refused (0: no limit)"),
    "max_new_tokens": (32, "default generation length"),
    "max_new_tokens_limit": (256, "largest max_new_tokens a request may ask for"),
    "max_question_chars": (500, "longer questions are refused"),
    "queue_size": (4, "requests waiting for the model beyond this are refused"),
    "request_timeout_s": (30.0, "a request not answered in this time fails with a timeout"),
    "standing_questions": ([], "questions answered on every camera at standing_rate_hz, on `answers`"),
    "standing_rate_hz": (0.0, "rate of the standing questions (0: off)"),
    "alert_questions": ([], "yes/no questions checked at alert_rate_hz; a yes publishes on `alerts`"),
    "alert_rate_hz": (1.0, "rate of the alert checks"),
    "alert_cooldown_s": (10.0, "minimum time between two alerts for the same camera and question"),
    "diagnostics_period_s": (1.0, "period of /diagnostics"),
    "image_qos": ("sensor_data", "image subscription QoS preset: sensor_data, reliable, best_effort"),
    "image_qos_depth": (1, "image subscription queue depth (1: newest frame only)"),
    "autostart": (True, "configure and activate at start-up"),
}


def stamp_seconds(header: Header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def camera_topic(camera: str, transport: str, single: bool) -> str:
    base = "image" if single else f"{camera}/image"
    return f"{base}/compressed" if transport == "compressed" else base


@dataclass
class Settings:
    """The parameters as read at configure time (typed, validated)."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


class VqaNode(LifecycleNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("vqa_node", **kwargs)
        for name, (default, description) in PARAMETERS.items():
            if isinstance(default, list):
                # rclpy types an empty list as a byte array; [""] keeps it a string array
                # (blanks are dropped when read, as in the YAML).
                self.declare_parameter(name, default or [""], ParameterDescriptor(
                    type=ParameterType.PARAMETER_STRING_ARRAY, description=description))
            else:
                self.declare_parameter(name, default, ParameterDescriptor(description=description))
        self._serving_group = ReentrantCallbackGroup()
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self._active = False
        self._entities: dict[str, Any] = {}
        self._engine = None
        self._worker: AnswerWorker | None = None
        self._frames: FrameStore | None = None
        self._settings = Settings()
        self._model_label = ""
        self._model_note = ""
        self._pending_periodic: set[tuple[str, str]] = set()
        self._last_alert: dict[tuple[str, str], float] = {}
        self._periodic_lock = threading.Lock()
        self._rejections = 0
        autostart = self.get_parameter("autostart").value
        if autostart and self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    # ----------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._settings = self._read_settings()
        except ValueError as exc:
            self.get_logger().error(f"invalid parameters: {exc}")
            return TransitionCallbackReturn.FAILURE
        s = self._settings
        # Pass each option only to backends that take it (load_engine refuses the others, so
        # a parameter is never silently ignored); "auto" takes them all and uses what applies.
        options = {"device": s.device, "max_question_chars": s.max_question_chars}
        if s.engine_dir and s.backend in ("onnxruntime", "tensorrt", "auto"):
            options["engine_dir"] = s.engine_dir
        if s.num_threads > 0 and s.backend in ("torch", "onnxruntime", "auto"):
            options["num_threads"] = s.num_threads
        try:
            self._engine = load_engine(s.model_path or None, backend=s.backend, **options)
        except (EngineError, ValueError, OSError) as exc:
            self.get_logger().error(f"could not load the model: {exc}")
            return TransitionCallbackReturn.FAILURE
        warmup = getattr(self._engine, "warmup", None)
        if warmup is not None:
            warmup()  # the first answer in a process is ~2x slower; pay it before serving
        self._model_label = s.model_label or getattr(self._engine, "model_name", "model")
        placeholder = bool(getattr(self._engine, "is_placeholder", False))
        self._model_note = "placeholder: untrained tiny model, answers are meaningless" if placeholder else ""
        self._worker = AnswerWorker(self._engine, capacity=s.queue_size)
        cameras = list(s.cameras) or [s.default_camera or "default"]
        convert = compressed_msg_to_rgb if s.transport == "compressed" else image_msg_to_rgb
        self._frames = FrameStore(cameras, convert, clock=self._now_s)
        self._create_entities(cameras)
        self.get_logger().info(
            f"configured: model {self._model_label} ({self._engine.backend})"
            f"{' [' + self._model_note + ']' if self._model_note else ''}; cameras "
            + ", ".join(f"{c} <- {self._entities['subs'][c].topic_name}" for c in cameras))
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        s = self._settings
        if s.standing_rate_hz > 0 and s.standing_questions:
            self._entities["standing_timer"] = self.create_timer(
                1.0 / s.standing_rate_hz, self._ask_standing, callback_group=self._timer_group)
        if s.alert_rate_hz > 0 and s.alert_questions:
            self._entities["alert_timer"] = self.create_timer(
                1.0 / s.alert_rate_hz, self._ask_alerts, callback_group=self._timer_group)
        self.get_logger().info("active")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        for key in ("standing_timer", "alert_timer"):
            timer = self._entities.pop(key, None)
            if timer is not None:
                self.destroy_timer(timer)
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self.release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self.release()
        return TransitionCallbackReturn.SUCCESS

    # ----------------------------------------------------------------- set-up
    def _read_settings(self) -> Settings:
        values = {name: self.get_parameter(name).value for name in PARAMETERS}
        for name, (default, _) in PARAMETERS.items():
            if isinstance(default, list):
                # YAML cannot type an empty list, so config files write [""]: drop blanks.
                values[name] = [str(v) for v in (values[name] or []) if str(v).strip()]
        if values["transport"] not in ("raw", "compressed"):
            raise ValueError(f"transport must be raw or compressed, not '{values['transport']}'")
        if values["queue_size"] < 1:
            raise ValueError("queue_size must be at least 1")
        if values["max_new_tokens"] < 1:
            raise ValueError("max_new_tokens must be at least 1")
        default_camera = values["default_camera"]
        if values["cameras"] and default_camera and default_camera not in values["cameras"]:
            raise ValueError(f"default_camera '{values['default_camera']}' is not in cameras")
        if len(set(values["cameras"])) != len(values["cameras"]):
            raise ValueError("camera names must be unique")
        image_qos(values["image_qos"], values["image_qos_depth"])  # validates the preset
        return Settings(values)

    def _create_entities(self, cameras: list[str]) -> None:
        s = self._settings
        single = not s.cameras
        msg_type = CompressedImage if s.transport == "compressed" else Image
        qos = image_qos(s.image_qos, s.image_qos_depth)
        subs = {}
        for camera in cameras:
            subs[camera] = self.create_subscription(
                msg_type, camera_topic(camera, s.transport, single),
                lambda msg, camera=camera: self._on_frame(camera, msg), qos,
                callback_group=self._camera_group, qos_overriding_options=overridable())
        self._entities["subs"] = subs
        self._entities["answers_pub"] = self.create_lifecycle_publisher(Answer, "answers", 10)
        self._entities["alerts_pub"] = self.create_lifecycle_publisher(Answer, "alerts", 10)
        # Diagnostics flow in every configured state, active or not.
        self._entities["diag_pub"] = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._entities["questions_sub"] = self.create_subscription(
            String, "questions", self._on_question, 10, callback_group=self._serving_group)
        self._entities["ask_srv"] = self.create_service(
            Ask, "ask", self._on_ask, callback_group=self._serving_group)
        self._entities["action"] = ActionServer(
            self, AskAction, "ask_stream", execute_callback=self._execute_stream,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal_handle: CancelResponse.ACCEPT,
            callback_group=self._serving_group)
        self._entities["diag_timer"] = self.create_timer(
            s.diagnostics_period_s, self._publish_diagnostics, callback_group=self._timer_group)

    def release(self) -> None:
        """Destroy every entity created in on_configure, stop the worker, free the model."""
        self._active = False
        entities, self._entities = self._entities, {}
        for timer_key in ("standing_timer", "alert_timer", "diag_timer"):
            if timer_key in entities:
                self.destroy_timer(entities.pop(timer_key))
        for sub in entities.pop("subs", {}).values():
            self.destroy_subscription(sub)
        if "questions_sub" in entities:
            self.destroy_subscription(entities.pop("questions_sub"))
        if "ask_srv" in entities:
            self.destroy_service(entities.pop("ask_srv"))
        if "action" in entities:
            entities.pop("action").destroy()
        for key in ("answers_pub", "alerts_pub"):
            if key in entities:
                self.destroy_lifecycle_publisher(entities.pop(key))
        if "diag_pub" in entities:
            self.destroy_publisher(entities.pop("diag_pub"))
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._frames = None
        with self._periodic_lock:
            self._pending_periodic.clear()
            self._last_alert.clear()

    # ----------------------------------------------------------------- inputs
    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_frame(self, camera: str, msg: Image | CompressedImage) -> None:
        frames = self._frames
        if frames is not None:
            frames.put(camera, msg, stamp_seconds(msg.header), msg.header.frame_id, msg.header)

    def _validate_question(self, question: str) -> str:
        question = question.strip()
        if not question:
            raise EngineError("question is empty")
        limit = self._settings.max_question_chars
        if len(question) > limit:
            raise EngineError(
                f"question is too long ({len(question)} characters, max_question_chars {limit})")
        return question

    def _resolve_tokens(self, requested: int) -> int:
        if requested == 0:
            return self._settings.max_new_tokens
        return min(int(requested), self._settings.max_new_tokens_limit)

    def _camera_job(self, question: str, camera: str, max_new_tokens: int, max_age_s: float,
                    on_token=None) -> AnswerJob:
        """A job that answers about the newest frame of `camera` at the time it runs."""
        frames = self._frames
        if frames is None or not self._active:
            raise EngineError(f"vqa_node is not active (state: {self._state_label()})")
        camera = camera or self._settings.default_camera or frames.cameras[0]
        frames.check_camera(camera)

        def resolve() -> tuple[Any, Any]:
            frame, rgb = frames.take(camera, max_age_s)
            return rgb, (camera, frame.header, frame.age_s(self._now_s()))

        return AnswerJob(question=self._validate_question(question), resolve_image=resolve,
                         max_new_tokens=self._resolve_tokens(max_new_tokens), on_token=on_token)

    def _submit(self, job: AnswerJob, background: bool = False):
        worker = self._worker
        if worker is None:
            raise EngineError(f"vqa_node is not active (state: {self._state_label()})")
        return worker.submit(job, background=background)

    def _wait(self, job: AnswerJob, timeout_s: float, cancelled=lambda: False) -> JobOutcome:
        """Block this executor thread until the worker finishes `job`, or cancel it."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                job.cancel.set()
                raise TimeoutError(f"timed out after {timeout_s:g} s (request_timeout_s)")
            if cancelled():
                job.cancel.set()
            try:
                return job.future.result(timeout=min(0.05, remaining))
            except TimeoutError:
                continue

    def _state_label(self) -> str:
        if self._active:
            return "active"
        return "inactive" if self._frames is not None else "unconfigured"

    # ----------------------------------------------------------------- service
    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        try:
            if request.image.width > 0 or len(request.image.data) > 0:
                job = self._image_job(request)
            else:
                max_age = request.max_frame_age_s or self._settings.max_frame_age_s
                job = self._camera_job(request.question, request.camera, request.max_new_tokens, max_age)
            self._submit(job)
            outcome = self._wait(job, self._settings.request_timeout_s)
        except (EngineError, FrameError, QueueFullError, TimeoutError, RuntimeError, ValueError) as exc:
            response.success = False
            response.error = str(exc)
            self.get_logger().warn(f"ask refused: {exc}")
            return response
        result = outcome.result
        _, header, age_s = outcome.source
        response.success = True
        response.frame_age_s = float(age_s)
        response.answer = result.text
        response.image_header = header
        response.vision_ms = float(result.vision_ms)
        response.prefill_ms = float(result.prefill_ms)
        response.decode_ms = float(result.decode_ms)
        response.num_tokens = result.num_tokens
        response.engine_ms = float(result.total_ms)
        response.queue_ms = float(outcome.queued_ms)
        return response

    def _image_job(self, request: Ask.Request) -> AnswerJob:
        """A job about the image carried in the request (no camera involved)."""
        if not self._active:
            raise EngineError(f"vqa_node is not active (state: {self._state_label()})")
        try:
            rgb = image_msg_to_rgb(request.image)
        except ValueError as exc:
            raise EngineError(f"request image could not be decoded: {exc}") from exc
        source = (request.camera or "request", request.image.header, 0.0)
        return AnswerJob(question=self._validate_question(request.question),
                         resolve_image=lambda: (rgb, source),
                         max_new_tokens=self._resolve_tokens(request.max_new_tokens))

    # ----------------------------------------------------------------- action
    def _execute_stream(self, goal_handle) -> AskAction.Result:
        goal = goal_handle.request
        result = AskAction.Result()
        started = time.perf_counter()

        def on_token(text: str, num_tokens: int) -> bool:
            feedback = AskAction.Feedback(partial_answer=text, num_tokens=num_tokens)
            goal_handle.publish_feedback(feedback)
            return not goal_handle.is_cancel_requested

        try:
            job = self._camera_job(goal.question, goal.camera, goal.max_new_tokens,
                                   self._settings.max_frame_age_s, on_token=on_token)
            self._submit(job)
            outcome = self._wait(job, self._settings.request_timeout_s,
                                 cancelled=lambda: goal_handle.is_cancel_requested)
        except (EngineError, FrameError, QueueFullError, TimeoutError, RuntimeError, ValueError) as exc:
            result.success = False
            result.error = str(exc)
            result.total_ms = 1000.0 * (time.perf_counter() - started)
            if goal_handle.is_cancel_requested:
                goal_handle.canceled()
            else:
                goal_handle.abort()
            return result
        _, header, _ = outcome.source
        result.image_header = header
        result.answer = outcome.result.text
        result.total_ms = 1000.0 * (time.perf_counter() - started)
        if outcome.result.cancelled or goal_handle.is_cancel_requested:
            result.success = False
            result.error = "cancelled"
            goal_handle.canceled()
        else:
            result.success = True
            goal_handle.succeed()
        return result

    # ----------------------------------------------------------------- topics
    def _on_question(self, msg: String) -> None:
        self._ask_for_topic(msg.data, camera="", publisher_key="answers_pub", periodic=False)

    def _ask_standing(self) -> None:
        for camera in self._frames.cameras if self._frames else []:
            for question in self._settings.standing_questions:
                self._ask_for_topic(question, camera, "answers_pub", periodic=True)

    def _ask_alerts(self) -> None:
        for camera in self._frames.cameras if self._frames else []:
            for question in self._settings.alert_questions:
                key = (camera, question)
                last = self._last_alert.get(key)
                if last is not None and time.monotonic() - last < self._settings.alert_cooldown_s:
                    continue
                self._ask_for_topic(question, camera, "alerts_pub", periodic=True, alert=True)

    def _ask_for_topic(self, question: str, camera: str, publisher_key: str, periodic: bool,
                       alert: bool = False) -> None:
        """Queue a question whose answer is published on a topic; rejections are logged."""
        key = (camera, question)
        with self._periodic_lock:
            if periodic and key in self._pending_periodic:
                return  # the previous round for this question is still waiting
        try:
            job = self._camera_job(question, camera, 0, self._settings.max_frame_age_s)
            future = self._submit(job, background=periodic)
        except (EngineError, FrameError, QueueFullError) as exc:
            self._rejections += 1
            self.get_logger().warn(f"question '{question[:60]}' rejected: {exc}", throttle_duration_sec=5.0)
            return
        if periodic:
            with self._periodic_lock:
                self._pending_periodic.add(key)
        started = time.perf_counter()

        def done(fut) -> None:
            if periodic:
                with self._periodic_lock:
                    self._pending_periodic.discard(key)
            try:
                outcome: JobOutcome = fut.result()
            except Exception as exc:  # reported, never raised into the worker
                self.get_logger().warn(f"question '{question[:60]}' failed: {exc}", throttle_duration_sec=5.0)
                return
            if alert and normalize_answer(outcome.result.text) != "yes":
                return
            if alert:
                self._last_alert[key] = time.monotonic()
            self._publish_answer(publisher_key, job.question, outcome, started)

        future.add_done_callback(done)

    def _publish_answer(self, publisher_key: str, question: str, outcome: JobOutcome, started: float) -> None:
        publisher = self._entities.get(publisher_key)
        if publisher is None:
            return
        camera, header, _ = outcome.source
        r = outcome.result
        publisher.publish(Answer(
            header=header, camera=camera, question=question, answer=r.text,
            vision_ms=float(r.vision_ms), prefill_ms=float(r.prefill_ms), decode_ms=float(r.decode_ms),
            total_ms=1000.0 * (time.perf_counter() - started), num_tokens=r.num_tokens,
            model=self._model_label))

    # ----------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        publisher = self._entities.get("diag_pub")
        worker, frames = self._worker, self._frames
        if publisher is None or worker is None or frames is None:
            return
        stats = worker.stats()
        ages = frames.ages()
        values = {
            "model": self._model_label,
            "backend": self._engine.backend if self._engine else "",
            "state": self._state_label(),
            "queue_depth": str(worker.depth),
            "queue_capacity": str(worker.capacity),
            "background_queue_depth": str(worker.background_depth),
            "latency_p50_ms": f"{stats['latency_p50_ms']:.1f}",
            "latency_p95_ms": f"{stats['latency_p95_ms']:.1f}",
            "tokens_per_s": f"{stats['tokens_per_s']:.1f}",
            "answered": str(int(stats["succeeded"])),
            "failed": str(int(stats["failed"])),
            "rejected_topic_questions": str(self._rejections),
        }
        if self._model_note:
            values["note"] = self._model_note
        for camera, age in ages.items():
            values[f"frame_age_s.{camera}"] = "none" if age is None else f"{age:.3f}"
        stale = [c for c, a in ages.items() if a is None or a > self._settings.max_frame_age_s > 0]
        if not worker.alive:
            level, message = DiagnosticStatus.ERROR, "inference worker stopped"
        elif stale and self._active:
            level, message = DiagnosticStatus.WARN, "no recent frame on: " + ", ".join(stale)
        elif worker.depth >= worker.capacity:
            level, message = DiagnosticStatus.WARN, "request queue full"
        else:
            level, message = DiagnosticStatus.OK, self._state_label()
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: vqa", message=message,
                                  hardware_id=self._model_label,
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        publisher.publish(array)


def executor_threads(node: VqaNode) -> int:
    """Enough threads that every queued request can wait while diagnostics and frames flow."""
    return int(node.get_parameter("queue_size").value) + 4


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    node = VqaNode()
    executor = MultiThreadedExecutor(num_threads=executor_threads(node))
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.release()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


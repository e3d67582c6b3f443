"""vqa_node: answers questions about the newest camera frame (lifecycle node).

Why one file of ~680 lines: a ROS node's whole surface (parameters, lifecycle transitions,
service, action, topics, QoS) is one contract users read in one place; the work is in vlsi_model.

Thin over vlsi_model: the engine (`load_engine`), the newest-frame store, the single
inference worker with its bounded queue and the frame annotation all live in the library;
this file maps them onto ROS: parameters, subscriptions, the `ask` service, the
`ask_stream` action, the `questions` / `answers` / `alerts` topics and `/diagnostics`.

What lives when (ros2/demos lifecycle_py, adapted so that every request gets a reply):
- for the node's whole life: the `ask` service, the `ask_stream` action, the `questions`
  subscription, the publishers and the diagnostics timer. Unconfigured or inactive, they
  answer with a refusal that says the state and why the last configure failed; and since they
  are never destroyed, a transition can never pull a service out from under a request in
  flight (the crash `InvalidHandle: cannot use Destroyable` of an earlier design);
- from `on_configure` to `on_cleanup`: the model, the inference worker, the frame store and
  the camera subscriptions. Cleanup stops the worker first: queued requests are refused, the
  running one is cancelled and answered with that reason;
- from `on_activate` to `on_deactivate`: serving, and the standing-question and alert timers.

Threads: the executor serves callbacks on several threads (service and action callbacks are in
a reentrant group and block only their own thread while waiting for the worker; at most
queue_size + max_batch of them wait, every other request is refused at once). Generation runs on the
worker thread, so diagnostics keep flowing while a long answer is being generated.

Parameters: see `vqa_parameters`; live ones apply at once, configure-time ones are refused
while configured (with the reason), start-up ones are read-only.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from vlsi_model.answers import normalize_answer
from vlsi_model.engine import load_engine
from vlsi_model.errors import EngineError
from vlsi_model.serving import AnswerJob, AnswerWorker, FrameError, FrameStore, JobCancelledError, QueueFullError
from vlsi_model.serving.annotate import annotate_answer
from vlsi_model.serving.frames import check_max_age
from vlsi_model.serving.worker import JobOutcome
from vlsi_ros.action import Ask as AskAction
from vlsi_ros.image_conversion import compressed_msg_to_rgb, image_msg_to_rgb, rgb_to_image_msg
from vlsi_ros.msg import Answer
from vlsi_ros.qos import AUTO, image_qos, overridable, preset_matching_publishers, request_qos
from vlsi_ros.srv import Ask
from vlsi_ros.vqa_parameters import PARAMETERS, STARTUP, change_refusal, clean_list, new_errors, validate_settings

__all__ = ["PARAMETERS", "VqaNode", "executor_threads", "main"]

# Everything a request can be refused with; each becomes a reply with `error` set.
REFUSALS = (EngineError, FrameError, QueueFullError, JobCancelledError, TimeoutError, ValueError)
# How long a finished goal's result stays available (rclpy's default is 10 s). AskClient resends
# a goal whose acceptance was lost after 10 s and then asks for its result by goal id: the goal
# must still be known then, or the copy would run it again (ask_client.RESEND_FIRST_AFTER_S).
ACTION_RESULT_KEEP_S = 120
STAMP_AHEAD_WARN_S = 0.5  # frames stamped further ahead of their arrival than this: clock skew


def stamp_seconds(header: Header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def camera_topic(camera: str, transport: str, single: bool) -> str:
    base = "image" if single else f"{camera}/image"
    return f"{base}/compressed" if transport == "compressed" else base


def has_image(image: Image) -> bool:
    """A request carries its own image when any of it is filled in."""
    return image.width > 0 or image.height > 0 or len(image.data) > 0


@dataclass(frozen=True)
class AnsweredFrame:
    """What a job answered about: camera, the frame's header, its age and its pixels."""

    camera: str
    header: Header
    age_s: float
    rgb: np.ndarray


class VqaNode(LifecycleNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__("vqa_node", **kwargs)
        for name, spec in PARAMETERS.items():
            read_only = spec.applies == STARTUP
            if isinstance(spec.default, list):
                # rclpy types an empty list as a byte array; [""] keeps it a string array
                # (blanks are dropped when read, as in the YAML).
                self.declare_parameter(name, spec.default or [""], ParameterDescriptor(
                    type=ParameterType.PARAMETER_STRING_ARRAY, description=spec.description, read_only=read_only))
            else:
                self.declare_parameter(name, spec.default, ParameterDescriptor(
                    description=spec.description, read_only=read_only))
        self._values: dict[str, Any] = {}
        for name in PARAMETERS:
            self._store(name, self.get_parameter(name).value)
        self._serving_group = ReentrantCallbackGroup()
        self._camera_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()
        self._lock = threading.RLock()  # configured resources and timers
        self._active = False
        self._engine = None
        self._worker: AnswerWorker | None = None
        self._frames: FrameStore | None = None
        self._camera_subs: dict[str, Any] = {}
        self._camera_presets: dict[str, str] = {}
        self._named_timers: dict[str, Any] = {}
        self._model_label = ""
        self._model_note = ""
        self._configure_error = ""
        self._pending_periodic: set[tuple[str, str]] = set()
        self._last_alert: dict[tuple[str, str], float] = {}
        self._periodic_lock = threading.Lock()
        self._rejections = 0
        self._create_interfaces()
        self.add_on_set_parameters_callback(self._check_parameter_change)
        self.add_post_set_parameters_callback(self._apply_parameter_change)
        if self._values["autostart"] and self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def _store(self, name: str, value: Any) -> None:
        """Keep a parameter's current value (string arrays without the blanks YAML needs for [])."""
        self._values[name] = clean_list(value) if isinstance(PARAMETERS[name].default, list) else value

    def _create_interfaces(self) -> None:
        """The node-lifetime interfaces: they answer in every state and are never destroyed."""
        qos = request_qos(int(self._values["service_queue_depth"]))
        self._answers_pub = self.create_lifecycle_publisher(Answer, "answers", 10)
        self._alerts_pub = self.create_lifecycle_publisher(Answer, "alerts", 10)
        self._annotated_pub = self.create_lifecycle_publisher(Image, "answers/image", 2)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._questions_sub = self.create_subscription(
            String, "questions", self._on_question, 10, callback_group=self._serving_group)
        self._ask_srv = self.create_service(Ask, "ask", self._on_ask, qos_profile=qos,
                                            callback_group=self._serving_group)
        self._action = ActionServer(
            self, AskAction, "ask_stream", execute_callback=self._execute_stream,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=lambda goal_handle: CancelResponse.ACCEPT,
            callback_group=self._serving_group, goal_service_qos_profile=qos,
            result_service_qos_profile=qos, cancel_service_qos_profile=qos, result_timeout=ACTION_RESULT_KEEP_S)
        period = self._values["diagnostics_period_s"]
        if not (isinstance(period, (int, float)) and 0 < period < float("inf")):
            period = PARAMETERS["diagnostics_period_s"].default  # invalid: configure will say so
        self._restart_timer("diagnostics", float(period), self._publish_diagnostics)

    # ----------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            try:
                self._configure()
            except Exception as exc:  # any failure leaves the node unconfigured, up and saying why
                self._configure_error = str(exc)
                self.get_logger().error(f"configure failed: {exc}")
                self._release_configured()
                return TransitionCallbackReturn.FAILURE
            self._configure_error = ""
        return super().on_configure(state)

    def _configure(self) -> None:
        try:
            s = validate_settings(self._values)
        except ValueError as exc:
            raise ValueError(f"invalid parameters: {exc}") from exc
        # Pass each option only to backends that take it (load_engine refuses the others, so
        # a parameter is never silently ignored); "auto" takes them all and uses what applies.
        options = {"device": s["device"], "max_question_chars": s["max_question_chars"]}
        if s["engine_dir"] and s["backend"] in ("onnxruntime", "tensorrt", "auto"):
            options["engine_dir"] = s["engine_dir"]
        if s["num_threads"] > 0 and s["backend"] in ("torch", "onnxruntime", "auto"):
            options["num_threads"] = s["num_threads"]
        try:
            self._engine = load_engine(s["model_path"] or None, backend=s["backend"], **options)
        except (EngineError, ValueError, OSError) as exc:
            raise EngineError(f"could not load the model: {exc}") from exc
        warmup = getattr(self._engine, "warmup", None)
        if warmup is not None:
            warmup()  # the first answer in a process is ~2x slower; pay it before serving
        placeholder = bool(getattr(self._engine, "is_placeholder", False))
        self._model_note = "placeholder: untrained tiny model, answers are meaningless" if placeholder else ""
        self._set_model_label()
        self._worker = AnswerWorker(self._engine, capacity=s["queue_size"], max_batch=s["max_batch"])
        cameras = list(s["cameras"]) or [s["default_camera"] or "default"]
        self._frames = FrameStore(cameras, self._decoder(s["transport"]), clock=self._now_s)
        for camera in cameras:
            self._subscribe_camera(camera, self._wanted_preset(camera))
        if s["image_qos"] == AUTO:  # follow the camera publishers as they come and go
            self._restart_timer("qos_watch", 1.0, self._match_publishers_qos, group=self._camera_group)
        self.get_logger().info(
            f"configured: model {self._model_label} ({self._engine.backend})"
            f"{' [' + self._model_note + ']' if self._model_note else ''}; cameras "
            + ", ".join(f"{c} <- {self._camera_subs[c].topic_name} ({self._camera_presets[c]})" for c in cameras))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._active = True
            self._sync_periodic_timers()
        self.get_logger().info("active")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._active = False  # requests in flight finish; new ones are refused
            self._sync_periodic_timers()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def release(self) -> None:
        """Free what on_configure made: timers, camera subscriptions, the worker (queued requests
        refused, the running one cancelled), the model. The serving interfaces stay."""
        with self._lock:
            self._release_configured()

    def _release_configured(self) -> None:
        self._active = False
        for name in ("standing", "alerts", "qos_watch"):
            self._stop_timer(name)
        for sub in self._camera_subs.values():
            self.destroy_subscription(sub)
        self._camera_subs.clear()
        self._camera_presets.clear()
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

    def destroy_node(self) -> None:
        self.release()
        self._stop_timer("diagnostics")
        self._action.destroy()
        super().destroy_node()

    # ----------------------------------------------------------------- timers
    def _restart_timer(self, name: str, period_s: float, callback, group=None) -> None:
        with self._lock:
            self._stop_timer(name)
            self._named_timers[name] = self.create_timer(period_s, callback, callback_group=group or self._timer_group)

    def _stop_timer(self, name: str) -> None:
        with self._lock:
            timer = self._named_timers.pop(name, None)
            if timer is not None:
                self.destroy_timer(timer)

    def _sync_periodic_timers(self) -> None:
        """Standing-question and alert timers exist exactly while active with a rate and questions."""
        for name, questions, rate, callback in (
                ("standing", "standing_questions", "standing_rate_hz", self._ask_standing),
                ("alerts", "alert_questions", "alert_rate_hz", self._ask_alerts)):
            if self._active and self._values[rate] > 0 and self._values[questions]:
                self._restart_timer(name, 1.0 / self._values[rate], callback)
            else:
                self._stop_timer(name)

    # ----------------------------------------------------------------- parameters
    def _check_parameter_change(self, params: list[Parameter]) -> SetParametersResult:
        """Refuse what would not take effect (with the reason) and values the node cannot use."""
        configured = self._frames is not None
        candidate = dict(self._values)
        for param in params:
            if param.name not in PARAMETERS:
                continue
            reason = change_refusal(param.name, configured)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
            candidate[param.name] = param.value
        errors = new_errors(self._values, candidate)
        if errors:
            return SetParametersResult(successful=False, reason="; ".join(errors))
        return SetParametersResult(successful=True)

    def _apply_parameter_change(self, params: list[Parameter]) -> None:
        names = {p.name for p in params if p.name in PARAMETERS}
        for param in params:
            if param.name in names:
                self._store(param.name, param.value)
        if names & {"standing_questions", "standing_rate_hz", "alert_questions", "alert_rate_hz"}:
            with self._lock:
                self._sync_periodic_timers()
        if "diagnostics_period_s" in names:
            self._restart_timer("diagnostics", float(self._values["diagnostics_period_s"]),
                                self._publish_diagnostics)
        if "model_label" in names:
            self._set_model_label()
        if names:
            self.get_logger().info("applied " + ", ".join(f"{n} = {self._values[n]!r}" for n in sorted(names)))

    def _set_model_label(self) -> None:
        engine = self._engine
        self._model_label = self._values["model_label"] or (getattr(engine, "model_name", "model") if engine else "")

    # ----------------------------------------------------------------- cameras
    def _decoder(self, transport: str):
        """Frame decoder with the live pixel bound (read when a frame is used, not stored)."""
        if transport == "compressed":
            return lambda msg: compressed_msg_to_rgb(msg, max_pixels=int(self._values["max_image_pixels"]))
        return lambda msg: image_msg_to_rgb(msg, max_pixels=int(self._values["max_image_pixels"]))

    def _camera_topic(self, camera: str) -> str:
        return camera_topic(camera, self._values["transport"], single=not self._values["cameras"])

    def _wanted_preset(self, camera: str) -> str:
        preset = self._values["image_qos"]
        if preset != AUTO:
            return preset
        topic = self.resolve_topic_name(self._camera_topic(camera))
        return preset_matching_publishers(info.qos_profile.reliability
                                          for info in self.get_publishers_info_by_topic(topic))

    def _subscribe_camera(self, camera: str, preset: str) -> None:
        msg_type = CompressedImage if self._values["transport"] == "compressed" else Image
        old = self._camera_subs.pop(camera, None)
        if old is not None:
            self.destroy_subscription(old)
        self._camera_subs[camera] = self.create_subscription(
            msg_type, self._camera_topic(camera), lambda msg, camera=camera: self._on_frame(camera, msg),
            image_qos(preset, int(self._values["image_qos_depth"])), callback_group=self._camera_group,
            qos_overriding_options=overridable())
        self._camera_presets[camera] = preset

    def _match_publishers_qos(self) -> None:
        """image_qos auto: remake a camera's subscription when its publishers' reliability changes.

        Runs in the camera callback group, so never while a frame callback is running."""
        with self._lock:
            for camera in list(self._camera_subs):
                preset = self._wanted_preset(camera)
                if preset != self._camera_presets.get(camera):
                    self._subscribe_camera(camera, preset)
                    self.get_logger().info(f"camera {camera}: publishers changed, image QoS now {preset}")

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_frame(self, camera: str, msg: Image | CompressedImage) -> None:
        frames = self._frames
        if frames is not None:
            frames.put(camera, msg, stamp_seconds(msg.header), msg.header.frame_id, msg.header)

    # ----------------------------------------------------------------- requests
    def _state_label(self) -> str:
        if self._active:
            return "active"
        if self._frames is not None:
            return "inactive"
        if self._configure_error:
            return f"unconfigured; the last configure failed: {self._configure_error}"
        return "unconfigured"

    def _validate_question(self, question: str) -> str:
        question = question.strip()
        if not question:
            raise EngineError("question is empty")
        limit = self._values["max_question_chars"]
        if len(question) > limit:
            raise EngineError(
                f"question is too long ({len(question)} characters, max_question_chars {limit})")
        return question

    def _resolve_tokens(self, requested: int) -> int:
        if requested == 0:
            return int(self._values["max_new_tokens"])
        return min(int(requested), int(self._values["max_new_tokens_limit"]))

    def _resolve_max_age(self, requested: float) -> float:
        """A request's frame-age limit: 0 means the node's; NaN, negative or infinite is refused."""
        requested = check_max_age(float(requested))
        return requested if requested > 0 else float(self._values["max_frame_age_s"])

    def _job(self, question: str, camera: str, image: Image | None, max_new_tokens: int, max_age_s: float,
             on_token=None) -> AnswerJob:
        """A job about `image` when the request carries one, else about the newest frame of
        `camera` at the time the job runs. Raises one of REFUSALS with a user-facing reason."""
        frames = self._frames
        if frames is None or not self._active:
            raise EngineError(f"vqa_node is not active (state: {self._state_label()})")
        question = self._validate_question(question)
        tokens = self._resolve_tokens(max_new_tokens)
        if image is not None and has_image(image):
            try:
                rgb = image_msg_to_rgb(image, max_pixels=int(self._values["max_image_pixels"]))
            except ValueError as exc:
                raise EngineError(f"request image could not be decoded: {exc}") from exc
            answered = AnsweredFrame(camera or "request", image.header, 0.0, rgb)
            return AnswerJob(question=question, resolve_image=lambda: (rgb, answered), max_new_tokens=tokens,
                             on_token=on_token)
        max_age = self._resolve_max_age(max_age_s)
        camera = camera or self._values["default_camera"] or frames.cameras[0]
        frames.check_camera(camera)

        def resolve() -> tuple[np.ndarray, AnsweredFrame]:
            frame, rgb = frames.take(camera, max_age)
            return rgb, AnsweredFrame(camera, frame.header, frame.age_s(self._now_s()), rgb)

        # Waiting jobs about the same camera under the same age limit resolve to the same frame:
        # the worker answers them together (one image encoding; see AnswerWorker).
        return AnswerJob(question=question, resolve_image=resolve, max_new_tokens=tokens, on_token=on_token,
                         frame_key=(camera, max_age))

    def _run(self, job: AnswerJob, cancelled=lambda: False) -> JobOutcome:
        """Queue `job` and block this executor thread until the worker finishes it (or cancel it)."""
        worker = self._worker
        if worker is None:
            raise EngineError(f"vqa_node is not active (state: {self._state_label()})")
        worker.submit(job)
        timeout_s = float(self._values["request_timeout_s"])
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

    @staticmethod
    def _fill_reply(reply, outcome: JobOutcome) -> None:
        """The answer and its timing breakdown, into an Ask response or an action result."""
        result, frame = outcome.result, outcome.source
        reply.answer = result.text
        reply.image_header = frame.header
        reply.frame_age_s = float(frame.age_s)
        reply.vision_ms = float(result.vision_ms)
        reply.prefill_ms = float(result.prefill_ms)
        reply.decode_ms = float(result.decode_ms)
        reply.num_tokens = result.num_tokens
        reply.engine_ms = float(result.total_ms)
        reply.queue_ms = float(outcome.queued_ms)

    # ----------------------------------------------------------------- service
    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        try:
            job = self._job(request.question, request.camera, request.image, request.max_new_tokens,
                            request.max_frame_age_s)
            outcome = self._run(job)
            if outcome.result.cancelled:
                raise JobCancelledError("cancelled before the answer was complete: the node was cleaned up "
                                        "or shut down")
        except REFUSALS as exc:
            response.success = False
            response.error = str(exc)
            self.get_logger().warning(f"ask refused: {exc}", throttle_duration_sec=1.0)
            return response
        response.success = True
        self._fill_reply(response, outcome)
        self._publish_annotated(job.question, outcome)
        return response

    # ----------------------------------------------------------------- action
    def _execute_stream(self, goal_handle) -> AskAction.Result:
        goal = goal_handle.request
        result = AskAction.Result()
        started = time.perf_counter()

        def on_token(text: str, num_tokens: int) -> bool:
            goal_handle.publish_feedback(AskAction.Feedback(partial_answer=text, num_tokens=num_tokens))
            return not goal_handle.is_cancel_requested

        try:
            job = self._job(goal.question, goal.camera, goal.image, goal.max_new_tokens, goal.max_frame_age_s,
                            on_token=on_token)
            outcome = self._run(job, cancelled=lambda: goal_handle.is_cancel_requested)
        except REFUSALS as exc:
            result.success = False
            result.error = str(exc)
            result.total_ms = 1000.0 * (time.perf_counter() - started)
            self._end_goal(goal_handle, succeeded=False)
            return result
        self._fill_reply(result, outcome)
        result.total_ms = 1000.0 * (time.perf_counter() - started)
        if outcome.result.cancelled or goal_handle.is_cancel_requested:
            result.success = False
            result.error = "cancelled" if goal_handle.is_cancel_requested else \
                "cancelled before the answer was complete: the node was cleaned up or shut down"
            self._end_goal(goal_handle, succeeded=False)
        else:
            result.success = True
            self._end_goal(goal_handle, succeeded=True)
            self._publish_annotated(job.question, outcome)
        return result

    @staticmethod
    def _end_goal(goal_handle, succeeded: bool) -> None:
        """succeed, canceled (only when the client asked: any other end is an abort)."""
        if succeeded:
            goal_handle.succeed()
        elif goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()

    # ----------------------------------------------------------------- topics
    def _on_question(self, msg: String) -> None:
        self._ask_for_topic(msg.data, camera="", publisher=self._answers_pub, periodic=False)

    def _ask_standing(self) -> None:
        frames = self._frames
        for camera in frames.cameras if frames else []:
            for question in self._values["standing_questions"]:
                self._ask_for_topic(question, camera, self._answers_pub, periodic=True)

    def _ask_alerts(self) -> None:
        frames = self._frames
        for camera in frames.cameras if frames else []:
            for question in self._values["alert_questions"]:
                last = self._last_alert.get((camera, question))
                if last is not None and time.monotonic() - last < self._values["alert_cooldown_s"]:
                    continue
                self._ask_for_topic(question, camera, self._alerts_pub, periodic=True, alert=True)

    def _ask_for_topic(self, question: str, camera: str, publisher, periodic: bool, alert: bool = False) -> None:
        """Queue a question whose answer is published on a topic; rejections are logged."""
        key = (camera, question)
        with self._periodic_lock:
            if periodic and key in self._pending_periodic:
                return  # the previous round for this question is still waiting
        try:
            job = self._job(question, camera, None, 0, 0.0)
            worker = self._worker
            if worker is None:
                raise EngineError(f"vqa_node is not active (state: {self._state_label()})")
            future = worker.submit(job, background=periodic)
        except REFUSALS as exc:
            self._rejections += 1
            self.get_logger().warning(f"question '{question[:60]}' rejected: {exc}", throttle_duration_sec=5.0)
            return
        if periodic:
            with self._periodic_lock:
                self._pending_periodic.add(key)
        started = time.perf_counter()

        def done(fut) -> None:  # runs on the worker thread
            if periodic:
                with self._periodic_lock:
                    self._pending_periodic.discard(key)
            try:
                outcome: JobOutcome = fut.result()
            except Exception as exc:  # reported, never raised into the worker
                self.get_logger().warning(f"question '{question[:60]}' failed: {exc}", throttle_duration_sec=5.0)
                return
            if outcome.result.cancelled:
                return
            if alert and normalize_answer(outcome.result.text) != "yes":
                return
            if alert:
                self._last_alert[key] = time.monotonic()
            self._publish_answer(publisher, job.question, outcome, started)
            self._publish_annotated(job.question, outcome)

        future.add_done_callback(done)

    def _publish_answer(self, publisher, question: str, outcome: JobOutcome, started: float) -> None:
        frame, r = outcome.source, outcome.result
        publisher.publish(Answer(
            header=frame.header, camera=frame.camera, question=question, answer=r.text,
            vision_ms=float(r.vision_ms), prefill_ms=float(r.prefill_ms), decode_ms=float(r.decode_ms),
            total_ms=1000.0 * (time.perf_counter() - started), num_tokens=r.num_tokens,
            model=self._model_label))

    def _publish_annotated(self, question: str, outcome: JobOutcome) -> None:
        """The answered frame with question and answer drawn on it, on `answers/image`; drawn
        only when enabled and someone subscribes, so it costs nothing otherwise."""
        if not self._values["publish_annotated"] or self._annotated_pub.get_subscription_count() == 0:
            return
        frame = outcome.source
        drawn = annotate_answer(frame.rgb, question, outcome.result.text)
        self._annotated_pub.publish(rgb_to_image_msg(drawn, "rgb8", frame.header))

    # ----------------------------------------------------------------- diagnostics
    def _publish_diagnostics(self) -> None:
        worker, frames, engine = self._worker, self._frames, self._engine
        values = {"model": self._model_label, "backend": engine.backend if engine else "",
                  "state": self._state_label()}
        if self._model_note:
            values["note"] = self._model_note
        if worker is None or frames is None:
            level = DiagnosticStatus.ERROR if self._configure_error else DiagnosticStatus.WARN
            message = self._state_label()
        else:
            stats = worker.stats()
            values.update({
                "queue_depth": str(worker.depth),
                "queue_capacity": str(worker.capacity),
                "background_queue_depth": str(worker.background_depth),
                "latency_p50_ms": f"{stats['latency_p50_ms']:.1f}",
                "latency_p95_ms": f"{stats['latency_p95_ms']:.1f}",
                "tokens_per_s": f"{stats['tokens_per_s']:.1f}",
                "answered": str(int(stats["succeeded"])),
                "failed": str(int(stats["failed"])),
                "rejected_topic_questions": str(self._rejections),
            })
            ages = frames.ages()
            ahead = frames.stamps_ahead()
            max_age = self._values["max_frame_age_s"]
            for camera, age in ages.items():
                values[f"frame_age_s.{camera}"] = "none" if age is None else f"{age:.3f}"
                values[f"image_qos.{camera}"] = self._camera_presets.get(camera, "")
                if (ahead.get(camera) or 0.0) > STAMP_AHEAD_WARN_S:
                    values[f"stamp_ahead_s.{camera}"] = f"{ahead[camera]:.3f}"
            stale = [c for c, a in ages.items() if a is None or a > max_age > 0]
            skewed = [c for c, a in ahead.items() if (a or 0.0) > STAMP_AHEAD_WARN_S]
            if not worker.alive:
                level, message = DiagnosticStatus.ERROR, "inference worker stopped"
            elif stale and self._active:
                level, message = DiagnosticStatus.WARN, "no recent frame on: " + ", ".join(stale)
            elif skewed:
                level, message = DiagnosticStatus.WARN, "frames stamped in the future (clock skew) on: " + \
                    ", ".join(skewed)
            elif worker.depth >= worker.capacity:
                level, message = DiagnosticStatus.WARN, "request queue full"
            else:
                level, message = DiagnosticStatus.OK, self._state_label()
        status = DiagnosticStatus(level=level, name=f"{self.get_name()}: vqa", message=message,
                                  hardware_id=self._model_label,
                                  values=[KeyValue(key=k, value=v) for k, v in values.items()])
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)


def executor_threads(node: VqaNode) -> int:
    """Enough threads that every request the queue holds (and the max_batch running) can wait
    while frames, diagnostics, parameter and lifecycle services and refusals still flow."""
    return int(node.get_parameter("queue_size").value) + int(node.get_parameter("max_batch").value) + 4


def main(args: list[str] | None = None) -> int:
    rclpy.init(args=args)
    try:
        node = VqaNode()  # with autostart this loads the model: seconds to minutes for a large one
    except (KeyboardInterrupt, ExternalShutdownException):
        rclpy.try_shutdown()  # Ctrl-C while the model loads: stop as asked, without a traceback
        return 0
    executor = MultiThreadedExecutor(num_threads=executor_threads(node))
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

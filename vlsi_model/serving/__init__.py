"""Serving pieces shared by the ROS node and any other front end: newest-frame store per
camera, and one inference worker with a bounded request queue. No ROS imports here."""

from vlsi_model.serving.frames import NO_FRAME_YET, Frame, FrameError, FrameStore
from vlsi_model.serving.worker import AnswerJob, AnswerWorker, JobCancelledError, JobOutcome, QueueFullError

__all__ = [
    "NO_FRAME_YET", "AnswerJob", "AnswerWorker", "Frame", "FrameError", "FrameStore", "JobCancelledError", "JobOutcome",
    "QueueFullError",
]

"""ROS-free bringup: image_source and vqa_node in one process, from the launch file's YAML.

`ros2 launch` needs the `launch` packages, which a ROS 2 installed from pip wheels lacks.
This runs the same two nodes with the same parameter file and the same overrides as
vqa.launch.py (model_path, backend, engine_dir, image_topic, transport, image_qos,
start_image_source, source, bag, bag_topic), on one MultiThreadedExecutor. As with the launch
file, an option not given leaves the YAML's value, and image_source publishes the transport
vqa_node listens to (`vlsi_ros.launch_overrides`).

A robot's recorded data instead of a robot: `--bag ~/bags/run1 [--bag-topic /camera/image_raw]`
replays the bag's frames through image_source (`--bag` implies `--source bag`).
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import rclpy
from ament_index_python.packages import get_package_share_directory
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from vlsi_ros.image_source import SOURCES, ImageSource, ImageSourceError
from vlsi_ros.launch_overrides import VQA_NODE_ARGUMENTS, vqa_node_overrides, vqa_node_transport
from vlsi_ros.vqa_node import VqaNode, executor_threads


def default_params_file() -> Path:
    return Path(get_package_share_directory("vlsi_ros")) / "config" / "vqa.yaml"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="bringup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-file", type=Path, default=None, help="default: share/vlsi_ros/config/vqa.yaml")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--engine-dir", default=None)
    parser.add_argument("--image-topic", default=None)
    parser.add_argument("--transport", choices=("raw", "compressed"), default=None)
    parser.add_argument("--image-qos", choices=("auto", "sensor_data", "reliable", "best_effort"), default=None)
    parser.add_argument("--no-image-source", action="store_true", help="only vqa_node (a real camera publishes)")
    parser.add_argument("--source", choices=SOURCES, default=None, help="image_source's source")
    parser.add_argument("--bag", default=None,
                        help="bag to replay (rosbag2 directory, .mcap / .db3, or ROS 1 .bag): image_source's path; "
                             "implies --source bag")
    parser.add_argument("--bag-topic", default=None, help="the bag's image topic (default: its only one)")
    parser.add_argument("--duration", type=float, default=0.0, help="exit after this many seconds (0: run)")
    return parser.parse_known_args(argv)


def ros_arguments(args: argparse.Namespace) -> list[str]:
    """The --ros-args that make both nodes see what vqa.launch.py would give them."""
    params_file = args.params_file or default_params_file()
    if not params_file.is_file():
        raise FileNotFoundError(f"parameter file not found: {params_file}")
    ros_args = ["--ros-args", "--params-file", str(params_file)]
    given = vqa_node_overrides({name: getattr(args, name) for name in VQA_NODE_ARGUMENTS})
    for name, value in given.items():  # YAML-quoted: a string whatever it looks like ("2024")
        ros_args += ["-p", "vqa_node:{}:='{}'".format(name, value.replace("'", "''"))]
    compressed = vqa_node_transport(params_file, args.transport) == "compressed"
    ros_args += ["-p", f"image_source:compressed:={str(compressed).lower()}"]
    source = args.source or ("bag" if args.bag else None)
    for name, value in (("source", source), ("path", args.bag), ("topic", args.bag_topic)):
        if value is not None:  # YAML-quoted: a string whatever it looks like ("2024", "", "true")
            ros_args += ["-p", "image_source:{}:='{}'".format(name, value.replace("'", "''"))]
    if args.image_topic:
        ros_args += ["-r", f"image:={args.image_topic}", "-r", f"image/compressed:={args.image_topic}/compressed"]
    return ros_args


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        ros_args = ros_arguments(args)
    except FileNotFoundError as exc:
        print(f"bringup: {exc}", file=sys.stderr)
        return 2
    # Extra --ros-args from the command line come last and win, as with ros2 run.
    rclpy.init(args=["bringup", *ros_args, *extra])
    nodes = []
    try:
        vqa = VqaNode()
        nodes.append(vqa)
        if not args.no_image_source:
            nodes.append(ImageSource())
        executor = MultiThreadedExecutor(num_threads=executor_threads(vqa) + 2)
        for node in nodes:
            executor.add_node(node)
        if args.duration > 0:
            threading.Timer(args.duration, executor.shutdown).start()
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ImageSourceError as exc:
        print(f"bringup: image_source: {exc}", file=sys.stderr)
        return 2
    finally:
        for node in nodes:
            if isinstance(node, VqaNode):
                node.release()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0

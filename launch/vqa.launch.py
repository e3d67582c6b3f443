"""ros2 launch vlsi_ros vqa.launch.py [model_path:=DIR] [backend:=auto|torch|onnxruntime|tensorrt]
[engine_dir:=DIR|NAME] [image_topic:=image] [transport:=raw|compressed]
[image_qos:=auto|sensor_data|reliable|best_effort] [start_image_source:=true]
[source:=synthetic|video|folder|device|bag] [bag:=PATH] [bag_topic:=TOPIC] [params_file:=config/vqa.yaml]

Starts vqa_node (and, by default, the synthetic image_source) with parameters from
config/vqa.yaml (installed in share/vlsi_ros/config; or params_file:=your.yaml); a launch
argument given overrides the file, one not given leaves the file's value
(`vlsi_ros.launch_overrides`). The same YAML and rule drive the ROS-free bringup
(`lib/vlsi_ros/bringup`) used where `ros2 launch` is unavailable.

Recorded robot data instead of a robot: `bag:=~/bags/run1` (a rosbag2 directory, the .mcap /
.db3 in one, or a ROS 1 .bag) `[bag_topic:=/camera/image_raw]` (needed when the bag has several
image topics) replays the bag's frames at their recorded pace, stamped when published so
vqa_node accepts them (image_source's bag_timing and loop parameters: the YAML).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription
from vlsi_ros.launch_overrides import VQA_NODE_ARGUMENTS, vqa_node_overrides, vqa_node_transport


def image_remappings(image_topic) -> list:
    return [("image", image_topic), ("image/compressed", [image_topic, "/compressed"])]


def _arg(context, name: str) -> str:
    return LaunchConfiguration(name).perform(context)


def vqa_node(context) -> list:
    """vqa_node with the parameter file and the launch arguments that were given (an empty one
    keeps the file's value). Strings stay strings (a path like 2024 is not a number)."""
    given = vqa_node_overrides({name: _arg(context, name) for name in VQA_NODE_ARGUMENTS})
    overrides = {name: ParameterValue(value, value_type=str) for name, value in given.items()}
    return [Node(package="vlsi_ros", executable="vqa_node", name="vqa_node", output="screen",
                 parameters=[_arg(context, "params_file"), overrides],
                 remappings=image_remappings(_arg(context, "image_topic")))]


def image_source_node(context) -> list:
    """image_source with the launch arguments that were given: an empty `source`, `bag` or
    `bag_topic` keeps the YAML's value (a video or folder set up there stays), and `bag:=PATH`
    alone means `source:=bag`; it publishes compressed frames when vqa_node's transport (the
    argument, else the file's) is compressed. Strings stay strings."""
    def arg(name: str) -> str:
        return _arg(context, name)

    transport = vqa_node_transport(arg("params_file"), arg("transport"))
    overrides = {"compressed": transport == "compressed"}
    source, bag, topic = arg("source"), arg("bag"), arg("bag_topic")
    if bag:
        overrides["source"], overrides["path"] = source or "bag", ParameterValue(bag, value_type=str)
    elif source:
        overrides["source"] = source
    if topic:
        overrides["topic"] = ParameterValue(topic, value_type=str)
    return [Node(package="vlsi_ros", executable="image_source", name="image_source", output="screen",
                 parameters=[arg("params_file"), overrides], remappings=image_remappings(arg("image_topic")),
                 condition=IfCondition(arg("start_image_source")))]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("vlsi_ros")
    args = {
        "params_file": (os.path.join(share, "config", "vqa.yaml"), "YAML parameter file"),
        "model_path": ("", "model directory (empty: the YAML's; its empty: the package's default model)"),
        "backend": ("", "auto, torch, onnxruntime or tensorrt (empty: the YAML's, auto)"),
        "engine_dir": ("", "ONNX / TensorRT engine directory, or the name of a set in trt_engines/ "
                           "(empty: the YAML's)"),
        "image_topic": ("image", "camera topic vqa_node answers about"),
        "transport": ("", "raw or compressed (empty: the YAML's, raw)"),
        "image_qos": ("", "camera subscription QoS: auto (match the camera's publishers), sensor_data, "
                          "reliable or best_effort (empty: the YAML's, auto)"),
        "start_image_source": ("true", "also start image_source (the camera stand-in)"),
        "source": ("", "image_source's source: synthetic, video, folder, device or bag (empty: the YAML's)"),
        "bag": ("", "a bag to replay (rosbag2 directory, .mcap / .db3, or ROS 1 .bag): implies source bag"),
        "bag_topic": ("", "the bag's image topic (empty: its only one)"),
    }
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in args.items()]
    return LaunchDescription([*declared, OpaqueFunction(function=vqa_node),
                              OpaqueFunction(function=image_source_node)])

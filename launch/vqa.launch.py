"""ros2 launch vlsi_ros vqa.launch.py [model_path:=DIR] [backend:=auto] [engine_dir:=DIR|NAME]
[image_topic:=/camera/image_raw] [transport:=raw|compressed] [image_qos:=auto|sensor_data|reliable|best_effort]
[start_image_source:=true] [source:=synthetic|video|folder|device|bag] [bag:=PATH] [bag_topic:=TOPIC]
[params_file:=config/vqa.yaml]

Starts vqa_node (and, by default, the synthetic image_source) with parameters from
config/vqa.yaml; launch arguments override the file. The same YAML drives the ROS-free
bringup (`lib/vlsi_ros/bringup`) used where `ros2 launch` is unavailable.

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


def image_remappings(image_topic) -> list:
    return [("image", image_topic), ("image/compressed", [image_topic, "/compressed"])]


def image_source_node(context) -> list:
    """image_source with the launch arguments that were given: an empty `source`, `bag` or
    `bag_topic` keeps the YAML's value (a video or folder set up there stays), and `bag:=PATH`
    alone means `source:=bag`. Strings stay strings (a path or topic like 2024 is not a number)."""
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    overrides = {"compressed": arg("transport") == "compressed"}
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
        "model_path": ("", "model directory (empty: the package's default model)"),
        "backend": ("auto", "auto, torch, onnxruntime or tensorrt"),
        "engine_dir": ("", "ONNX / TensorRT engine directory, or the name of a set in trt_engines/"),
        "image_topic": ("image", "camera topic vqa_node answers about"),
        "transport": ("raw", "raw or compressed"),
        "image_qos": ("auto", "camera subscription QoS: auto (match the camera's publishers), sensor_data, "
                              "reliable or best_effort"),
        "start_image_source": ("true", "also start image_source (the camera stand-in)"),
        "source": ("", "image_source's source: synthetic, video, folder, device or bag (empty: the YAML's)"),
        "bag": ("", "a bag to replay (rosbag2 directory, .mcap / .db3, or ROS 1 .bag): implies source bag"),
        "bag_topic": ("", "the bag's image topic (empty: its only one)"),
    }
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in args.items()]
    cfg = {name: LaunchConfiguration(name) for name in args}
    vqa_node = Node(
        package="vlsi_ros", executable="vqa_node", name="vqa_node", output="screen",
        parameters=[cfg["params_file"], {"model_path": cfg["model_path"], "backend": cfg["backend"],
                                         "engine_dir": cfg["engine_dir"], "transport": cfg["transport"],
                                         "image_qos": cfg["image_qos"]}],
        remappings=image_remappings(cfg["image_topic"]))
    return LaunchDescription([*declared, vqa_node, OpaqueFunction(function=image_source_node)])

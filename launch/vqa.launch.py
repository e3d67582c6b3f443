"""ros2 launch vlsi_ros vqa.launch.py [model_path:=DIR] [backend:=auto] [engine_dir:=DIR]
[image_topic:=/camera/image_raw] [transport:=raw|compressed] [image_qos:=auto|sensor_data|reliable|best_effort]
[start_image_source:=true] [params_file:=config/vqa.yaml]

Starts vqa_node (and, by default, the synthetic image_source) with parameters from
config/vqa.yaml; launch arguments override the file. The same YAML drives the ROS-free
bringup (`lib/vlsi_ros/bringup`) used where `ros2 launch` is unavailable.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node

from launch import LaunchDescription


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("vlsi_ros")
    args = {
        "params_file": (os.path.join(share, "config", "vqa.yaml"), "YAML parameter file"),
        "model_path": ("", "model directory (empty: the package's default model)"),
        "backend": ("auto", "auto, torch, onnxruntime or tensorrt"),
        "engine_dir": ("", "ONNX / TensorRT engine directory"),
        "image_topic": ("image", "camera topic vqa_node answers about"),
        "transport": ("raw", "raw or compressed"),
        "image_qos": ("auto", "camera subscription QoS: auto (match the camera's publishers), sensor_data, "
                              "reliable or best_effort"),
        "start_image_source": ("true", "also start the synthetic image_source"),
    }
    declared = [DeclareLaunchArgument(name, default_value=default, description=text)
                for name, (default, text) in args.items()]
    cfg = {name: LaunchConfiguration(name) for name in args}
    image_remap = [("image", cfg["image_topic"]), ("image/compressed", [cfg["image_topic"], "/compressed"])]
    vqa_node = Node(
        package="vlsi_ros", executable="vqa_node", name="vqa_node", output="screen",
        parameters=[cfg["params_file"], {"model_path": cfg["model_path"], "backend": cfg["backend"],
                                         "engine_dir": cfg["engine_dir"], "transport": cfg["transport"],
                                         "image_qos": cfg["image_qos"]}],
        remappings=image_remap)
    image_source = Node(
        package="vlsi_ros", executable="image_source", name="image_source", output="screen",
        parameters=[cfg["params_file"],
                    {"compressed": PythonExpression(["'", cfg["transport"], "' == 'compressed'"])}],
        remappings=image_remap,
        condition=IfCondition(cfg["start_image_source"]))
    return LaunchDescription([*declared, vqa_node, image_source])

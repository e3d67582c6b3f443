"""What the launch arguments override, shared by vqa.launch.py and the ROS-free bringup.

Why a module: both start the same two nodes from the same parameter file, and both must follow
one rule. An argument the user did not give leaves the file's value (a YAML that says `backend:
tensorrt` is obeyed under `ros2 launch` too), and image_source publishes the transport vqa_node
listens to, whether that came from an argument or from the file. Plain Python + PyYAML (no
rclpy), so the launch file imports it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# vqa_node parameters that have a launch argument (and a bringup option) of the same name
VQA_NODE_ARGUMENTS = ("model_path", "backend", "engine_dir", "transport", "image_qos")


def vqa_node_overrides(given: Mapping[str, str | None]) -> dict[str, str]:
    """The vqa_node parameters to override: the arguments given a non-empty value (an empty or
    missing one keeps the parameter file's value)."""
    return {name: str(given[name]) for name in VQA_NODE_ARGUMENTS if given.get(name)}


def _matches(pattern: str, node: str) -> bool:
    """Whether a parameter file's node key matches the fully qualified `node` name as rcl matches
    it: a bare name is absolute, `/*` is one name token, `/**` any number of them. Written here
    because rcl's matcher (rcl_yaml_param_parser) is C only, and rclpy's
    `parameter_dict_from_yaml_file` knows exact names and a leading `/**` but not `/**/vqa_node`."""
    pattern = pattern if pattern.startswith("/") else f"/{pattern}"
    regex = "".join("(/[^/]+)*" if part == "**" else "/[^/]+" if part == "*" else "/" + re.escape(part)
                    for part in pattern.strip("/").split("/"))
    return re.fullmatch(regex, node) is not None


def node_parameters(params_file: str | Path, node: str = "/vqa_node") -> dict[str, Any]:
    """The parameters `params_file` gives the node named `node` (fully qualified): every matching
    section merged in file order, a later one winning, as rcl merges them; {} for an unreadable
    file (the node reports that itself)."""
    try:
        data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    merged: dict[str, Any] = {}
    for key, section in (data.items() if isinstance(data, dict) else ()):
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict) and _matches(str(key), node):
            merged.update(section["ros__parameters"])
    return merged


def vqa_node_transport(params_file: str | Path, given: str | None) -> str:
    """The transport vqa_node will use: the argument when given, else the parameter file's
    (`raw` when it names none); image_source's `compressed` follows it."""
    if given:
        return given
    return str(node_parameters(params_file).get("transport") or "raw")

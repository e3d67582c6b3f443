"""The launch file and the YAML it loads name things that exist, and no parameter is ignored.

`ros2 launch` cannot run here (no launch packages in the pip-wheel ROS 2), so the launch
file is checked statically; the launch_testing test in test/launch runs it on a full ROS 2.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from ament_index_python.packages import get_package_prefix, get_package_share_directory

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "vqa.launch.py"


def launch_calls() -> list[ast.Call]:
    tree = ast.parse(LAUNCH.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Node"]


def keyword(call: ast.Call, name: str):
    return next(ast.literal_eval(k.value) for k in call.keywords if k.arg == name)


def test_launch_nodes_are_installed_executables():
    calls = launch_calls()
    assert {keyword(c, "executable") for c in calls} == {"vqa_node", "image_source"}
    lib = Path(get_package_prefix("vlsi_ros")) / "lib" / "vlsi_ros"
    for call in calls:
        assert keyword(call, "package") == "vlsi_ros"
        exe = lib / keyword(call, "executable")
        assert exe.is_file() and exe.stat().st_mode & 0o111, exe


def test_launch_parameter_file_is_installed_and_matches_source():
    text = LAUNCH.read_text()
    assert 'os.path.join(share, "config", "vqa.yaml")' in text
    installed = Path(get_package_share_directory("vlsi_ros")) / "config" / "vqa.yaml"
    assert installed.is_file()
    assert installed.read_text() == (REPO / "config" / "vqa.yaml").read_text()
    assert (Path(get_package_share_directory("vlsi_ros")) / "launch" / "vqa.launch.py").is_file()


def declared_parameters(node) -> set[str]:
    builtin = {"use_sim_time", "start_type_description_service"}
    return {name for name in node._parameters if name not in builtin and not name.startswith("qos_overrides.")}


def test_yaml_sets_exactly_the_declared_parameters(ros_context):
    """Every YAML key is declared by its node and every declared parameter is in the YAML."""
    from rclpy.parameter import Parameter

    from vlsi_ros.image_source import ImageSource
    from vlsi_ros.vqa_node import VqaNode

    config = yaml.safe_load((REPO / "config" / "vqa.yaml").read_text())
    vqa = VqaNode(parameter_overrides=[Parameter("autostart", value=False)])
    source = ImageSource()
    try:
        assert set(config["vqa_node"]["ros__parameters"]) == declared_parameters(vqa)
        assert set(config["image_source"]["ros__parameters"]) == declared_parameters(source)
    finally:
        vqa.destroy_node()
        source.destroy_node()


def test_launch_overrides_are_vqa_node_parameters():
    from vlsi_ros.vqa_node import PARAMETERS

    call = next(c for c in launch_calls() if keyword(c, "executable") == "vqa_node")
    params = next(k.value for k in call.keywords if k.arg == "parameters")
    overrides = next(e for e in params.elts if isinstance(e, ast.Dict))
    assert {ast.literal_eval(k) for k in overrides.keys} <= set(PARAMETERS)

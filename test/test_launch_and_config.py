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
    """The launch arguments that override vqa_node parameters name real ones, default to empty
    (= the YAML's value), and go through vlsi_ros.launch_overrides, as bringup's options do."""
    from vlsi_ros.launch_overrides import VQA_NODE_ARGUMENTS
    from vlsi_ros.vqa_node import PARAMETERS

    assert set(VQA_NODE_ARGUMENTS) <= set(PARAMETERS)
    tree = ast.parse(LAUNCH.read_text())
    args = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "args")
    defaults = {ast.literal_eval(k): v.elts[0] for k, v in zip(args.value.keys, args.value.values, strict=True)}
    assert all(ast.literal_eval(defaults[name]) == "" for name in VQA_NODE_ARGUMENTS)
    assert "vqa_node_overrides(" in LAUNCH.read_text() and "vqa_node_transport(" in LAUNCH.read_text()


def test_arguments_not_given_leave_the_parameter_file_and_the_camera_follows_the_transport(tmp_path):
    """A YAML that says backend: onnxruntime / transport: compressed is obeyed when no argument is
    given (launch and bringup alike: the launch file used to pass its own defaults over it), an
    argument given wins, and image_source publishes what vqa_node listens to."""
    from vlsi_ros.bringup import parse_args, ros_arguments
    from vlsi_ros.launch_overrides import vqa_node_overrides, vqa_node_transport

    config = yaml.safe_load((REPO / "config" / "vqa.yaml").read_text())
    config["vqa_node"]["ros__parameters"].update(backend="onnxruntime", transport="compressed")
    params = tmp_path / "robot.yaml"
    params.write_text(yaml.safe_dump(config))
    assert vqa_node_overrides({"backend": "", "model_path": "", "transport": None}) == {}
    assert vqa_node_overrides({"backend": "torch", "model_path": "2024"}) == {"backend": "torch", "model_path": "2024"}
    assert vqa_node_transport(params, "") == "compressed" and vqa_node_transport(params, "raw") == "raw"
    assert vqa_node_transport(REPO / "config" / "vqa.yaml", None) == "raw"
    assert vqa_node_transport(tmp_path / "missing.yaml", None) == "raw"

    plain = ros_arguments(parse_args(["--params-file", str(params)])[0])
    assert not any(a.startswith("vqa_node:") for a in plain)  # the file's backend and transport stand
    assert "image_source:compressed:=true" in plain
    given = ros_arguments(parse_args(["--params-file", str(params), "--backend", "torch", "--transport", "raw"])[0])
    assert "vqa_node:backend:='torch'" in given and "vqa_node:transport:='raw'" in given
    assert "image_source:compressed:=false" in given


def test_the_transport_is_read_from_the_yaml_as_rcl_merges_it(tmp_path):
    """Every section that matches /vqa_node counts, in file order, a later one winning (`/**`,
    `/**/vqa_node`, a bare name), as rcl merges them; image_source must publish that transport."""
    from vlsi_ros.launch_overrides import node_parameters, vqa_node_transport

    layouts = {
        "/**:\n  ros__parameters: {transport: compressed}\nvqa_node:\n  ros__parameters: {backend: torch}\n":
            "compressed",
        "vqa_node:\n  ros__parameters: {transport: compressed}\n/**:\n  ros__parameters: {transport: raw}\n": "raw",
        "/**/vqa_node:\n  ros__parameters: {transport: compressed}\n": "compressed",
        "/*:\n  ros__parameters: {transport: compressed}\n/other_node:\n  ros__parameters: {transport: raw}\n":
            "compressed",
        "/robot/vqa_node:\n  ros__parameters: {transport: compressed}\n": "raw",  # another namespace
    }
    for i, (text, transport) in enumerate(layouts.items()):
        path = tmp_path / f"p{i}.yaml"
        path.write_text(text)
        assert vqa_node_transport(path, None) == transport, text
    path.write_text(next(iter(layouts)))
    assert node_parameters(path) == {"transport": "compressed", "backend": "torch"}
    path.write_text("{not yaml: [")
    assert node_parameters(path) == {} and vqa_node_transport(path, None) == "raw"

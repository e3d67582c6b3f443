"""pip install of the ML library `vlsi_model` and its `vlsi` CLI, for machines without ROS.

On a ROS 2 machine the package is built by colcon from CMakeLists.txt instead (it owns
interfaces, so it is ament_cmake); the ROS nodes in `vlsi_ros/` are not part of this wheel.
"""

from pathlib import Path

from setuptools import find_packages, setup


def read_requirements(name: str) -> list[str]:
    lines = Path(__file__).with_name("requirements").joinpath(name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="vlsi_model",
    version="0.1.0",
    description="VLsI distillation, evaluation, fast inference and ONNX/TensorRT export for small VLMs",
    packages=find_packages(include=["vlsi_model", "vlsi_model.*"]),
    include_package_data=True,
    package_data={"vlsi_model": ["assets/**/*", "configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=read_requirements("ml.txt"),
    extras_require={"dev": read_requirements("dev.txt")},
    entry_points={"console_scripts": ["vlsi = vlsi_model.cli:main"]},
)

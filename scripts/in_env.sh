#!/usr/bin/env bash
# Runs a command inside the project's environment: the virtual environment, the colcon
# install of this package, and ROS 2 discovery kept on this machine (loopback only).
set -eo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_real="$(realpath "${VLSI_VENV:-$repo/.venv}")"
export VIRTUAL_ENV="$venv_real" PATH="$venv_real/bin:$PATH" AMENT_PREFIX_PATH="$venv_real"
# shellcheck disable=SC1091
source "$repo/install/setup.bash"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
# Best-effort camera frames over Fast DDS need the large-data transports (SHM + TCP);
# with plain UDP most 640x480 frames are lost to fragmentation.
export FASTDDS_BUILTIN_TRANSPORTS="${FASTDDS_BUILTIN_TRANSPORTS:-LARGE_DATA}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
exec "$@"

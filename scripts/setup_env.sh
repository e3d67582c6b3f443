#!/usr/bin/env bash
# Sets up everything `make demo` and `make test` need on a machine with no ROS and no GPU:
# a virtual environment with pinned ROS 2 Kilted wheels and the CPU ML stack, the wheels'
# CMake exports patched for this Python, and a colcon build of this package into install/.
# Idempotent and quick when nothing changed (requirements are hashed, colcon is incremental).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${VLSI_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -e "$venv/bin/python" ]; then
  if [ "$venv" = ".venv" ]; then
    # CMake refuses exported include directories that lie inside the source tree, and the
    # repository root is the ROS package; so the environment lives outside and .venv links it.
    key="$(printf '%s' "$repo" | sha256sum | cut -c1-12)"
    real="${XDG_CACHE_HOME:-$HOME/.cache}/vlsi_ros/venv-$key"
    rm -f .venv
    if [ ! -x "$real/bin/python" ]; then
      rm -rf "$real"
      mkdir -p "$(dirname "$real")"
      echo "[setup] creating virtual environment $real (linked as .venv)"
      "$python" -m venv "$real"
    fi
    ln -s "$real" .venv
  else
    echo "[setup] creating virtual environment $venv"
    "$python" -m venv "$venv"
  fi
fi
venv_real="$(realpath "$venv")"

want="$(cat requirements/*.txt setup.py | sha256sum | cut -c1-64)"
stamp="$venv_real/.vlsi_requirements.sha256"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing pinned requirements (ROS 2 Kilted wheels, torch CPU, ML stack)"
  pip_quiet() {  # this machine's pip.conf names local package folders that may be absent: drop that noise
    "$venv_real/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  }
  pip_quiet install -q --upgrade "pip==26.3"
  pip_quiet install -q -r requirements/ros.txt -r requirements/ml.txt -r requirements/dev.txt
  pip_quiet install -q --no-deps --no-build-isolation -e .
  "$venv_real/bin/python" scripts/patch_ros_wheel_cmake.py "$venv_real"
  touch "$venv_real/COLCON_IGNORE"
  echo "$want" > "$stamp"
fi

export VIRTUAL_ENV="$venv_real" PATH="$venv_real/bin:$PATH" AMENT_PREFIX_PATH="$venv_real"
mkdir -p log  # colcon writes its logs here; the redirect below needs it on a fresh clone
# ament_python_install_package lists the package's files when CMake configures: a module added,
# moved or removed since then is missed by an incremental build, so reconfigure when the list differs.
py_list=$(cd vlsi_model && find . -name '*.py' -not -path '*/__pycache__/*' | sort; cd ../vlsi_ros && find . -name '*.py' | sort)
force=()
if [ "$py_list" != "$(cat build/.vlsi_py_files 2>/dev/null)" ]; then
  force=(--cmake-force-configure)
  rm -rf install/vlsi_ros/lib/python3*/site-packages/vlsi_model install/vlsi_ros/lib/python3*/site-packages/vlsi_ros \
    build/vlsi_ros/ament_cmake_python
fi
if ! colcon build --paths . --event-handlers console_cohesion- summary- status- "${force[@]}" \
    --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$venv_real/bin/python" \
    > log/colcon_build_last.txt 2>&1 < /dev/null; then
  cat log/colcon_build_last.txt
  echo "[setup] colcon build failed" >&2
  exit 1
fi
echo "$py_list" > build/.vlsi_py_files

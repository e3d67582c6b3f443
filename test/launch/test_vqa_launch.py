"""launch_testing test of vqa.launch.py, for a machine with a full ROS 2 install (the CI
workflow in .github/workflows runs it in the official ROS containers). It cannot run where
ROS 2 came from pip wheels: `launch_testing` is not published there."""

import os
import unittest

import launch_ros.actions  # noqa: F401  (the launch file needs launch_ros)
import launch_testing.actions
import launch_testing.markers
import pytest
import rclpy
import rclpy.executors
from ament_index_python.packages import get_package_share_directory
from launch.launch_description_sources import PythonLaunchDescriptionSource

import launch
from vlsi_ros.srv import Ask


@pytest.mark.launch_test
@launch_testing.markers.keep_alive
def generate_test_description():
    share = get_package_share_directory("vlsi_ros")
    vqa = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, "launch", "vqa.launch.py")))
    return launch.LaunchDescription([vqa, launch_testing.actions.ReadyToTest()])


class TestVqaLaunch(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # A context of its own: run in one pytest process after other tests, the default
        # context may be initialised already ("Context.init() must only be called once").
        cls.context = rclpy.Context()
        rclpy.init(context=cls.context)
        cls.node = rclpy.create_node("vqa_launch_test_client", context=cls.context)
        cls.executor = rclpy.executors.SingleThreadedExecutor(context=cls.context)
        cls.executor.add_node(cls.node)

    @classmethod
    def tearDownClass(cls):
        cls.executor.shutdown()
        cls.node.destroy_node()
        rclpy.shutdown(context=cls.context)

    def test_ask_answers_about_a_synthetic_frame(self):
        client = self.node.create_client(Ask, "ask")
        self.assertTrue(client.wait_for_service(timeout_sec=120.0), "ask service never appeared")
        deadline = self.node.get_clock().now().nanoseconds + 120 * 10**9
        response = None
        while self.node.get_clock().now().nanoseconds < deadline:
            future = client.call_async(Ask.Request(question="How many objects are there?"))
            self.executor.spin_until_future_complete(future, timeout_sec=60.0)
            response = future.result()
            if response is not None and response.success:
                break
        self.assertIsNotNone(response)
        self.assertTrue(response.success, response.error)
        self.assertEqual(response.image_header.frame_id, "camera")
        self.assertGreater(response.num_tokens, 0)

"""benchmarks/node_stress.py at a small size: two vqa_node processes take fuzzed camera messages,
requests, questions and parameter sets, a 200-request burst, stale and future-stamped frames,
decompression bombs and lifecycle cycles with requests in flight; none may crash, every request
gets a reply, and every check holds. The full size (10,000 messages) is the benchmark's default."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

pytestmark = [pytest.mark.ros, pytest.mark.slow]


def test_fuzz_burst_bombs_and_lifecycle_leave_no_crash_and_no_lost_request(ros_context, tmp_path):
    harness = load_benchmark("node_stress")
    config = harness.StressConfig(messages=300, burst=200, lifecycle_cycles=2)
    report = harness.StressRun(config, log_dir=tmp_path).run()
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert report.crashes == 0, logs[-4000:]
    assert report.lost_requests == 0, harness.format_report(report)
    assert report.burst_sent == 400 and report.burst_replied == 400
    assert report.burst_answered >= 2  # at least the first of each burst; the rest refused at once
    assert report.checks and all(report.checks.values()), (report.checks, report.check_replies)
    assert report.replies == report.requests_sent
    assert report.total_messages >= 300

"""`lcm serve` killed mid-request: in-flight requests get an error or a complete answer, never a half image,
and the restarted server serves (the long run: scripts/serve_soak.py, counts in reports/reliability/)."""
import importlib.util
import random
from pathlib import Path

_spec = importlib.util.spec_from_file_location("serve_soak", Path(__file__).parents[1] / "scripts" / "serve_soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def test_a_server_killed_mid_request_never_sends_half_an_image_and_restarts(micro_lcm):
    result = soak.round_once(str(micro_lcm), clients=3, rng=random.Random(1))
    assert result["answered"] == 3 and result["broken"] == 0
    assert result["complete"] + result["error"] == 3
    assert result["restart_health"] == "ok" and result["restart_generate"] == "complete"

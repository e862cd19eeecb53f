"""The committed stubs are what `make proto` generates from proto/ (the .proto is the source of truth)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto():
    out = subprocess.run([sys.executable, "tools/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_stubs_import_as_a_plain_package():
    out = subprocess.run([sys.executable, "-c", "from kt_core.wire import federation_pb2_grpc as g; "
                          "print(g.ParticipantServiceStub.__name__)"], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0 and "ParticipantServiceStub" in out.stdout, out.stderr

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BIN = os.environ.get("TRELLM_BIN", os.path.join(os.path.dirname(__file__), "../../build/trellm"))
DATA = os.environ.get("TRELLM_TEST_DATA", os.path.join(os.path.dirname(__file__), "../data"))


def trellm(*args, check=True, timeout=300):
    """Runs the trellm binary; returns (returncode, stdout, stderr)."""
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"trellm {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def data_dir():
    return DATA


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """Calibration ids for the quantizer tests on tests/data/hf/tiny_a: 384 random tokens of its 320 (seed 11)."""
    import numpy as np
    rng = np.random.default_rng(11)
    p = tmp_path_factory.mktemp("cal") / "cal.ids"
    p.write_text(" ".join(str(int(t)) for t in rng.integers(0, 320, 384)) + "\n")
    return str(p)

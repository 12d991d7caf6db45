"""Faults (issue 17): a checkpoint truncated under a running trellm ends in a clear error, not a SIGBUS crash;
`trellm quantize` killed with SIGKILL at random points and resumed writes byte-identical files to an uninterrupted
run; a disk that fills up (a file-size limit, RLIMIT_FSIZE) while it writes is a clear error naming the file, with
no directory that looks complete, and a rerun with room finishes it."""
import filecmp
import os
import random
import resource
import shutil
import signal
import subprocess
import time

import pytest

from conftest import BIN, DATA, trellm

TINY = os.path.join(DATA, "hf", "tiny_a")
DEFAULT_BF16 = os.path.join(DATA, "..", "..", "models", "tiny-glm")
ARGS = ["--bits", "3.5", "--no-scale-search", "--seq-len", "128"]
SEEDS = 5  # kill/resume schedules; each kills a run twice at random times, then lets it finish


@pytest.fixture(scope="module")
def reference(tmp_path_factory, calib):
    """An uninterrupted quantization and how long it took."""
    out = str(tmp_path_factory.mktemp("ref") / "q")
    t0 = time.monotonic()
    trellm("quantize", "--model", TINY, "--out", out, "--calibration", calib, *ARGS)
    return out, time.monotonic() - t0


def quantize_cmd(out, calib):
    return [BIN, "quantize", "--model", TINY, "--out", out, "--calibration", calib, *ARGS]


def assert_same_files(got, want):
    assert sorted(os.listdir(got)) == sorted(os.listdir(want))
    for f in os.listdir(want):
        assert filecmp.cmp(os.path.join(got, f), os.path.join(want, f), shallow=False), f


def test_checkpoint_truncated_while_running_is_a_clear_error(tmp_path):
    model = tmp_path / "m"
    shutil.copytree(DEFAULT_BF16, model)  # bf16: its matrices are used in place from the mapping
    p = subprocess.Popen([BIN, "run", "--model", str(model), "--prompt", "Once upon a time", "-n", "1500",
                          "--ignore-eos", "--temperature", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.read(1)  # text streams as it is generated: the weights are mapped and in use
        os.truncate(model / "model.safetensors", 4096)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1, (p.returncode, err)  # not -SIGBUS
    assert "model.safetensors: reading byte" in err and "(SIGBUS)" in err, err
    assert "truncated or rewritten" in err, err


def test_quantize_killed_at_random_points_resumes_to_identical_files(reference, calib, tmp_path):
    ref, seconds = reference
    kills = 0
    for seed in range(SEEDS):
        rnd = random.Random(seed)
        out = str(tmp_path / f"s{seed}")
        for attempt in range(3):
            log = open(tmp_path / f"log{seed}-{attempt}", "w+")
            p = subprocess.Popen(quantize_cmd(out, calib), stdout=subprocess.DEVNULL, stderr=log, text=True)
            if attempt < 2:
                try:
                    p.wait(timeout=rnd.uniform(0.05, 0.6) * seconds)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    kills += 1
                p.wait()
                if p.returncode == 0:
                    break
                assert p.returncode == -signal.SIGKILL, open(log.name).read()
                assert not os.path.exists(out), "a killed run left a directory under the final name"
            else:
                assert p.wait(timeout=300) == 0, open(log.name).read()
        assert not os.path.exists(out + ".partial")
        assert_same_files(out, ref)
    assert kills >= 1  # the schedules did interrupt runs (how many depends on the machine's speed, not asserted)


@pytest.mark.parametrize("limit", [2_000, 60_000, 300_000])
def test_quantize_disk_full_is_a_clear_error_and_no_complete_directory(reference, calib, tmp_path, limit):
    """RLIMIT_FSIZE stands in for a full disk: a write past it fails with EFBIG (SIGXFSZ ignored, as a shell's
    `ulimit -f` with the signal trapped gives). 2 KB: the first work file; 60 KB: a later one; 300 KB: the final
    model.safetensors (tiny_a's quantized model is ~370 KB)."""
    ref, _ = reference
    out = str(tmp_path / "q")

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run(quantize_cmd(out, calib), capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert "trellm: error:" in p.stderr and "File too large" in p.stderr, p.stderr
    assert ".partial" in p.stderr, p.stderr  # names the file it was writing
    assert not os.path.exists(out)
    assert not os.path.exists(os.path.join(out + ".partial", "config.json"))
    # With room again the same command finishes the work and gives the uninterrupted run's files.
    trellm(*quantize_cmd(out, calib)[1:])
    assert_same_files(out, ref)

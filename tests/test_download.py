"""The real download code over real HTTP, against the project's local mirror and its faults."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from gpt2.folders import MODEL_FILES
from gpt2.download import download_model
from gpt2.errors import GPT2Error
from gpt2.testing import ModelMirror

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "model.ckpt.data-00000-of-00001"


@pytest.fixture(scope="module")
def mirror_root(tiny_model, tmp_path_factory):
    """A mirror's files: the tiny factory model published as 124M and as 355M."""
    root = tmp_path_factory.mktemp("mirror")
    for name in ("124M", "355M"):
        shutil.copytree(tiny_model, root / name)
    return root


@pytest.fixture
def mirror(mirror_root):
    with ModelMirror(mirror_root, stall_seconds=3) as mirror:
        yield mirror


def fetch(mirror, dest, name="124M", **kwargs):
    return download_model(name, str(dest), mirror.url, progress=False, backoff=0, **kwargs)


def assert_same_files(mirror_root, model_dir, name="124M"):
    assert sorted(os.listdir(model_dir)) == sorted(MODEL_FILES)
    for f in MODEL_FILES:
        assert (mirror_root / name / f).read_bytes() == (model_dir / f).read_bytes(), f


def gets(mirror, file_name):
    """(first byte asked, status, bytes sent) of each GET of the file."""
    return [r[2:] for r in mirror.requests if r[:2] == ("GET", file_name)]


def test_downloads_every_file_byte_for_byte(mirror, mirror_root, tmp_path):
    assert fetch(mirror, tmp_path) == str(tmp_path / "124M")
    assert_same_files(mirror_root, tmp_path / "124M")


def test_legacy_name_downloads_the_renamed_model(mirror, mirror_root, tmp_path):
    fetch(mirror, tmp_path, name="117M")
    assert_same_files(mirror_root, tmp_path / "124M")


def test_complete_files_are_skipped_without_a_transfer(mirror, tmp_path):
    fetch(mirror, tmp_path)
    (tmp_path / "124M" / "vocab.bpe").unlink()
    mirror.requests.clear()
    fetch(mirror, tmp_path)
    assert {r[1] for r in mirror.requests} == {"vocab.bpe"}


def test_drop_resumes_and_transfers_only_the_rest(mirror, mirror_root, tmp_path):
    size = (mirror_root / "124M" / DATA).stat().st_size
    mirror.fail(DATA, "drop")
    fetch(mirror, tmp_path)
    first, second = gets(mirror, DATA)
    assert first[1] == 200 and 0 < first[2] < size
    kept = second[0]
    assert 0 < kept <= first[2]  # the resume asks from where the kept bytes end
    assert second[1] == 206 and second[2] == size - kept
    assert_same_files(mirror_root, tmp_path / "124M")


def test_interrupted_download_never_looks_complete_and_resumes(mirror, mirror_root, tmp_path):
    mirror.fail(DATA, "drop")
    with pytest.raises(GPT2Error, match="after 1 tries .*rerun the same command to resume"):
        fetch(mirror, tmp_path, retries=1)
    assert not (tmp_path / "124M" / DATA).exists()
    kept = (tmp_path / "124M" / (DATA + ".part")).stat().st_size
    assert kept > 0
    mirror.requests.clear()
    fetch(mirror, tmp_path)
    [resumed] = gets(mirror, DATA)
    assert resumed[0] == kept and resumed[1] == 206
    assert not (tmp_path / "124M" / (DATA + ".part")).exists()
    assert_same_files(mirror_root, tmp_path / "124M")


def test_server_errors_are_retried(mirror, mirror_root, tmp_path):
    mirror.fail("encoder.json", "500", "500")
    fetch(mirror, tmp_path)
    assert [r[1] for r in gets(mirror, "encoder.json")] == [500, 500, 200]
    assert_same_files(mirror_root, tmp_path / "124M")


def test_persistent_server_errors_end_in_a_clear_error(mirror, tmp_path):
    mirror.fail("encoder.json", *["500"] * 3)
    with pytest.raises(GPT2Error, match=r"encoder.json after 3 tries \(HTTP 500\)"):
        fetch(mirror, tmp_path, retries=3)
    assert not (tmp_path / "124M" / "encoder.json").exists()


def test_not_found_is_an_error_at_once_and_nothing_is_saved(mirror, tmp_path):
    mirror.fail("hparams.json", "404")
    with pytest.raises(GPT2Error, match="hparams.json was not found \\(HTTP 404\\)"):
        fetch(mirror, tmp_path)
    assert len(gets(mirror, "hparams.json")) == 1
    assert not (tmp_path / "124M" / "hparams.json").exists()


def test_bad_checksum_is_deleted_and_retried(mirror, mirror_root, tmp_path):
    mirror.fail(DATA, "bad_md5")
    fetch(mirror, tmp_path)
    assert len(gets(mirror, DATA)) == 2
    assert_same_files(mirror_root, tmp_path / "124M")


def test_persistent_bad_checksum_leaves_nothing(mirror, tmp_path):
    mirror.fail(DATA, *["bad_md5"] * 2)
    with pytest.raises(GPT2Error, match="did not match the server's MD5 checksum"):
        fetch(mirror, tmp_path, retries=2)
    assert not [f for f in os.listdir(tmp_path / "124M") if f.startswith(DATA)]


def test_server_that_ignores_range_restarts_cleanly(mirror, mirror_root, tmp_path):
    mirror.fail(DATA, "drop")
    with pytest.raises(GPT2Error):
        fetch(mirror, tmp_path, retries=1)
    kept = (tmp_path / "124M" / (DATA + ".part")).stat().st_size
    mirror.fail(DATA, "ignore_range")
    mirror.requests.clear()
    fetch(mirror, tmp_path)
    size = (mirror_root / "124M" / DATA).stat().st_size
    assert gets(mirror, DATA) == [(kept, 200, size)]  # asked for the rest, got the whole file
    assert_same_files(mirror_root, tmp_path / "124M")


def test_stalled_transfer_times_out_and_resumes(mirror, mirror_root, tmp_path):
    mirror.fail(DATA, "stall")
    start = time.monotonic()
    fetch(mirror, tmp_path, timeout=0.5)
    assert time.monotonic() - start < 3  # did not wait for the stalled server
    assert gets(mirror, DATA)[-1][0] > 0  # the retry resumed
    assert_same_files(mirror_root, tmp_path / "124M")


def test_refused_connection_is_a_one_line_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the download: nothing listens there
    with pytest.raises(GPT2Error, match="after 2 tries \\(connection refused\\): check the network"):
        download_model("124M", str(tmp_path), f"http://127.0.0.1:{port}", retries=2, backoff=0, progress=False)
    assert not [f for f in os.listdir(tmp_path / "124M") if not f.endswith(".part")]


def test_full_disk_is_a_clear_error(mirror, tmp_path):
    (tmp_path / "124M").mkdir()
    os.symlink("/dev/full", tmp_path / "124M" / "encoder.json.part")  # every write fails with ENOSPC
    with pytest.raises(GPT2Error, match="the disk is full while writing .*encoder.json.part"):
        fetch(mirror, tmp_path)
    assert not (tmp_path / "124M" / "encoder.json").exists()


def test_unknown_names_are_refused_before_any_request(mirror, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "download_model.py"), "124M", "2B",
                             "--models_dir", str(tmp_path), "--base_url", mirror.url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == ("error: unknown model 2B: choose from 124M, 355M, 774M, 1558M, 117M, 345M")
    assert mirror.requests == [] and not os.listdir(tmp_path)


def test_several_models_in_one_command_from_the_environment_url(mirror, mirror_root, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "download_model.py"), "124M", "345M",
                             "--models_dir", str(tmp_path)], env={**os.environ, "GPT2_BASE_URL": mirror.url},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_same_files(mirror_root, tmp_path / "124M")
    assert_same_files(mirror_root, tmp_path / "355M", name="355M")
    assert "355M: complete" in result.stdout


def test_ctrl_c_stops_at_once_and_keeps_the_partial_file(mirror_root, tmp_path):
    with ModelMirror(mirror_root, stall_seconds=60) as mirror:
        mirror.fail(DATA, "stall")
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "download_model.py"), "124M",
                                    "--models_dir", str(tmp_path), "--base_url", mirror.url],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        part = tmp_path / "124M" / (DATA + ".part")
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode != 0
        assert stderr.strip().splitlines()[-1] == "error: interrupted: rerun the same command to resume the download"
        assert "Traceback" not in stderr
        kept = part.stat().st_size
        assert kept > 0 and not (tmp_path / "124M" / DATA).exists()
        mirror.requests.clear()
        fetch(mirror, tmp_path)
        assert gets(mirror, DATA)[0][0] == kept
    assert_same_files(mirror_root, tmp_path / "124M")


def test_generate_fetches_its_model_on_first_use(mirror, tmp_path):
    env = {**os.environ, "GPT2_BASE_URL": mirror.url, "GPT2_MODELS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_interactive.py"), "--model_name", "124M",
                             "--length", "8", "--seed", "1"], input="the mill\n", capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "Fetching model 124M" in result.stderr
    assert "=" * 40 + " SAMPLE 1 " + "=" * 40 in result.stdout
    assert sorted(os.listdir(tmp_path / "124M")) == sorted(MODEL_FILES)

"""The real download code over real HTTP, against the project's local mirror and its faults."""
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import gpt2
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
    assert result.stderr.strip() == ("error: unknown model 2B: choose from 124M, 355M, 774M, 1558M, 117M, 345M, or a "
                                     "GPT-2 of the Hugging Face Hub as org/name")
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


def catch(function, *args):
    """[] if function(*args) returns, [the exception] if it raises: a thread's failure, for the test to see."""
    try:
        function(*args)
        return []
    except Exception as e:  # noqa: BLE001  (asserted on by the caller)
        return [e]


def wait_for_part(part, deadline=60):
    """Wait until a download is midway through writing `part`."""
    end = time.monotonic() + deadline
    while not (part.exists() and part.stat().st_size > 0):
        assert time.monotonic() < end, f"{part} did not appear"
        time.sleep(0.02)


def test_two_downloads_of_one_model_at_once_give_one_whole_copy(mirror_root, tmp_path):
    """The second process waits for the first instead of resuming its live .part; both succeed."""
    with ModelMirror(mirror_root, rate=25_000) as mirror:  # the 200 kB data file takes 8 s
        command = [sys.executable, os.path.join(ROOT, "download_model.py"), "124M", "--models_dir", str(tmp_path),
                   "--base_url", mirror.url]
        first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_part(tmp_path / "124M" / (DATA + ".part"))
        second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        second_out, second_err = second.communicate(timeout=120)
        first_out, first_err = first.communicate(timeout=120)
        assert first.poll() is not None and first.returncode == 0, first_err
    assert second.returncode == 0, second_err
    assert f"waiting for another download of 124M into {tmp_path / '124M'} to finish" in second_err  # they overlapped
    assert "124M: complete" in first_out and "124M: complete" in second_out
    assert_same_files(mirror_root, tmp_path / "124M")  # and nothing else: no .part, no lock file
    assert sorted(r[1] for r in mirror.requests if r[0] == "GET") == sorted(MODEL_FILES)  # each fetched once


def test_two_first_uses_at_once_load_one_download(mirror_root, tmp_path, capsys):
    """A notebook and a terminal (here two threads) that both load a model not yet downloaded."""
    models, errors = [], []

    def load():
        errors.extend(catch(lambda: models.append(gpt2.load("124M", str(tmp_path), base_url=mirror.url))))

    with ModelMirror(mirror_root, rate=50_000) as mirror:
        threads = [threading.Thread(target=load) for _ in range(2)]
        threads[0].start()
        wait_for_part(tmp_path / "124M" / (DATA + ".part"))
        threads[1].start()
        for thread in threads:
            thread.join(120)
    assert errors == [] and len(models) == 2
    assert models[0].decode(models[0].encode("the mill")) == models[1].decode(models[1].encode("the mill"))
    assert "waiting for another download of 124M" in capsys.readouterr().err
    assert_same_files(mirror_root, tmp_path / "124M")
    assert sorted(r[1] for r in mirror.requests if r[0] == "GET") == sorted(MODEL_FILES)


def test_a_download_that_makes_no_progress_is_waited_for_then_named(mirror, mirror_root, tmp_path):
    (tmp_path / "124M").mkdir()
    lock = os.open(tmp_path / "124M" / ".download.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a stopped download (Ctrl-Z) holds it
    try:
        with pytest.raises(GPT2Error, match=f"another download of 124M into {tmp_path / '124M'} has made no progress "
                                            "for 0.5 s: stop it, then rerun to finish the download"):
            fetch(mirror, tmp_path, lock_timeout=0.5)
    finally:
        os.close(lock)
    assert mirror.requests == []
    fetch(mirror, tmp_path)  # the lock died with its holder
    assert_same_files(mirror_root, tmp_path / "124M")


def test_the_file_on_disk_is_checked_not_the_bytes_received(mirror, mirror_root, tmp_path):
    """Bytes of the .part changed on disk while it downloads (another writer, a bad disk) are caught by the
    checksum of what is on disk, and the file is fetched again."""
    mirror.rate = 50_000
    errors = []
    thread = threading.Thread(target=lambda: errors.extend(catch(fetch, mirror, tmp_path)))
    thread.start()
    part = tmp_path / "124M" / (DATA + ".part")
    wait_for_part(part)
    with open(part, "r+b") as f:
        f.write(b"\xff" * 16)
    thread.join(120)
    assert errors == []
    assert [status for _, status, _ in gets(mirror, DATA)] == [200, 200]
    assert_same_files(mirror_root, tmp_path / "124M")

"""ActivationStore never loses, corrupts or exposes data (issue 11 §2).

Crashes are real: a forked child is killed (``os._exit``) at chosen points inside ``append``, and
a separate Python process is SIGKILLed at an arbitrary moment; the parent then loads the store
(every complete batch, exact values) and resumes it to the end.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
import time

import pytest
import torch
from tensordict import TensorDict

from tdhook.errors import InvalidInputError, TdhookError
from tdhook.latent import ActivationStore, StoreCorruptError, StoreLockedError
from tdhook.latent import _store as store_module

NUM, BATCH = 50, 10
OWN = {"tdhook_store.json", "tdhook_store.lock", "t0000.bin", "t0001.bin"}


def rows(start: int, n: int) -> TensorDict:
    """Row i holds i in every entry, so any misplaced or zero row is visible."""
    index = torch.arange(start, start + n)
    a = index[:, None].float() + torch.tensor([0.0, 0.5, 0.25])
    return TensorDict({"a": a, ("nested", "../x"): index}, batch_size=[n])


def assert_rows(folder, count: int) -> None:
    acts = ActivationStore.load(folder)
    assert acts.batch_size == torch.Size([count])
    if count:
        expected = rows(0, count)
        assert torch.equal(acts["a"], expected["a"])
        assert torch.equal(acts["nested", "../x"], expected["nested", "../x"])


def resume_to_the_end(folder) -> None:
    with ActivationStore(folder, num_samples=NUM, resume=True) as store:
        while store.count < NUM:
            store.append(rows(store.count, BATCH))
    assert_rows(folder, NUM)


def _crash_after_publish(original):
    def publish(self, count, entries):
        original(self, count, entries)
        if count == 3 * BATCH:
            os._exit(9)

    return publish


def _crash_before_publish(original):
    def replace(src, dst):
        with open(src) as f:
            count = json.load(f)["count"]
        if str(src).endswith(".tmp") and count == 3 * BATCH:
            os._exit(9)
        original(src, dst)

    return replace


def _crash_mid_data(original):
    def write_rows(self, entry, value):
        if self._count == 2 * BATCH and entry["file"] == "t0001.bin":  # after a's rows, half of the next
            raw = value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            with open(self.path / entry["file"], "r+b") as f:
                f.seek(self._count * len(raw) // len(value))
                f.write(raw[: len(raw) // 2])
                f.flush()
                os.fsync(f.fileno())
            os._exit(9)
        original(self, entry, value)

    return write_rows


def _crash_in_allocation(original):
    def ftruncate(fd, size):
        os._exit(9)

    return ftruncate


CRASH_POINTS = {
    # point: (object, attribute, patch, rows published when killed)
    "allocating-files": (store_module.os, "ftruncate", _crash_in_allocation, 0),
    "mid-data-write": (store_module.ActivationStore, "_write_rows", _crash_mid_data, 2 * BATCH),
    "data-written-metadata-not-replaced": (store_module.os, "replace", _crash_before_publish, 2 * BATCH),
    "just-after-publishing": (store_module.ActivationStore, "_publish", _crash_after_publish, 3 * BATCH),
}


def run_killed_writer(folder, point: str) -> int:
    """Fork a writer that patches one step to kill itself there; return its exit code."""
    owner, name, patch, _ = CRASH_POINTS[point]
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            setattr(owner, name, patch(getattr(owner, name)))
            store = ActivationStore(folder, num_samples=NUM, resume=True)
            while store.count < NUM:
                store.append(rows(store.count, BATCH))
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_a_writer_killed_inside_append_leaves_complete_batches_and_resumes(tmp_path, point) -> None:
    folder = tmp_path / "acts"
    assert run_killed_writer(folder, point) == 9
    assert_rows(folder, CRASH_POINTS[point][3])
    resume_to_the_end(folder)


def test_a_writer_sigkilled_at_an_arbitrary_moment_leaves_a_loadable_store(tmp_path) -> None:
    folder, num = tmp_path / "acts", 7 * 4000
    pid = os.fork()
    if pid == 0:  # the child appends until it is killed
        try:
            store = ActivationStore(folder, num_samples=num)
            while store.count < num:
                i = torch.arange(store.count, store.count + 7)
                store.append(TensorDict(a=i[:, None].float().repeat(1, 64), b=i, batch_size=[7]))
        finally:
            os._exit(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # kill it while it appends, once a few batches are in
        meta = folder / "tdhook_store.json"
        try:
            if json.loads(meta.read_text())["count"] >= 7 * 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    acts = ActivationStore.load(folder)
    count = acts.batch_size[0]
    assert count % 7 == 0
    assert 7 * 5 <= count < num
    index = torch.arange(count)
    assert torch.equal(acts["b"], index)
    assert torch.equal(acts["a"], index[:, None].float().repeat(1, 64))
    with ActivationStore(folder, num_samples=num, resume=True) as store:  # the lock died with it
        assert store.count == count
        store.append(TensorDict(a=torch.zeros(7, 64), b=torch.zeros(7, dtype=torch.int64), batch_size=[7]))
    assert ActivationStore.load(folder).batch_size[0] == count + 7


def written(tmp_path) -> tuple[object, dict]:
    folder = tmp_path / "acts"
    with ActivationStore(folder, num_samples=NUM) as store:
        store.append(rows(0, 2 * BATCH))
    return folder, json.loads((folder / "tdhook_store.json").read_text())


def test_a_truncated_data_file_is_detected_not_read_as_zeros(tmp_path) -> None:
    folder, _ = written(tmp_path)
    data = folder / "t0000.bin"
    with open(data, "r+b") as f:
        f.truncate(BATCH * 3 * 4)  # a partial copy: half the written rows remain
    with pytest.raises(
        StoreCorruptError, match=r"t0000.bin' for 'a' has 120 bytes, expected 600 .*truncated"
    ):
        ActivationStore.load(folder)
    assert data.stat().st_size == 120  # loading did not extend the file with zeros
    data.unlink()
    with pytest.raises(StoreCorruptError, match="is missing or not a regular file"):
        ActivationStore.load(folder)


def test_a_data_file_that_is_a_link_is_refused(tmp_path) -> None:
    folder, _ = written(tmp_path)
    outside = tmp_path / "outside.bin"
    (folder / "t0000.bin").rename(outside)
    (folder / "t0000.bin").symlink_to(outside)
    with pytest.raises(StoreCorruptError, match="not a regular file"):
        ActivationStore.load(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["entries"][0].update(file="../outside.bin"), r"data file name '\.\./outside\.bin'"),
        (lambda m: m["entries"][0].update(file="/etc/passwd"), "data file name '/etc/passwd'"),
        (lambda m: m["entries"][0].update(dtype="object"), "dtype 'object'"),
        (lambda m: m["entries"][0].update(shape=[-1]), r"row shape \[-1\]"),
        (lambda m: m["entries"][0].update(key=[]), r"key \[\]"),
        (lambda m: m.update(count=NUM + 1), "count=51"),
        (lambda m: m.update(format="pickle"), "format is not"),
        (lambda m: m.update(version=2), "version 2"),
        (lambda m: m["entries"].append(dict(m["entries"][0])), "duplicate"),
    ],
    ids=["traversal", "absolute", "dtype", "shape", "key", "count", "format", "version", "duplicate"],
)
def test_edited_metadata_is_refused(tmp_path, edit, message) -> None:
    folder, meta = written(tmp_path)
    edit(meta)
    (folder / "tdhook_store.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match=message):
        ActivationStore.load(folder)
    (folder / "tdhook_store.json").write_bytes(pickle.dumps({"count": 1}))
    with pytest.raises(StoreCorruptError, match="not readable JSON"):
        ActivationStore.load(folder)


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    folder, _ = written(tmp_path)
    (folder / "meta.json").write_text("{}")  # what tensordict's loader would read; ignored

    def refuse(*args, **kwargs):
        raise AssertionError("load unpickled something")

    for owner, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(owner, name, refuse)
    assert_rows(folder, 2 * BATCH)


def test_loaded_tensors_never_write_to_the_files(tmp_path) -> None:
    folder, _ = written(tmp_path)
    acts = ActivationStore.load(folder)
    acts["a"].zero_()
    assert_rows(folder, 2 * BATCH)


@pytest.mark.parametrize(
    "key",
    ["../x", "../../escape", "/tmp/absolute", "a/b", "a\\b", "..", ".", "tdhook_store.json", "t0000.bin"],
)
def test_keys_never_name_paths(tmp_path, key) -> None:
    folder = tmp_path / "inner" / "acts"
    with ActivationStore(folder, num_samples=4) as store:
        store.append(TensorDict({key: torch.ones(2, 3), ("../up", key): torch.zeros(2)}, batch_size=[2]))
    assert {p.name for p in folder.iterdir()} <= OWN
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["inner", "acts", *OWN])
    acts = ActivationStore.load(folder)
    assert torch.equal(acts[key], torch.ones(2, 3))
    assert torch.equal(acts["../up", key], torch.zeros(2))


def test_overwrite_deletes_only_a_store_and_only_its_files(tmp_path) -> None:
    folder = tmp_path / "acts"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "t0000.bin").write_text("not a store's")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(InvalidInputError, match="holds no store .* it never deletes other files"):
            ActivationStore(folder, num_samples=NUM, **flags)
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "t0000.bin").read_text() == "not a store's"
    assert "tdhook_store.lock" not in {p.name for p in folder.iterdir()}

    folder, _ = written(tmp_path / "second")
    (folder / "notes.txt").write_text("kept")
    with ActivationStore(folder, num_samples=NUM, overwrite=True) as store:
        assert ActivationStore.load(folder).batch_size == torch.Size([0])  # replaced at once
        store.append(TensorDict(c=torch.ones(3, 2), batch_size=[3]))
    assert (folder / "notes.txt").read_text() == "kept"
    assert {p.name for p in folder.iterdir()} == {
        "tdhook_store.json",
        "tdhook_store.lock",
        "t0000.bin",
        "notes.txt",
    }
    assert list(ActivationStore.load(folder).keys()) == ["c"]


def test_two_writers_in_one_process_or_two_threads_get_a_clear_error(tmp_path) -> None:
    folder = tmp_path / "acts"
    first = ActivationStore(folder, num_samples=NUM)
    first.append(rows(0, BATCH))
    for flags in ({"overwrite": True}, {"resume": True}):
        with pytest.raises(StoreLockedError, match="is open for writing by another ActivationStore") as info:
            ActivationStore(folder, num_samples=NUM, **flags)
        assert isinstance(info.value, RuntimeError)
    errors: list[BaseException] = []

    def second_writer() -> None:
        try:
            ActivationStore(folder, num_samples=NUM, overwrite=True)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=second_writer)
    thread.start()
    thread.join(10)
    assert len(errors) == 1
    assert isinstance(errors[0], StoreLockedError)
    first.append(rows(BATCH, BATCH))
    first.close()
    assert_rows(folder, 2 * BATCH)  # nothing of the first writer was deleted
    with ActivationStore(folder, num_samples=NUM, resume=True) as again:
        assert again.count == 2 * BATCH


def test_a_writer_in_another_process_holds_the_lock_until_it_dies(tmp_path) -> None:
    folder = tmp_path / "acts"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            store = ActivationStore(folder, num_samples=NUM)
            store.append(rows(0, BATCH))
            os.write(write_end, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(read_end, 1) == b"x"
        with pytest.raises(StoreLockedError):
            ActivationStore(folder, num_samples=NUM, overwrite=True)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    assert_rows(folder, BATCH)
    resume_to_the_end(folder)


def test_every_store_error_is_a_tdhook_error() -> None:
    assert issubclass(StoreCorruptError, TdhookError)
    assert issubclass(StoreCorruptError, ValueError)
    assert issubclass(StoreLockedError, TdhookError)

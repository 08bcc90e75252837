"""The first slice end to end: a file through the mount is on disk and in the journal."""
import os


def test_create_write_read_is_journaled(tracked):
    path = tracked.path / "hello.txt"
    path.write_bytes(b"hello world\n")
    assert path.read_bytes() == b"hello world\n"
    assert (tracked.backend_root / "hello.txt").read_bytes() == b"hello world\n"
    node = tracked.node("hello.txt")
    assert node["size"] == 12 and node["kind"] == "file" and node["state"] == "ACTIVE"
    commands = [(j["command"], j["status"], j["uid"]) for j in tracked.journal() if j["node_id"] == node["id"]]
    assert commands == [("create", "committed", os.getuid()), ("write", "committed", os.getuid())]

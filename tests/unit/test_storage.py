import os

from ift import storage


def test_atomic_write_and_read(tmp_path):
    p = tmp_path / "d" / "f.txt"
    storage.write_text(str(p), "hello")
    assert storage.read_text(str(p)) == "hello"
    assert not [n for n in os.listdir(tmp_path / "d") if n.startswith(".tmp")]
    assert storage.read_range(str(p), 1, 4) == b"ell"
    assert storage.size(str(p)) == 5


def test_expand_file_glob_folder(tmp_path):
    for name in ("a.json", "b.jsonl", ".hidden.json", "sub/c.tsv"):
        f = tmp_path / name
        f.parent.mkdir(exist_ok=True)
        f.write_text("x")
    assert storage.expand(str(tmp_path / "a.json")) == [str(tmp_path / "a.json")]
    assert storage.expand(str(tmp_path / "*.json*")) == [str(tmp_path / "a.json"),
                                                        str(tmp_path / "b.jsonl")]
    assert storage.expand(str(tmp_path)) == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl"),
                                            str(tmp_path / "sub" / "c.tsv")]


def test_complete_marker(tmp_path):
    d = str(tmp_path / "out")
    storage.makedirs(d)
    assert not storage.is_complete(d)
    storage.mark_complete(d)
    assert storage.is_complete(d)


def test_join():
    assert storage.join("s3://b/p/", "x", "/y") == "s3://b/p/x/y"
    assert storage.split_s3("s3://bucket/a/b") == ("bucket", "a/b")

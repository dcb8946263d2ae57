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


def test_arrow_s3_filesystem_keeps_its_retries_when_pickled(monkeypatch):
    # Ray pickles the run's filesystem to its controller and workers; pyarrow's own pickle
    # would drop the retry strategy and give up on a restarting store after ~1 s.
    import pickle

    import pyarrow.fs as pafs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, inner = storage.arrow_fs("s3://bucket/some/key")
    assert inner == "bucket/some/key"
    back = pickle.loads(pickle.dumps(fs))
    assert isinstance(back, pafs.S3FileSystem)
    strategy = back._ift_kwargs["retry_strategy"]
    assert isinstance(strategy, pafs.AwsDefaultS3RetryStrategy)
    assert strategy.max_attempts == storage.S3_ATTEMPTS > 3
    assert back.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:9"


def test_aws_max_attempts_sets_the_retry_budget(monkeypatch):
    import pytest

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert storage.s3_client().meta.config.retries["total_max_attempts"] == 2
    fs, _ = storage.arrow_fs("s3://bucket/key")
    assert fs._ift_kwargs["retry_strategy"].max_attempts == 2
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    assert storage.s3_client().meta.config.retries["total_max_attempts"] == storage.S3_ATTEMPTS
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="AWS_MAX_ATTEMPTS='many'"):
        storage.s3_client()


def test_read_json_is_empty_for_absent_or_half_written_files(tmp_path):
    from ift import storage

    assert storage.read_json(str(tmp_path / "absent.json")) == {}
    (tmp_path / "half.json").write_text('{"step": ')
    assert storage.read_json(str(tmp_path / "half.json")) == {}
    (tmp_path / "ok.json").write_text('{"step": 3}')
    assert storage.read_json(str(tmp_path / "ok.json")) == {"step": 3}

from tasks.caching import shard_key, stable_shards
from tasks.decoding import CheckOptions
from tasks.listing import InputFile


def _files(n, start=0):
    return [InputFile(f"img_{i:05d}.jpg", 0, 100 + i, "1.0") for i in range(start, start + n)]


def test_key_changes_with_what_determines_the_result_only():
    files = _files(3)
    key = shard_key("check", "/d", CheckOptions(), files)
    assert key == shard_key("check", "/d", CheckOptions(), _files(3))
    assert key != shard_key("check", "/d", CheckOptions(max_pixels=10), files)
    assert key != shard_key("check", "/other", CheckOptions(), files)
    touched = [*files[:2], InputFile(files[2].filename, 0, files[2].size, "2.0")]
    assert key != shard_key("check", "/d", CheckOptions(), touched)
    assert key != shard_key("embed", "/d", CheckOptions(), files)


def test_adding_files_keeps_most_shards():
    files = _files(4000)
    before = stable_shards(files, lambda f: f.filename, 256, 2)
    assert [f for s in before for f in s] == files
    assert max(len(s) for s in before) <= 512
    grown = sorted(files + _files(400, start=10_000), key=lambda f: f.filename)
    after = stable_shards(grown, lambda f: f.filename, 256, 2)
    unchanged = {tuple(s) for s in before} & {tuple(s) for s in after}
    assert len(unchanged) >= 0.8 * len(before)


def test_small_inputs_are_spread_over_workers():
    shards = stable_shards(_files(10), lambda f: f.filename, 256, 2)
    assert len(shards) >= 2 and sum(map(len, shards)) == 10

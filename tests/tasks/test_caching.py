import pyarrow as pa
from dask.tokenize import tokenize
from prefect.utilities.collections import visit_collection

from tasks import decoding
from tasks.caching import shard_key
from tasks.listing import InputFile
from tasks.sharding import LARGEST_BATCH, MIN_PIECE, Batch, pack_pieces, plan_pieces, stable_shards
from tests.options import check_options


def _files(n, start=0):
    return [InputFile(f"img_{i:05d}.jpg", 0, 100 + i, "1.0") for i in range(start, start + n)]


def test_key_changes_with_what_determines_the_result_only():
    files = _files(3)
    key = shard_key("check", "/d", check_options(), files)
    assert key == shard_key("check", "/d", check_options(), _files(3))
    assert key != shard_key("check", "/d", check_options(max_pixels=10), files)
    assert key != shard_key("check", "/other", check_options(), files)
    touched = [*files[:2], InputFile(files[2].filename, 0, files[2].size, "2.0")]
    assert key != shard_key("check", "/d", check_options(), touched)
    assert key != shard_key("embed", "/d", check_options(), files)


def test_the_check_key_changes_with_the_check_tables_columns(monkeypatch):
    """A check table cached before a column was added is not found by the code that writes it."""
    files = _files(3)
    key = shard_key("check", "/d", decoding.check_params(check_options()), files)
    assert key == shard_key("check", "/d", decoding.check_params(check_options()), files)
    monkeypatch.setattr(decoding, "CHECK_SCHEMA", pa.schema(list(decoding.CHECK_SCHEMA)[:-1]))
    assert key != shard_key("check", "/d", decoding.check_params(check_options()), files)


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


def _plan(shards, cache: set[str], slots=2):
    """plan_pieces over `shards`, then its new pieces stored in `cache` (their file names), as a run does."""
    plan = plan_pieces("embed", "/d", (), shards, cache, slots)
    for shard, pieces in zip(shards, plan):
        assert [f for p in pieces for f in shard[p.start : p.stop]] == shard  # every item once, in order
        cache |= {f"{p.key}.parquet" for p in pieces}
    return plan


def _computed(plan) -> list[int]:
    return sorted(p.stop - p.start for pieces in plan for p in pieces if not p.cached)


def test_a_folder_growing_at_its_end_computes_only_its_new_files_spread_over_the_slots():
    cache: set[str] = set()
    files = _files(2000)
    first = _plan(stable_shards(files, lambda f: f.filename, 256, 2), cache)
    assert all(len(pieces) == 1 and not pieces[0].cached for pieces in first)  # a first run computes whole shards

    unchanged = _plan(stable_shards(files, lambda f: f.filename, 256, 2), cache)
    assert all(len(pieces) == 1 and pieces[0].cached for pieces in unchanged)

    for added in (_files(200, start=2000), _files(120, start=2200)):
        files += added
        plan = _plan(stable_shards(files, lambda f: f.filename, 256, 2), cache)
        # the last shard grew: what an earlier run computed of it is reused, its new files are split for both
        # slots, no piece longer than an equal share
        computed = _computed(plan)
        assert sum(computed) == len(added) and len(computed) >= 2 and max(computed) <= len(added) // 2
    assert len(plan[-1]) >= 3  # the tail of 2,000 files, then the two runs' new pieces


def test_few_new_files_are_not_cut_into_pieces_smaller_than_needed():
    cache: set[str] = set()
    files = _files(500)
    _plan(stable_shards(files, lambda f: f.filename, 32, 8), cache, slots=8)
    plan = _plan(stable_shards(files + _files(40, start=500), lambda f: f.filename, 32, 8), cache, slots=8)
    # 8 slots, but 40 new files make 2 pieces of at most MIN_PIECE, not 8 of 5
    assert MIN_PIECE == 32 and sum(_computed(plan)) == 40 and len(_computed(plan)) == 2


def test_new_files_in_several_shards_make_one_task_per_slot():
    # a datapool run sees only its new files: 220 of them fall into several shards, cut into pieces
    new = _files(220, start=2200)
    plan = _plan(stable_shards(new, lambda f: f.filename, 256, 2), set())
    sizes = _computed(plan)
    assert len(sizes) > 2
    tasks = pack_pieces(sizes, slots=2, shard_size=256)
    assert sorted(i for task in tasks for i in task) == list(range(len(sizes)))  # every piece in one task
    loads = [sum(sizes[i] for i in task) for task in tasks]
    assert len(tasks) == 2 and max(loads) - min(loads) <= max(sizes)


def test_a_first_run_makes_few_tasks_large_ones_first():
    files = _files(2000)
    sizes = [len(shard) for shard in stable_shards(files, lambda f: f.filename, 256, 2)]
    tasks = pack_pieces(sizes, slots=2, shard_size=256)
    assert sorted(i for task in tasks for i in task) == list(range(len(sizes)))  # every piece in one task
    loads = [sum(sizes[i] for i in task) for task in tasks]
    # each task takes about half of what is left, at least the shard size: 972, 510, 257, 261 of 12 shards
    assert len(tasks) == 4 < len(sizes) and abs(loads[0] - 1000) <= max(sizes) / 2
    assert loads[0] > loads[1] > max(loads[2:]) and max(loads[2:]) < 2 * 256


def test_a_task_takes_at_most_largest_batch_shards():
    tasks = pack_pieces([256] * 1000, slots=2, shard_size=256)
    assert [len(task) for task in tasks[:3]] == [LARGEST_BATCH] * 3
    assert sum(len(task) for task in tasks) == 1000 and len(tasks[-1]) == 1
    assert pack_pieces([], slots=2, shard_size=256) == []


def test_a_batch_reaches_prefect_as_one_value():
    files = [InputFile(f"{i}.jpg", 0, 1, "0.0") for i in range(2000)]
    pieces = [files[:1500], files[1500:]]
    walked_list, walked_batch = [], []
    visit_collection({"pieces": pieces}, walked_list.append)
    visit_collection({"pieces": Batch(pieces)}, walked_batch.append)
    # Prefect walks a list of files file by file, field by field; a batch is one value to it.
    assert len(walked_list) > 2000 * 4 and len(walked_batch) == 3  # the dict, its key, the batch
    batch = Batch(pieces)
    assert len(batch) == 2 and list(batch) == pieces and batch[1] == files[1500:]
    assert (
        tokenize(batch)
        == tokenize(Batch([files[:1500], files[1500:]]))
        != tokenize(Batch([files[:1499], files[1499:]]))
    )

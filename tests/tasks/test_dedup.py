import pyarrow as pa

from tasks.decoding import CHECK_SCHEMA
from tasks.dedup import classify, duplicate_map


def _check_table(rows):
    return pa.Table.from_pylist(
        [
            {
                "filename": f,
                "label": 0,
                "size": 1,
                "version": "",
                "content_hash": h,
                "width": 1,
                "height": 1,
                "error": e,
            }
            for f, h, e in rows
        ],
        schema=CHECK_SCHEMA,
    )


def test_first_by_sorted_path_is_kept_whatever_the_order():
    assert duplicate_map(["z.jpg", "b/a.jpg", "a.jpg"], ["h", "h", "h"]) == {"b/a.jpg": "a.jpg", "z.jpg": "a.jpg"}


def test_classify_marks_corrupt_duplicate_and_ok():
    table = _check_table(
        [
            ("b.jpg", "h1", None),
            ("a.jpg", "h1", None),
            ("c.jpg", "h2", None),
            ("d.jpg", "h2", "decoding failed"),
            ("e.jpg", None, "empty file (0 bytes)"),
        ]
    )
    out = classify(table, remove_exact_duplicates=True).to_pylist()
    assert [(r["filename"], r["status"], r["duplicate_of"]) for r in out] == [
        ("b.jpg", "duplicate", "a.jpg"),
        ("a.jpg", "ok", None),
        ("c.jpg", "ok", None),
        ("d.jpg", "corrupt", None),
        ("e.jpg", "corrupt", None),
    ]
    assert out[3]["reason"] == "decoding failed"


def test_duplicates_kept_when_removal_is_off():
    table = _check_table([("a.jpg", "h", None), ("b.jpg", "h", None)])
    assert classify(table, remove_exact_duplicates=False).column("status").to_pylist() == ["ok", "ok"]

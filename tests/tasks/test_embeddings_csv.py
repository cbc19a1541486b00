import numpy as np
import pytest
from lightly.utils.io import load_embeddings

from tasks.embeddings_csv import CSV_ROWS, read_embeddings_csv, write_embeddings_csv


def test_roundtrip_and_lightly_reads_it(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    names = ["a.jpg", "sub/b c.jpg", "d,e.jpg"]
    path = write_embeddings_csv(tmp_path / "e.csv", names, vectors, [0, 1, 1])
    assert path.read_text().splitlines()[0] == "filenames,embedding_0,embedding_1,embedding_2,embedding_3,labels"
    filenames, read, labels = read_embeddings_csv(path)
    assert filenames == names and labels == [0, 1, 1]
    np.testing.assert_array_equal(read, vectors)
    lightly_vectors, lightly_labels, lightly_names = load_embeddings(str(path))
    assert list(lightly_names) == names and list(lightly_labels) == [0, 1, 1]
    np.testing.assert_allclose(lightly_vectors, vectors, rtol=1e-6)


def test_a_csv_of_many_blocks_keeps_the_order_of_its_rows(tmp_path):
    n = 2 * CSV_ROWS + 7
    vectors = np.random.default_rng(1).normal(size=(n, 5)).astype(np.float32)
    names = [f"{i}.jpg" for i in range(n)]
    rows = np.random.default_rng(2).permutation(n)[: n - 3]
    filenames, read, labels = read_embeddings_csv(
        write_embeddings_csv(tmp_path / "e.csv", names, vectors, list(range(n)), rows)
    )
    assert filenames == [names[i] for i in rows] and labels == rows.tolist()
    np.testing.assert_array_equal(read, vectors[rows])


def test_float32_values_read_back_bit_for_bit(tmp_path):
    extremes = np.array(
        [0.0, -0.0, 1e-45, -1.17549435e-38, 1e-7, 123456789.0, 1e20, 3.4028235e38, -3.4028235e38], np.float32
    )
    vectors = np.vstack(
        [extremes, np.random.default_rng(3).normal(scale=1e3, size=(50, extremes.size)).astype(np.float32)]
    )
    names = ['say "cheese".jpg', *(f"{i}.jpg" for i in range(50))]
    path = write_embeddings_csv(tmp_path / "e.csv", names, vectors, [0] * 51)
    filenames, read, _ = read_embeddings_csv(path)
    assert filenames == names
    np.testing.assert_array_equal(read.view(np.uint32), vectors.view(np.uint32))  # bit for bit, the sign of -0.0 too
    np.testing.assert_array_equal(load_embeddings(str(path))[0].astype(np.float32), vectors)


def test_a_non_finite_embedding_is_refused_naming_the_file_and_the_sample(tmp_path):
    vectors = np.ones((3, 2), np.float32)
    vectors[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"e\.csv: row for 'b\.jpg' has NaN or infinite values"):
        write_embeddings_csv(tmp_path / "e.csv", ["a.jpg", "b.jpg", "c.jpg"], vectors, [0, 0, 0])
    assert not (tmp_path / "e.csv").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("name,embedding_0,labels\na,1,0\n", "header must be filenames,embedding_0"),
        ("filenames,embedding_0,embedding_2,labels\na,1,2,0\n", "header must be"),
        ("filenames,embedding_0,labels\na,nan,0\n", "NaN or infinite"),
        ("filenames,embedding_0,labels\na,1,0\na,2,0\n", "appear more than once"),
        ("filenames,embedding_0,labels\na,1,0\nb,2\n", "not a valid CSV"),
        ("filenames,embedding_0,labels\na,x,0\n", "non-numeric"),
    ],
)
def test_bad_files_are_rejected_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_embeddings_csv(path)
    assert str(path) in str(error.value)


def test_masked_and_selected_columns_are_allowed(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("filenames,embedding_0,masked,selected,labels\na,0.5,0,1,2\n")
    assert read_embeddings_csv(path)[2] == [2]

"""A dataset version or split slice that names no data is told in one line naming
the config field, not by tfds's assertion or array_record's "0 length" paths."""
import pytest

from bigjax.data import corpora


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  corpora.prepared_source("sklearn_toy/diabetes", "train", d)  # The smallest local one.
  return d


@pytest.mark.parametrize("name", ["sklearn_toy/diabetes:9.9.9", "lm1b:9.9.9"])
def test_unavailable_version_names_the_dataset_field(data_dir, name):
  with pytest.raises(ValueError, match=r"only: .*Fix config\.data\.dataset"):
    corpora.prepared_source(name, "train", data_dir)


@pytest.mark.parametrize("split", ["train[:0]", "test[100%:]"])
def test_a_slice_of_no_examples_names_the_split_fields(data_dir, split):
  with pytest.raises(ValueError, match=r"selects no examples; fix config\.data\.train_split"):
    corpora.prepared_source("sklearn_toy/diabetes", split, data_dir)


def test_a_sum_with_an_empty_part_still_reads_the_others(data_dir):
  whole = corpora.prepared_source("sklearn_toy/diabetes", "train", data_dir)
  parts = corpora.prepared_source("sklearn_toy/diabetes", "train+test[:0]", data_dir)
  assert len(parts) == len(whole)


def test_bad_slice_syntax_names_the_split_fields(data_dir):
  with pytest.raises(ValueError, match=r"'train\[abc\]'.*Fix config\.data\.train_split"):
    corpora.prepared_source("sklearn_toy/diabetes", "train[abc]", data_dir)

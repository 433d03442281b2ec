"""hfhpc's errors cross process boundaries whole: data preparation raises them in forked workers."""

import multiprocessing
import pickle

import pytest

from hfhpc.errors import DiskFullError, SpecError, UsageError


@pytest.mark.parametrize("error", [
    UsageError("the pairs are conversations", "set train.chat_template"),
    SpecError("job.yaml", "train.max_length", "must be positive", "set it to 2048"),
    DiskFullError("/store", needed=2**30),
])
def test_a_pickled_error_keeps_its_type_message_and_fix(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and back.render() == error.render() and back.exit_code == error.exit_code


def _fail(_):
    raise SpecError("job.yaml", "train.chat_template", "the model has none", "set train.chat_template")


def test_an_error_raised_in_a_pool_worker_reaches_the_parent_as_itself():
    # An error the parent cannot unpickle leaves the pool waiting for ever: hence the timeout.
    with multiprocessing.get_context("fork").Pool(1) as pool, pytest.raises(SpecError) as raised:
        pool.map_async(_fail, [0]).get(timeout=60)
    assert raised.value.render().endswith("the model has none; set train.chat_template")

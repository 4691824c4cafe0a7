"""Driver config for subprocess tests: the tiny model over the dataset in $RADDINO_TEST_DATA."""

import os

from tests.tiny import tiny_run_config


def get_config():
    data_dir, name = os.environ["RADDINO_TEST_DATA"].rsplit("/", 1)
    return tiny_run_config(data_dir, name)

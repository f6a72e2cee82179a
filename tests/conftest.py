import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--require-browser", action="store_true",
                     help="fail (never skip) the browser tests when chromium is missing (CI passes this)")

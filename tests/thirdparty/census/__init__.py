"""tensorflow/models' census wide-and-deep columns, vendored unmodified.

- ``census_dataset.py``: ``official/r1/wide_deep/census_dataset.py`` of
  https://github.com/tensorflow/models at commit
  23341a239100ba7faa2fbf7d35779eb19156c6e3 (sha256 86fdbf53...6b3d8a
  recorded in ``tests/test_thirdparty_census.py``, which checks it).
- ``LICENSE``: that repository's licence (Apache-2.0), same text.

It imports ``official.utils.flags.core`` for one help string; the test supplies
a stub when tensorflow/models' ``official`` package is not installed.
"""

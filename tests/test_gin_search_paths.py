"""The default gin search paths ('.', then the package's configs) find the shipped files quietly."""

import logging

import gin
import pytest

from prompt_mix import gin_utils
from prompt_mix.training import exporter  # pylint: disable=unused-import  # runs/export.gin binds it.


def test_a_file_from_the_package_configs_logs_no_error_for_the_paths_that_miss(caplog, tmp_path,
                                                                                 monkeypatch):
  monkeypatch.chdir(tmp_path)  # '.' has no runs/: gin tries it first, then the package's configs.
  gin.clear_config()
  with caplog.at_level(logging.INFO):
    gin_utils.parse_gin_flags(gin_utils.default_gin_search_paths(), ["runs/export.gin"], [],
                              finalize_config=False)
  assert gin.query_parameter("%EXPORT_FORMATS") is not None
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
  gin.clear_config()


def test_a_file_in_no_search_path_still_fails_naming_it_and_the_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(gin_utils.GinConfigError, match=r"runs/no_such\.gin.*Searched config paths.*configs"):
    gin_utils.parse_gin_flags(gin_utils.default_gin_search_paths(), ["runs/no_such.gin"], [],
                              finalize_config=False)
  gin.clear_config()
